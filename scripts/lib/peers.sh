# Shared by the acceptance scripts and benchmarks (sourced, not run): a work directory with
# cleanup, port checks and a local NSD.

# start_work: makes $work (a temporary directory others may read: smtp-sink runs as nobody and
# writes below it) and an EXIT trap that kills every pid in `pids` and removes $work.
start_work() {
  work="$(mktemp -d)"
  chmod 755 "$work"
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
}

# port_free HOST PORT: true when nothing accepts TCP connections there.
port_free() { ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# start_nsd DIR ZONE PORT [ZONE...]: serves DIR/ZONE.zone as ZONE (and each further zone from its
# file alike) on 127.0.0.1:PORT (UDP and TCP), with its state and log under DIR, in the
# foreground of a background job whose pid joins `pids`.
start_nsd() {
  local dir=$1 zone=$2 port=$3
  shift 3
  cat >"$dir/nsd.conf" <<CONF
server:
  ip-address: 127.0.0.1@$port
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: "$dir"
  pidfile: "$dir/nsd.pid"
  xfrdfile: "$dir/xfrd.state"
  zonelistfile: "$dir/zone.list"
  database: ""
  logfile: "$dir/nsd.log"
  verbosity: 1
remote-control:
  control-enable: no
CONF
  local z
  for z in "$zone" "$@"; do
    printf 'zone:\n  name: %s\n  zonefile: %s.zone\n' "$z" "$z" >>"$dir/nsd.conf"
  done
  nsd -d -c "$dir/nsd.conf" &
  pids+=($!)
}
