# Sourced by scripts/test and scripts/bench: installs what is missing and starts throwaway
# servers with their data under the given directories, on free ports. Each stops when the
# shell exits.
# After `start_throwaway_mariadb DIR`, MARIADB_URL names it and MARIADB_CA is the CA of its
# TLS certificate (clients may use TLS or not); it stops when the shell exits.

ensure_packages() {
  local need=("$@") missing=() p
  for p in "${need[@]}"; do
    case "$p" in
      mariadb-server) command -v mariadb-install-db >/dev/null 2>&1 || missing+=(mariadb-server mariadb-client) ;;
      nodejs) command -v node >/dev/null 2>&1 || missing+=(nodejs npm) ;;
      python3) command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv) ;;
      *) command -v "$p" >/dev/null 2>&1 || missing+=("$p") ;;
    esac
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    local sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Every server started here is stopped when the shell exits.
SERVER_PIDS=()
stop_on_exit() {
  SERVER_PIDS+=("$1")
  trap 'for p in "${SERVER_PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null || true' EXIT
}

# Waits until something accepts TCP connections on 127.0.0.1:$1, for at most $2 seconds.
wait_for_port() {
  local port=$1 deadline=$((SECONDS + ${2:-30}))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    [ $SECONDS -lt "$deadline" ] || { echo "nothing answers on port $port" >&2; return 1; }
    sleep 0.2
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_throwaway_mariadb() {
  local data=$1 mariadbd port
  mariadbd=$(command -v mariadbd || echo /usr/sbin/mariadbd)
  rm -rf "$data"
  mkdir -p "$data"
  # A CA of the run's own and a certificate for 127.0.0.1 signed by it.
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=brokerage-test-ca \
    -keyout "$data/ca.key" -out "$data/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 \
    -keyout "$data/server.key" -out "$data/server.csr" 2>/dev/null
  openssl x509 -req -in "$data/server.csr" -CA "$data/ca.pem" -CAkey "$data/ca.key" \
    -CAcreateserial -days 30 -out "$data/server.pem" \
    -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n') 2>/dev/null
  mariadb-install-db --no-defaults --datadir="$data/db" --user="$(id -un)" \
    --auth-root-authentication-method=normal --skip-test-db >"$data/install.log" 2>&1
  port=$(free_port)
  "$mariadbd" --no-defaults --datadir="$data/db" --user="$(id -un)" --bind-address=127.0.0.1 \
    --port="$port" --socket="$data/sock" --pid-file="$data/pid" --skip-name-resolve \
    --max-connections=1000 --log-error="$data/error.log" \
    --ssl-ca="$data/ca.pem" --ssl-cert="$data/server.pem" --ssl-key="$data/server.key" &
  stop_on_exit $!
  for _ in $(seq 1 100); do
    if mariadb-admin --no-defaults --socket="$data/sock" -uroot ping >/dev/null 2>&1; then break; fi
    sleep 0.2
  done
  mariadb-admin --no-defaults --socket="$data/sock" -uroot ping >/dev/null
  MARIADB_URL="mysql://root@127.0.0.1:$port"
  MARIADB_CA="$data/ca.pem"
  echo "== throwaway MariaDB on 127.0.0.1:$port (data in $data)"
}

# MongoDB's wire protocol with authentication on, from PyPI's secantusdb (no mongod exists in
# any registry these machines reach), installed into the venv $1. It has no localhost
# exception, so it runs once without --auth to create the admin user.
# After `start_throwaway_mongodb VENV DIR`, MONGODB_URL names it with that admin user.
start_throwaway_mongodb() {
  local venv=$1 data=$2 port pid
  if ! "$venv/bin/python" -c 'import secantus, pymongo' >/dev/null 2>&1; then
    echo "== installing secantusdb into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check secantusdb==0.7.0b3
  fi
  rm -rf "$data"
  mkdir -p "$data"
  port=$(free_port)
  "$venv/bin/secantusd-py" --host 127.0.0.1 --port "$port" --storage-path "$data/db" \
    --standalone >"$data/setup.log" 2>&1 &
  pid=$!
  wait_for_port "$port" 60
  "$venv/bin/python" - "$port" <<'PY'
import sys, pymongo
client = pymongo.MongoClient(f"mongodb://127.0.0.1:{sys.argv[1]}/?directConnection=true")
client.admin.command("createUser", "admin", pwd="test-admin-password",
                     roles=[{"role": "root", "db": "admin"}])
PY
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  "$venv/bin/secantusd-py" --host 127.0.0.1 --port "$port" --storage-path "$data/db" \
    --standalone --auth >"$data/server.log" 2>&1 &
  stop_on_exit $!
  wait_for_port "$port" 60
  MONGODB_URL="mongodb://admin:test-admin-password@127.0.0.1:$port/?authSource=admin"
  echo "== throwaway MongoDB-compatible server (secantusdb) on 127.0.0.1:$port (data in $data)"
}
