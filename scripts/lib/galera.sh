# Sourced after scripts/lib/servers.sh: a throwaway three-node MariaDB Galera cluster (the
# seed's MySQL topology) from Debian's packages (galera-4, rsync), on free loopback ports.
#
# After `start_throwaway_galera LINK`, GALERA_URLS holds one admin URL per node
# (mysql://root@127.0.0.1:PORT, space-separated), GALERA_PORTS their ports, GALERA_PIDS their
# processes and GALERA_DATA the directory with node0..node2 (each with run.sh, pid, sock,
# error.log); the nodes stop and their data goes when the shell exits. `galera_node_start I`
# starts node I (0-based) again after it was killed; it rejoins by IST.
#
# Under root the nodes run as the `mysql` user: rsync's state transfer cannot enter a
# root-only directory, and a checkout may well live in one (a 0700 temporary directory).
# The data therefore lives in a directory of its own that the mysql user can enter, and
# LINK (under target/) points at it, so the nodes' logs can be read where the checkout is.

GALERA_DATA=""
GALERA_URLS=""
GALERA_PIDS=()
GALERA_PORTS=()
GALERA_GCOMM=()
GALERA_IST=()
GALERA_SST=()

# A free port below the kernel's ephemeral range (32768 and up): a node restarted after a
# kill gets its ports back, which an outgoing connection could otherwise have taken.
galera_port() {
  python3 -c 'import random, socket
while True:
    p = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); print(p); break
    except OSError:
        pass'
}

galera_node_start() {
  local i=$1 dir=$GALERA_DATA/node$1 peers="" j user mariadbd
  mariadbd=$(command -v mariadbd || echo /usr/sbin/mariadbd)
  user=$(id -un)
  [ "$(id -u)" -ne 0 ] || user=mysql
  for j in 0 1 2; do peers+="${peers:+,}127.0.0.1:${GALERA_GCOMM[$j]}"; done
  local extra=()
  if [ "${2:-}" = new ]; then extra+=(--wsrep-new-cluster); fi
  # The node's command, written out so that a test can start the node again after killing it
  # (`bash node$i/run.sh`); it rejoins by IST.
  {
    echo '#!/usr/bin/env bash'
    printf 'mariadbd=%q dir=%q\n' "$mariadbd" "$dir"
    printf 'args=('
    printf ' %q' --no-defaults --user="$user" --datadir="$dir/db" --port="${GALERA_PORTS[$i]}" \
      --socket="$dir/sock" --pid-file="$dir/pid" --bind-address=127.0.0.1 --skip-name-resolve \
      --log-error="$dir/error.log" --max-connections=1000 \
      --wsrep-on=ON --wsrep-provider=/usr/lib/galera/libgalera_smm.so \
      --wsrep-cluster-name=brokerage-test --wsrep-cluster-address="gcomm://$peers" \
      --wsrep-node-name="node$i" --wsrep-node-address="127.0.0.1:${GALERA_GCOMM[$i]}" \
      --wsrep-provider-options="gmcast.listen_addr=tcp://127.0.0.1:${GALERA_GCOMM[$i]};ist.recv_addr=127.0.0.1:${GALERA_IST[$i]};gcache.size=256M" \
      --wsrep-sst-receive-address="127.0.0.1:${GALERA_SST[$i]}" --wsrep-sst-method=rsync \
      --binlog-format=ROW --innodb-autoinc-lock-mode=2 --default-storage-engine=InnoDB
    echo ' )'
    # After a crash the node's position is unknown (seqno -1): it is recovered from InnoDB
    # first, as Debian's galera_recovery does, so that the node rejoins by IST. Without it
    # the node asks for a full state transfer, and an rsync donor blocks writes meanwhile.
    cat <<'RECOVER'
if grep -q '^seqno: *-1' "$dir/db/grastate.dat" 2>/dev/null; then
  "$mariadbd" "${args[@]}" --wsrep-recover --log-error="$dir/recover.log" >/dev/null 2>&1 || true
  pos=$(sed -n 's/.*WSREP: Recovered position: *//p' "$dir/recover.log" | tail -n 1)
  if [ -n "$pos" ]; then
    # The saved state is what the node asks the cluster for: rewritten in place (its owner,
    # the server's user, stays).
    state=$(sed "s/^uuid:.*/uuid:    ${pos%:*}/; s/^seqno:.*/seqno:   ${pos##*:}/" "$dir/db/grastate.dat")
    printf '%s\n' "$state" >"$dir/db/grastate.dat"
    args+=(--wsrep-start-position="$pos")
  fi
fi
exec "$mariadbd" "${args[@]}" "$@"
RECOVER
  } >"$dir/run.sh"
  bash "$dir/run.sh" "${extra[@]}" 2>>"$dir/stderr.log" &
  GALERA_PIDS[$i]=$!
  stop_on_exit "${GALERA_PIDS[$i]}"
  # Joined: the node answers and reports itself synced with the cluster.
  local deadline=$((SECONDS + 90)) state=""
  while [ $SECONDS -lt $deadline ]; do
    if ! kill -0 "${GALERA_PIDS[$i]}" 2>/dev/null; then
      server_failed "Galera node $i" "its process exited" "$dir/error.log"
    fi
    state=$(mariadb --no-defaults --socket="$dir/sock" -uroot -N -e \
      "SHOW STATUS LIKE 'wsrep_local_state_comment'" 2>/dev/null | cut -f2) || true
    [ "$state" = Synced ] && return 0
    sleep 0.3
  done
  server_failed "Galera node $i" "not synced after 90 s (state: ${state:-no answer})" "$dir/error.log"
}

