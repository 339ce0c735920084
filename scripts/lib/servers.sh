# Sourced by scripts/test and scripts/bench: installs what is missing and starts throwaway
# servers with their data under the given directories, on free ports. Each stops when the
# shell exits. A server that does not start is named, the tail of its log printed, and the
# script exits non-zero (server_failed).
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
      galera-4) [ -f /usr/lib/galera/libgalera_smm.so ] || missing+=(galera-4) ;;
      bsdutils) command -v logger >/dev/null 2>&1 || missing+=(bsdutils) ;;
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

# Every server started here is stopped when the shell exits, and the directories in
# SERVER_DIRS (data kept outside the checkout) are removed then.
SERVER_PIDS=()
SERVER_DIRS=()
stop_servers() {
  local p
  # A server a test killed is gone already.
  for p in "${SERVER_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for p in "${SERVER_DIRS[@]}"; do rm -rf "$p"; done
}
stop_on_exit() {
  SERVER_PIDS+=("$1")
  trap stop_servers EXIT
}

# `server_failed NAME WHY LOG...`: says which server did not start and why, prints the last
# lines of each log given, and exits non-zero.
server_failed() {
  local name=$1 why=$2 log
  shift 2
  echo "!! $name did not start: $why" >&2
  for log in "$@"; do
    if [ -s "$log" ]; then
      echo "!! last lines of $log:" >&2
      tail -n 25 "$log" | sed 's/^/   | /' >&2
    else
      echo "!! $log is empty or missing" >&2
    fi
  done
  exit 1
}

# `wait_for_port PORT SECONDS PID`: waits until something accepts TCP connections on
# 127.0.0.1:PORT. With PID, fails as soon as that process has exited, and also when it exits
# just after the port answers (then someone else holds the port).
wait_for_port() {
  local port=$1 deadline=$((SECONDS + ${2:-30})) pid=${3:-}
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      echo "the process exited before answering on port $port"
      return 1
    fi
    [ $SECONDS -lt "$deadline" ] || { echo "nothing answers on port $port after ${2:-30} s"; return 1; }
    sleep 0.2
  done
  if [ -n "$pid" ]; then
    sleep 0.5
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the process exited although port $port answers (is another process using it?)"
      return 1
    fi
  fi
}

