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
      swift) command -v swift-proxy-server >/dev/null 2>&1 \
        || missing+=(swift swift-proxy swift-account swift-container swift-object) ;;
      redis) command -v redis-server >/dev/null 2>&1 || missing+=(redis-server) ;;
      postgresql) compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql) ;;
      python3-lib2to3) /usr/bin/python3 -c 'import lib2to3' >/dev/null 2>&1 || missing+=(python3-lib2to3) ;;
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

# swauth 1.3.0 (PyPI) is Python 2 only: fetch it (with the pip $2) into $1 and convert it
# for Python 3 (2to3, then bytes where it hashes strings). The proxy loads it from there
# through PYTHONPATH.
prepare_swauth() {
  local dest=$1 pip=$2 work
  [ -f "$dest/swauth/middleware.py" ] && return 0
  echo "== fetching swauth 1.3.0 and converting it for Python 3 into $dest"
  work=$(mktemp -d)
  "$pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$work" swauth==1.3.0
  tar -xzf "$work/swauth-1.3.0.tar.gz" -C "$work"
  /usr/bin/python3 -m lib2to3 -w -n "$work/swauth-1.3.0/swauth" >/dev/null 2>&1
  local s=$work/swauth-1.3.0/swauth
  # The version comes from pkg_resources or pbr, neither of which sees this copy.
  printf 'import gettext\n__version__ = "1.3.0"\ngettext.install("swauth")\n' >"$s/__init__.py"
  sed -i -e 's/hashlib\.sha1(enc_key)/hashlib.sha1(enc_key.encode())/' \
    -e 's/hashlib\.sha512(enc_key)/hashlib.sha512(enc_key.encode())/' \
    -e "s/os\.urandom(32)\.encode('base64')\.rstrip()/__import__('base64').b64encode(os.urandom(32)).decode()/" \
    "$s/authtypes.py"
  sed -i -e 's/return sha512(enc_key)\.hexdigest()/return sha512(enc_key.encode()).hexdigest()/' \
    -e 's/base64\.encodestring(/base64.encodebytes(/' \
    "$s/middleware.py"
  mkdir -p "$dest"
  cp -r "$s" "$dest/swauth"
  rm -rf "$work"
}