# Stops every node by its pid file: a test may have started a node again itself, as a process
# this shell does not know. Waits until they are gone, before their data is removed.
stop_galera() {
  local f pids=() p deadline=$((SECONDS + 60))
  for f in "$GALERA_DATA"/node*/pid; do
    [ -f "$f" ] && pids+=("$(cat "$f")")
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true
  done
  stop_servers
  return 0
}

start_throwaway_galera() {
  local link=$1 i
  ensure_packages mariadb-server galera-4 rsync
  GALERA_DATA=$(mktemp -d /tmp/brokerage-galera.XXXXXX)
  chmod 0755 "$GALERA_DATA"
  SERVER_DIRS+=("$GALERA_DATA")
  trap stop_galera EXIT
  rm -rf "$link"
  mkdir -p "$(dirname "$link")"
  ln -s "$GALERA_DATA" "$link"
  for i in 0 1 2; do
    mkdir -p "$GALERA_DATA/node$i/db"
    GALERA_PORTS[$i]=$(galera_port)
    GALERA_GCOMM[$i]=$(galera_port)
    GALERA_IST[$i]=$(galera_port)
    GALERA_SST[$i]=$(galera_port)
  done
  mariadb-install-db --no-defaults --datadir="$GALERA_DATA/node0/db" --user="$(id -un)" \
    --auth-root-authentication-method=normal --skip-test-db >"$GALERA_DATA/install.log" 2>&1 \
    || server_failed "Galera node 0" "mariadb-install-db failed" "$GALERA_DATA/install.log"
  [ "$(id -u)" -ne 0 ] || chown -R mysql:mysql "$GALERA_DATA"
  galera_node_start 0 new
  # Any client over TCP may act as root: the cluster is loopback-only and throwaway.
  mariadb --no-defaults --socket="$GALERA_DATA/node0/sock" -uroot -e \
    "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION" \
    || server_failed "Galera node 0" "creating the TCP root user failed" "$GALERA_DATA/node0/error.log"
  galera_node_start 1
  galera_node_start 2
  trap stop_galera EXIT
  GALERA_URLS=""
  for i in 0 1 2; do GALERA_URLS+="${GALERA_URLS:+ }mysql://root@127.0.0.1:${GALERA_PORTS[$i]}"; done
  echo "== throwaway Galera cluster: $GALERA_URLS (data in $GALERA_DATA, linked from $link)"
}
