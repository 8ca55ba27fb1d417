# Shared by the acceptance scripts and benchmarks (sourced, not run): a work directory with
# cleanup, port checks, a local NSD, DKIM key records and starting Sluice.

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

# DKIM key records: rsa_pub and ed_pub print a PEM key's public half as the p= value; txt splits a
# record into quoted strings of at most 200 octets (a TXT string holds 255).
rsa_pub() { openssl pkey -in "$1" -pubout -outform DER 2>/dev/null | base64 -w0; }
ed_pub() { openssl pkey -in "$1" -pubout -outform DER 2>/dev/null | tail -c 32 | base64 -w0; }
txt() { echo "$1" | fold -w 200 | sed 's/.*/"&"/' | tr '\n' ' '; }

# start_sluice BIN CONFIG LOG API: `BIN serve --config CONFIG` in the background (stderr to LOG,
# pid into `pids`), then waits up to 10 s for http://API/readyz to answer 200.
start_sluice() {
  "$1" serve --config "$2" 2>"$3" &
  pids+=($!)
  local _
  for _ in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$4/readyz")" = 200 ] && return 0
    sleep 0.1
  done
  echo "sluice did not become ready at $4; see $3" >&2
  return 1
}