# A single-node OpenStack Swift (Debian's packages) with swauth and account quotas, all on
# loopback with its rings, devices and logs under $2 (swauth from $1, fetched with the pip $3).
# After `start_throwaway_swift SWAUTH_DIR DIR PIP`, SWIFT_URL is the proxy and SWIFT_ADMIN_KEY
# swauth's super admin key.
start_throwaway_swift() {
  local swauth=$1 data=$2 proxy account container object memc kind port
  prepare_swauth "$swauth" "$3"
  rm -rf "$data"
  mkdir -p "$data/etc" "$data/node/d1" "$data/run" "$data/log"
  proxy=$(free_port) account=$(free_port) container=$(free_port) object=$(free_port) memc=$(free_port)
  SWIFT_ADMIN_KEY=test-swauth-admin-key
  memcached -l 127.0.0.1 -p "$memc" -U 0 -u "$(id -un)" >"$data/log/memcached.log" 2>&1 &
  stop_on_exit $!
  for kind in account container object; do
    eval "port=\$$kind"
    # Few partitions: the container updater forks once per partition on every sweep.
    swift-ring-builder "$data/etc/$kind.builder" create 1 1 1 >/dev/null
    swift-ring-builder "$data/etc/$kind.builder" add "r1z1-127.0.0.1:$port/d1" 100 >/dev/null
    swift-ring-builder "$data/etc/$kind.builder" rebalance >/dev/null
    cat >"$data/etc/$kind-server.conf" <<CONF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $port
devices = $data/node
mount_check = false
swift_dir = $data/etc
user = $(id -un)
workers = 1
log_name = $kind-server
[pipeline:main]
pipeline = $kind-server
[app:$kind-server]
use = egg:swift#$kind
[$kind-replicator]
[$kind-auditor]
[$kind-updater]
[account-reaper]
[container-sync]
[object-expirer]
CONF
    "swift-$kind-server" "$data/etc/$kind-server.conf" >"$data/log/$kind.log" 2>&1 &
    stop_on_exit $!
  done
  cat >"$data/etc/proxy-server.conf" <<CONF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $proxy
swift_dir = $data/etc
user = $(id -un)
workers = 1
log_name = proxy-server
[pipeline:main]
pipeline = catch_errors healthcheck cache swauth account-quotas proxy-server
[app:proxy-server]
use = egg:swift#proxy
allow_account_management = true
account_autocreate = true
# Quotas read the account's usage from a cache: keep it fresh for the tests.
recheck_account_existence = 1
[filter:swauth]
paste.filter_factory = swauth.middleware:filter_factory
super_admin_key = $SWIFT_ADMIN_KEY
default_swift_cluster = local#http://127.0.0.1:$proxy/v1
token_life = 3600
[filter:account-quotas]
use = egg:swift#account_quotas
[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$memc
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:healthcheck]
use = egg:swift#healthcheck
CONF
  # The updaters carry object and container changes up into account listings and usage,
  # which quotas read (also those the object server had to queue under load).
  cat >"$data/etc/updaters.conf" <<CONF
[DEFAULT]
devices = $data/node
mount_check = false
swift_dir = $data/etc
user = $(id -un)
recon_cache_path = $data/run
[container-updater]
interval = 2
concurrency = 1
# Without it the daemon's sweeps crawl (over 20 s for a few dozen containers).
containers_per_second = 1000
[object-updater]
interval = 5
concurrency = 1
CONF
  PYTHONPATH="$swauth" swift-proxy-server "$data/etc/proxy-server.conf" >"$data/log/proxy.log" 2>&1 &
  stop_on_exit $!
  swift-container-updater "$data/etc/updaters.conf" >"$data/log/container-updater.log" 2>&1 &
  stop_on_exit $!
  swift-object-updater "$data/etc/updaters.conf" >"$data/log/object-updater.log" 2>&1 &
  stop_on_exit $!
  for port in $account $container $object $proxy; do wait_for_port "$port" 60; done
  # swauth keeps its accounts in Swift itself: prepare its .auth account once.
  curl -fsS -o /dev/null -X POST -H "X-Auth-Admin-User: .super_admin" \
    -H "X-Auth-Admin-Key: $SWIFT_ADMIN_KEY" "http://127.0.0.1:$proxy/auth/v2/.prep"
  SWIFT_URL="http://127.0.0.1:$proxy"
  export SWIFT_ADMIN_KEY
  echo "== throwaway Swift with swauth on 127.0.0.1:$proxy (data in $data)"
}

# PostgreSQL (Debian's packages) as the postgres system user, which the package creates:
# PostgreSQL refuses to run as root. Data under $1, password authentication over TCP.
# After `start_throwaway_postgresql DIR`, POSTGRESQL_URL names its superuser.
start_throwaway_postgresql() {
  local data=$1 bin port run=()
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  [ "$(id -u)" -eq 0 ] && run=(runuser -u postgres --)
  rm -rf "$data"
  mkdir -p "$data"
  echo "test-postgres-password" >"$data/pwfile"
  [ "$(id -u)" -eq 0 ] && chown -R postgres "$data"
  "${run[@]}" "$bin/initdb" -D "$data/db" -U postgres --pwfile="$data/pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >"$data/initdb.log" 2>&1
  port=$(free_port)
  "${run[@]}" "$bin/postgres" -D "$data/db" -h 127.0.0.1 -p "$port" -k "$data" \
    -c max_connections=300 >"$data/server.log" 2>&1 &
  stop_on_exit $!
  wait_for_port "$port" 60
  POSTGRESQL_URL="postgres://postgres:test-postgres-password@127.0.0.1:$port/postgres"
  echo "== throwaway PostgreSQL on 127.0.0.1:$port (data in $data)"
}

# Redis (Debian's package) with a password on its default user and nothing kept on disk.
# After `start_throwaway_redis DIR`, REDIS_URL names its admin.
start_throwaway_redis() {
  local data=$1 port
  rm -rf "$data"
  mkdir -p "$data"
  port=$(free_port)
  redis-server --bind 127.0.0.1 --port "$port" --dir "$data" --save "" --appendonly no \
    --requirepass test-redis-password --logfile "$data/server.log" &
  stop_on_exit $!
  wait_for_port "$port" 30
  REDIS_URL="redis://default:test-redis-password@127.0.0.1:$port"
  echo "== throwaway Redis on 127.0.0.1:$port (data in $data)"
}
