#!/usr/bin/env bash
# Delivery against real peers: NSD serves a test zone on 127.0.0.1:5353, Postfix's smtp-sink
# listens on several 127.0.0.x:25 addresses (root needed for port 25), and Sluice delivers a
# campaign whose recipients cover MX preference, fail-over, equal preference, implicit MX, null
# MX, NXDOMAIN (bounced once a second lookup confirms it), an MX host without address, a refused
# DNS answer, and sinks answering 450, 550 or dropping the connection. Each recipient must end in
# the right state with the right log.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release/sluice"
[ -x "$bin" ] || { echo "delivery-peers: build first (cargo build --release)" >&2; exit 1; }
if [ "$(id -u)" -ne 0 ]; then echo "delivery-peers: needs root for port 25; skipped" >&2; exit 1; fi
"$root/scripts/setup-peers"

# shellcheck source=../lib/peers.sh
source "$root/scripts/lib/peers.sh"
start_work

# --- DNS -------------------------------------------------------------------------------------
mkdir -p "$work/nsd"
cat >"$work/nsd/sluice.test.zone" <<'ZONE'
$ORIGIN sluice.test.
$TTL 60
@            SOA  ns.sluice.test. admin.sluice.test. 1 3600 600 86400 60
@            NS   ns.sluice.test.
ns           A    127.0.0.1
mx1          A    127.0.0.2
mx2          A    127.0.0.3
dead         A    127.0.0.9
mx4          A    127.0.0.4
mx5          A    127.0.0.5
mx6          A    127.0.0.6
pref         MX   10 mx1
pref         MX   20 mx2
failover     MX   10 dead
failover     MX   20 mx2
equal        MX   10 mx1
equal        MX   10 mx2
implicit     A    127.0.0.2
nullmx       MX   0 .
noaddr       MX   10 ghost
tempfail     MX   10 mx4
reject       MX   10 mx5
drop         MX   10 mx6
ZONE
# PTR records for the egress-source check of `sluice check-config` (end of this script).
cat >"$work/nsd/0.0.127.in-addr.arpa.zone" <<'ZONE'
$ORIGIN 0.0.127.in-addr.arpa.
$TTL 60
@            SOA  ns.sluice.test. admin.sluice.test. 1 3600 600 86400 60
@            NS   ns.sluice.test.
2            PTR  mx1.sluice.test.
3            PTR  mx2.sluice.test.
ZONE
port_free 127.0.0.1 5353 || { echo "delivery-peers: 127.0.0.1:5353 is busy" >&2; exit 1; }
start_nsd "$work/nsd" sluice.test 5353 0.0.127.in-addr.arpa
for _ in $(seq 1 50); do
  dig +short +time=1 +tries=1 @127.0.0.1 -p 5353 MX pref.sluice.test | grep -q mx1 && break
  sleep 0.1
done
dig +short @127.0.0.1 -p 5353 MX pref.sluice.test | grep -q mx1 || { cat "$work/nsd/nsd.log" >&2; exit 1; }

# --- SMTP sinks --------------------------------------------------------------------------------
sink() { # ip, options...
  local ip=$1; shift
  port_free "$ip" 25 || { echo "delivery-peers: $ip:25 is busy" >&2; exit 1; }
  mkdir -p "$work/mail/$ip"
  chown nobody "$work/mail/$ip"
  smtp-sink -u nobody "$@" -d "$work/mail/$ip/%Y%m%d-%H%M%S." "$ip:25" 128 &
  pids+=($!)
}
sink 127.0.0.2
sink 127.0.0.3
sink 127.0.0.4 -r RCPT -b "450 4.2.1 mailbox busy"
sink 127.0.0.5 -f RCPT -B "550 5.1.1 no such user"
sink 127.0.0.6 -q RCPT
sleep 0.3

# --- Sluice ------------------------------------------------------------------------------------
api=127.0.0.1:18025
cat >"$work/sluice.toml" <<CONF
[http]
listen = "$api"
[auth]
api_keys = ["peer-test-key"]
[secrets]
token_keys = ["peer-token-key-0123456789"]
[spool]
path = "$work/spool"
[log]
level = "info"
delivery_log = "$work/delivery.jsonl"
[dns]
nameservers = ["127.0.0.1:5353"]
timeout = "2s"
# An NXDOMAIN bounces once a second lookup a second later confirms it.
confirm_nxdomain_after = "1s"
[delivery]
ehlo_name = "sluice.sluice.test"
smtp_port = 25
retry_initial = "1h"
site_backoff = "1h"
connect_timeout = "3s"
[shaping]
tls = "opportunistic"
# A connection per message, so the split between equal-preference hosts does not hang on how
# many connections happened to open.
[[rule]]
match = "equal.sluice.test"
max_messages_per_connection = 1
CONF
start_sluice "$bin" "$work/sluice.toml" "$work/sluice.log" "$api"

python3 - "$api" "$work" <<'PY'
import json, os, sys, time, urllib.request
api, work = sys.argv[1], sys.argv[2]
KEY = "peer-test-key"
# recipient -> (expected log type, dsn status prefix, where it must land or None)
cases = {
    "a@pref.sluice.test": ("d", "2.", "127.0.0.2"),
    "b@pref.sluice.test": ("d", "2.", "127.0.0.2"),
    "a@failover.sluice.test": ("d", "2.", "127.0.0.3"),
    "a@implicit.sluice.test": ("d", "2.", "127.0.0.2"),
    "a@nullmx.sluice.test": ("b", "5.1.10", None),
    "a@nxdomain.sluice.test": ("b", "5.1.2", None),
    "a@noaddr.sluice.test": ("t", "4.4.4", None),
    "a@refused.example.org": ("t", "4.4.3", None),
    "a@tempfail.sluice.test": ("t", "4.2.1", None),
    "a@reject.sluice.test": ("b", "5.1.1", None),
    "a@drop.sluice.test": ("t", "4.4.2", None),
}
equal = [f"e{i}@equal.sluice.test" for i in range(40)]
def call(method, path, body=None):
    req = urllib.request.Request(f"http://{api}{path}", method=method,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())
