# Shared by the acceptance scripts (sourced, not run): port checks and a local NSD.

# port_free HOST PORT: true when nothing accepts TCP connections there.
port_free() { ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# start_nsd DIR ZONE PORT: serves DIR/ZONE.zone as ZONE on 127.0.0.1:PORT (UDP and TCP), with
# its state and log under DIR, in the foreground of a background job whose pid joins `pids`.
start_nsd() {
  local dir=$1 zone=$2 port=$3
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
zone:
  name: $zone
  zonefile: $zone.zone
CONF
  nsd -d -c "$dir/nsd.conf" &
  pids+=($!)
}