# `expect_port NAME PORT SECONDS PID LOG...`: wait_for_port, or server_failed with the logs.
expect_port() {
  local name=$1 port=$2 secs=$3 pid=$4 why
  shift 4
  why=$(wait_for_port "$port" "$secs" "$pid") || server_failed "$name" "$why" "$@"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# `make_test_certificate DIR`: a CA of the run's own (DIR/ca.pem) and a certificate for
# 127.0.0.1 signed by it (DIR/server.pem, DIR/server.key).
make_test_certificate() {
  local dir=$1
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=brokerage-test-ca \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 30 -out "$dir/server.pem" \
    -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n') 2>/dev/null
}

# MARIADB_ARGS: extra server options (the bench turns the performance schema on).
start_throwaway_mariadb() {
  local data=$1 mariadbd port pid sock link
  mariadbd=$(command -v mariadbd || echo /usr/sbin/mariadbd)
  rm -rf "$data"
  mkdir -p "$data"
  make_test_certificate "$data"
  # mariadb-install-db splits its paths at spaces: hand it a link without any.
  link=$(mktemp -d)
  SERVER_DIRS+=("$link")
  trap stop_servers EXIT
  ln -s "$data" "$link/data"
  mariadb-install-db --no-defaults --datadir="$link/data/db" --user="$(id -un)" \
    --auth-root-authentication-method=normal --skip-test-db >"$data/install.log" 2>&1 \
    || server_failed MariaDB "mariadb-install-db failed" "$data/install.log"
  port=$(free_port)
  sock=$data/sock
  "$mariadbd" --no-defaults --datadir="$data/db" --user="$(id -un)" --bind-address=127.0.0.1 \
    --port="$port" --socket="$sock" --pid-file="$data/pid" --skip-name-resolve \
    --max-connections=1000 --log-error="$data/error.log" ${MARIADB_ARGS:-} \
    --ssl-ca="$data/ca.pem" --ssl-cert="$data/server.pem" --ssl-key="$data/server.key" &
  pid=$!
  stop_on_exit $pid
  expect_port MariaDB "$port" 30 "$pid" "$data/error.log"
  for _ in $(seq 1 100); do
    if mariadb-admin --no-defaults --socket="$sock" -uroot ping >/dev/null 2>&1; then break; fi
    sleep 0.2
  done
  mariadb-admin --no-defaults --socket="$sock" -uroot ping >/dev/null 2>&1 \
    || server_failed MariaDB "it does not answer mariadb-admin ping" "$data/error.log"
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
  expect_port "MongoDB-compatible server (secantusdb, setup run)" "$port" 60 "$pid" "$data/setup.log"
  "$venv/bin/python" - "$port" >>"$data/setup.log" 2>&1 <<'PY' \
    || server_failed "MongoDB-compatible server (secantusdb)" "creating its admin user failed" "$data/setup.log"
import sys, pymongo
client = pymongo.MongoClient(f"mongodb://127.0.0.1:{sys.argv[1]}/?directConnection=true")
client.admin.command("createUser", "admin", pwd="test-admin-password",
                     roles=[{"role": "root", "db": "admin"}])
PY
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  "$venv/bin/secantusd-py" --host 127.0.0.1 --port "$port" --storage-path "$data/db" \
    --standalone --auth >"$data/server.log" 2>&1 &
  pid=$!
  stop_on_exit $pid
  expect_port "MongoDB-compatible server (secantusdb)" "$port" 60 "$pid" "$data/server.log"
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
  local -A pids=()
  prepare_swauth "$swauth" "$3"
  rm -rf "$data"
  mkdir -p "$data/etc" "$data/node/d1" "$data/run" "$data/log"
  proxy=$(free_port) account=$(free_port) container=$(free_port) object=$(free_port) memc=$(free_port)
  SWIFT_ADMIN_KEY=test-swauth-admin-key
  memcached -l 127.0.0.1 -p "$memc" -U 0 -u "$(id -un)" >"$data/log/memcached.log" 2>&1 &
  pids[memcached]=$!
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
    pids[$kind]=$!
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
  # which quotas read (also those the object server had to queue under load). No daemon
  # sweeps every few seconds: a test that waits for usage runs one sweep of each, on
  # demand (swift-*-updater SWIFT_UPDATERS_CONF --once).
  cat >"$data/etc/updaters.conf" <<CONF
[DEFAULT]
devices = $data/node
mount_check = false
swift_dir = $data/etc
user = $(id -un)
recon_cache_path = $data/run
[container-updater]
concurrency = 1
# Without it a sweep crawls (over 20 s for a few dozen containers).
containers_per_second = 1000
[object-updater]
concurrency = 1
CONF
  PYTHONPATH="$swauth" swift-proxy-server "$data/etc/proxy-server.conf" >"$data/log/proxy.log" 2>&1 &
  pids[proxy]=$!
  stop_on_exit $!
  expect_port "Swift memcached" "$memc" 30 "${pids[memcached]}" "$data/log/memcached.log"
  for kind in account container object; do
    eval "port=\$$kind"
    expect_port "Swift $kind server" "$port" 60 "${pids[$kind]}" "$data/log/$kind.log"
  done
  expect_port "Swift proxy (with swauth)" "$proxy" 60 "${pids[proxy]}" "$data/log/proxy.log"
  # swauth keeps its accounts in Swift itself: prepare its .auth account once.
  curl -fsS -o /dev/null -X POST -H "X-Auth-Admin-User: .super_admin" \
    -H "X-Auth-Admin-Key: $SWIFT_ADMIN_KEY" "http://127.0.0.1:$proxy/auth/v2/.prep" \
    2>"$data/log/prep.log" \
    || server_failed "Swift proxy (with swauth)" "swauth's .prep was refused" \
      "$data/log/prep.log" "$data/log/proxy.log"
  SWIFT_URL="http://127.0.0.1:$proxy"
  SWIFT_UPDATERS_CONF="$data/etc/updaters.conf"
  export SWIFT_ADMIN_KEY
  echo "== throwaway Swift with swauth on 127.0.0.1:$proxy (data in $data)"
}

# PostgreSQL (Debian's packages), password authentication over TCP. PostgreSQL refuses to
# run as root, so under root it runs as the postgres system user (the package creates it),
# and that user may not be able to enter the checkout (a clone in /root or in a 0700
# directory): its data directory is then one of its own under the system's temporary
# directory (`mktemp -d`, owned by postgres, removed on exit), and $1 keeps only a link to
# it and the logs. Run as any other user, the data lives under $1.
# After `start_throwaway_postgresql DIR`, POSTGRESQL_URL names its superuser,
# POSTGRESQL_TLS_URL a superuser that may log in over TLS only, and POSTGRESQL_CA the CA of
# the server's certificate.
start_throwaway_postgresql() {
  local data=$1 bin port pid run=() db
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$bin" ] || server_failed PostgreSQL "no /usr/lib/postgresql/*/bin/initdb is installed"
  rm -rf "$data"
  mkdir -p "$data"
  db=$data
  if [ "$(id -u)" -eq 0 ]; then
    run=(runuser -u postgres --)
    db=$(mktemp -d "${TMPDIR:-/tmp}/brokerage-test-postgresql.XXXXXX")
    chown postgres "$db"
    ln -s "$db" "$data/private"
    SERVER_DIRS+=("$db")
    trap stop_servers EXIT
  fi
  "${run[@]}" sh -c 'echo test-postgres-password >"$1/pwfile"' sh "$db"
  "${run[@]}" "$bin/initdb" -D "$db/db" -U postgres --pwfile="$db/pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >"$data/initdb.log" 2>&1 \
    || server_failed PostgreSQL "initdb failed (data directory $db/db)" "$data/initdb.log"
  # TLS with a certificate from a CA of the run's own; tls_admin may log in over TLS only.
  make_test_certificate "$data"
  if [ "$db" != "$data" ]; then
    cp "$data/server.pem" "$data/server.key" "$db/"
    chown postgres "$db/server.pem" "$db/server.key"
  fi
  chmod 600 "$db/server.key"
  POSTGRESQL_CA=$data/ca.pem
  "${run[@]}" sh -c 'printf "hostnossl all tls_admin all reject\n" | cat - "$1" >"$1.new" && mv "$1.new" "$1"' \
    sh "$db/db/pg_hba.conf"
  port=$(free_port)
  "${run[@]}" "$bin/postgres" -D "$db/db" -h 127.0.0.1 -p "$port" -k "$db" \
    -c max_connections=300 -c ssl=on -c ssl_cert_file="$db/server.pem" \
    -c ssl_key_file="$db/server.key" >"$data/server.log" 2>&1 &
  pid=$!
  stop_on_exit $pid
  expect_port PostgreSQL "$port" 60 "$pid" "$data/server.log"
  "${run[@]}" "$bin/psql" -h "$db" -p "$port" -U postgres -d postgres -q \
    -c "CREATE ROLE tls_admin LOGIN SUPERUSER PASSWORD 'test-tls-admin-password'" \
    >>"$data/server.log" 2>&1 \
    || server_failed PostgreSQL "creating its TLS-only admin failed" "$data/server.log"
  POSTGRESQL_URL="postgres://postgres:test-postgres-password@127.0.0.1:$port/postgres"
  POSTGRESQL_TLS_URL="postgres://tls_admin:test-tls-admin-password@127.0.0.1:$port/postgres"
  echo "== throwaway PostgreSQL on 127.0.0.1:$port, TLS too (data in $db/db, logs in $data)"
}

# Redis (Debian's package) with a password on its default user and nothing kept on disk.
# After `start_throwaway_redis DIR`, REDIS_URL names its admin, REDIS_TLS_URL the same over
# TLS, and REDIS_CA the CA of the server's certificate.
start_throwaway_redis() {
  local data=$1 port pid tls_port
  rm -rf "$data"
  mkdir -p "$data"
  port=$(free_port)
  tls_port=$(free_port)
  make_test_certificate "$data"
  redis-server --bind 127.0.0.1 --port "$port" --dir "$data" --save "" --appendonly no \
    --requirepass test-redis-password --logfile "$data/server.log" \
    --tls-port "$tls_port" --tls-cert-file "$data/server.pem" --tls-key-file "$data/server.key" \
    --tls-ca-cert-file "$data/ca.pem" --tls-auth-clients no &
  pid=$!
  stop_on_exit $pid
  expect_port Redis "$port" 30 "$pid" "$data/server.log"
  expect_port "Redis (TLS)" "$tls_port" 30 "$pid" "$data/server.log"
  REDIS_URL="redis://default:test-redis-password@127.0.0.1:$port"
  REDIS_TLS_URL="rediss://default:test-redis-password@127.0.0.1:$tls_port"
  REDIS_CA=$data/ca.pem
  echo "== throwaway Redis on 127.0.0.1:$port, TLS on $tls_port (data in $data)"
}