status, body = call("POST", "/v1/campaigns", {
    "from": "news@sluice.test", "subject": "Peer test {{ n }}", "text": "Hello {{ n }}",
    # equal.* first: its MX set is pref.*'s with other preferences, which must not share a site.
    "recipients": [{"email": e, "vars": {"n": i}} for i, e in enumerate(equal + list(cases))]})
assert status == 202 and body["accepted"] == len(cases) + len(equal), body
cid = body["id"]
want_final = sum(1 for t, _, _ in cases.values() if t != "t") + len(equal)
deadline = time.time() + 90
records = []
while time.time() < deadline:
    path = os.path.join(work, "delivery.jsonl")
    records = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    seen = {r["recipient"] for r in records}
    confirmed = any(r["recipient"] == "a@nxdomain.sluice.test" and r["type"] == "b" for r in records)
    if all(r in seen for r in list(cases) + equal) and confirmed:
        break
    time.sleep(0.2)
by = {}
for r in records:
    by.setdefault(r["recipient"], []).append(r)
failures = []
for rcpt, (kind, status_prefix, ip) in cases.items():
    got = by.get(rcpt)
    if not got:
        failures.append(f"{rcpt}: no log record"); continue
    r = got[0]
    if rcpt == "a@nxdomain.sluice.test":
        # Deferred until a second lookup confirms the NXDOMAIN, then bounced.
        if r["type"] != "t" or r["dsn_status"] != "4.4.3" or "to be confirmed" not in r["dsn_diag"]:
            failures.append(f"{rcpt}: want a deferral awaiting confirmation first, got {r}")
        r = got[-1]
    if r["type"] != kind or not r["dsn_status"].startswith(status_prefix) or (ip and r.get("mx_ip") != ip):
        failures.append(f"{rcpt}: want {kind} {status_prefix} {ip or ''}, got {r['type']} {r['dsn_status']} {r.get('mx_ip')} {r['dsn_diag']}")
ips = {}
for e in equal:
    got = by.get(e)
    if not got or got[0]["type"] != "d":
        failures.append(f"{e}: not delivered: {got}"); continue
    ips[got[0]["mx_ip"]] = ips.get(got[0]["mx_ip"], 0) + 1
if set(ips) != {"127.0.0.2", "127.0.0.3"}:
    failures.append(f"equal-preference MX hosts did not both get mail: {ips}")
_, got = call("GET", f"/v1/campaigns/{cid}")
c = got["counts"]
delivered = sum(1 for t, _, _ in cases.values() if t == "d") + len(equal)
bounced = sum(1 for t, _, _ in cases.values() if t == "b")
deferred = sum(1 for t, _, _ in cases.values() if t == "t")
if (c["delivered"], c["bounced"], c["deferred"]) != (delivered, bounced, deferred):
    failures.append(f"counts {c}, want delivered {delivered} bounced {bounced} deferred {deferred}")
# What the sinks captured: one file per delivered transaction, with our Subject.
captured = 0
for ip in ("127.0.0.2", "127.0.0.3"):
    d = os.path.join(work, "mail", ip)
    for f in os.listdir(d):
        text = open(os.path.join(d, f), errors="replace").read()
        if "Subject: Peer test" in text:
            captured += 1
if captured != delivered:
    failures.append(f"sinks captured {captured} messages, want {delivered}")
if failures:
    print("delivery-peers: FAILED"); print("\n".join(failures)); sys.exit(1)
print(f"delivery-peers: ok ({delivered} delivered, {bounced} bounced, {deferred} deferred; equal MX split {ips})")
PY

# --- check-config: each egress source's PTR against its EHLO name (forward-confirmed), through NSD
cat >"$work/sources.toml" <<CONF
[auth]
api_keys = ["peer-test-key"]
[secrets]
token_keys = ["peer-token-key-0123456789"]
[spool]
path = "$work/spool-check"
[dns]
nameservers = ["127.0.0.1:5353"]
timeout = "2s"
[[source]]
name = "matching"
address = "127.0.0.2"
ehlo_name = "mx1.sluice.test"
[[source]]
name = "mismatched"
address = "127.0.0.3"
ehlo_name = "mta.sluice.test"
[[source]]
name = "unnamed"
address = "127.0.0.7"
ehlo_name = "mta7.sluice.test"
CONF
"$bin" check-config --config "$work/sources.toml" >"$work/check.out" 2>"$work/check.err" \
  || { cat "$work/check.err" >&2; echo "delivery-peers: check-config failed" >&2; exit 1; }
grep -q 'source\[1\].ehlo_name: warning: the PTR record of 127.0.0.3 gives mx2.sluice.test, not the EHLO name mta.sluice.test' "$work/check.err" \
  && grep -q 'source\[2\].ehlo_name: warning: 127.0.0.7 has no PTR record' "$work/check.err" \
  && ! grep -q 'source\[0\]' "$work/check.err" \
  || { cat "$work/check.err" >&2; echo "delivery-peers: PTR warnings wrong" >&2; exit 1; }
echo "delivery-peers: check-config PTR warnings ok"
