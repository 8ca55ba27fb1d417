#!/usr/bin/env bash
# The Grafana dashboards against a real Prometheus: Debian's prometheus scrapes Sluice every
# second while it delivers to Postfix's smtp-sink (accepting, bouncing and deferring sinks), takes
# a DSN over HTTP, an ARF complaint and a relay attempt over its bounce listener, a one-click
# unsubscribe, a manual suppression, a webhook receiver and a tenant over its request rate. Then every PromQL expression of every
# panel and template variable in dashboards/*.json is evaluated through Prometheus's HTTP API:
# each must parse and return data, and every sluice_* metric it names must exist.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release/sluice"
[ -x "$bin" ] || { echo "dashboards: build first (cargo build --release)" >&2; exit 1; }
"$root/scripts/setup-peers"

# shellcheck source=../lib/peers.sh
source "$root/scripts/lib/peers.sh"
start_work

api=127.0.0.1:18125
prom=127.0.0.1:19190
inbound=127.0.0.1:12526
hook=127.0.0.1:18126
for hp in "$api" "$prom" "$inbound" "$hook" 127.0.0.1:12525 127.0.0.1:12527 127.0.0.1:12528; do
  port_free "${hp%:*}" "${hp#*:}" || { echo "dashboards: $hp is busy" >&2; exit 1; }
done

# --- SMTP sinks --------------------------------------------------------------------------------
user=()
[ "$(id -u)" -eq 0 ] && user=(-u nobody)
mkdir -p "$work/mail"
[ "$(id -u)" -eq 0 ] && chown nobody "$work/mail"
smtp-sink "${user[@]}" -d "$work/mail/%Y%m%d-%H%M%S." 127.0.0.1:12525 128 & pids+=($!)
smtp-sink "${user[@]}" -f RCPT -B "550 5.1.1 no such user" 127.0.0.1:12527 128 & pids+=($!)
smtp-sink "${user[@]}" -r RCPT -b "452 4.2.2 mailbox full" 127.0.0.1:12528 128 & pids+=($!)

# --- DKIM key ----------------------------------------------------------------------------------
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/dkim.pem" 2>/dev/null

# --- Sluice ------------------------------------------------------------------------------------
cat >"$work/sluice.toml" <<CONF
[http]
listen = "$api"
[auth]
api_keys = ["dashboards-test-key"]
[secrets]
token_keys = ["peer-token-key-0123456789"]
[spool]
path = "$work/spool"
[log]
level = "info"
delivery_log = "$work/delivery.jsonl"
[delivery]
ehlo_name = "mta.sluice.test"
retry_initial = "1h"
[bounce]
domain = "bounces.sluice.test"
listen = "$inbound"
feedback_addresses = ["fbl@bounces.sluice.test"]
[message]
unsubscribe_url = "http://$api/u/"
[[dkim]]
domain = "sluice.test"
selector = "s1"
algorithm = "rsa-sha256"
key_file = "$work/dkim.pem"
[[rule]]
name = "ok-provider"
match = "ok.sluice.test"
max_connections = 4
[[route]]
domain = "ok.sluice.test"
relay = "127.0.0.1:12525"
[[route]]
domain = "bounce.sluice.test"
relay = "127.0.0.1:12527"
[[route]]
domain = "full.sluice.test"
relay = "127.0.0.1:12528"
[[webhook]]
name = "dashboards"
url = "http://$hook/events"
secret = "dashboards-webhook-secret"
[[tenant]]
name = "shop"
api_keys = ["dashboards-shop-key"]
sending_domains = ["shop.sluice.test"]
rate = "2/s"
CONF
"$bin" check-config --config "$work/sluice.toml" >/dev/null
start_sluice "$bin" "$work/sluice.toml" "$work/sluice.log" "$api"

# --- Prometheus --------------------------------------------------------------------------------
cat >"$work/prometheus.yml" <<CONF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: sluice
    static_configs:
      - targets: ["$api"]
CONF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus" \
  --web.listen-address="$prom" >"$work/prometheus.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  curl -sf "http://$prom/-/ready" >/dev/null && break
  sleep 0.2
done
curl -sf "http://$prom/-/ready" >/dev/null || { cat "$work/prometheus.log" >&2; exit 1; }

python3 - "$api" "$prom" "$inbound" "$hook" "$work" "$root" <<'PY' || { tail -20 "$work/sluice.log" >&2; exit 1; }
import glob, http.server, json, os, re, smtplib, sys, threading, time, urllib.error, urllib.parse, urllib.request
api, prom, inbound, hook, work, root = sys.argv[1:7]
KEY = "dashboards-test-key"

# A webhook receiver that takes every batch.
received = []
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        received.extend(json.loads(body))
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass
h, p = hook.split(":")
srv = http.server.ThreadingHTTPServer((h, int(p)), Hook)
threading.Thread(target=srv.serve_forever, daemon=True).start()

def call(method, path, body=None, ctype="application/json", raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://{api}{path}", method=method, data=data,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
        return r.status, (json.loads(text) if text.strip().startswith(b"{") else text)

def prom_get(path, **params):
    url = f"http://{prom}{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())

# Prometheus being ready does not mean it has scraped Sluice yet. A delivery finished before the
# first scrape leaves every histogram flat from its first sample on: its rate() is 0 and the
# latency panels' quantiles have nothing to show. So the campaign waits for a first scrape.
deadline = time.time() + 30
while not any(r["value"][1] == "1" for r in prom_get("/api/v1/query", query='up{job="sluice"}')["data"]["result"]):
    assert time.time() < deadline, "Prometheus did not scrape Sluice within 30 s"
    time.sleep(0.2)

recipients = ([{"email": f"u{i}@ok.sluice.test", "vars": {"n": i}} for i in range(400)]
    + [{"email": f"b{i}@bounce.sluice.test", "vars": {"n": i}} for i in range(40)]
    + [{"email": f"f{i}@full.sluice.test", "vars": {"n": i}} for i in range(40)])
status, body = call("POST", "/v1/campaigns", {"from": "news@sluice.test", "subject": "Dash {{ n }}",
    "text": "Hello {{ n }}", "html": "<p>Hello {{ n }}</p>", "recipients": recipients})
assert status == 202, body
cid = body["id"]
deadline = time.time() + 120
while True:
    _, c = call("GET", f"/v1/campaigns/{cid}")
    k = c["counts"]
    if k["delivered"] == 400 and k["bounced"] == 40 and k["deferred"] == 40:
        break
    assert time.time() < deadline, f"delivery did not finish: {k}"
    time.sleep(0.2)

# Feedback on captured messages: a DSN over HTTP, an ARF complaint and a relay attempt over the
# listener, a one-click unsubscribe.
files = sorted(glob.glob(os.path.join(work, "mail", "*")))
assert len(files) >= 3, f"smtp-sink captured {len(files)} files"
def header(text, name):
    m = re.search(rf"^{name}: (.*)$", text, re.M | re.I)
    return m.group(1).strip() if m else ""
msgs = [open(f, errors="replace").read() for f in files[:3]]
def fill(template, msg):
    t = open(os.path.join(root, "tests/data/reports", template)).read()
    t = "\n".join(l for l in t.splitlines() if not l.startswith("# expect"))
    rcpt = re.search(r"<([^>]+)>", header(msg, "X-Rcpt-Args") or "<x@ok.sluice.test>").group(1)
    verp = (re.search(r"<([^>]*)>", header(msg, "X-Mail-Args")) or re.search("(.*)", "")).group(1) or "bounce@bounces.sluice.test"
    return (t.replace("{{REF}}", header(msg, "X-Sluice-Ref")).replace("{{RCPT}}", rcpt)
             .replace("{{VERP}}", verp).replace("{{FEEDBACK}}", "fbl@bounces.sluice.test")
             .replace("\n", "\r\n"))
status, body = call("POST", "/v1/feedback", raw=fill("postfix.eml", msgs[0]).encode(), ctype="message/rfc822")
assert status == 200 and body.get("result") == "applied", body
with smtplib.SMTP(*inbound.split(":")) as s:
    s.ehlo("reporter.example")
    s.sendmail("", ["fbl@bounces.sluice.test"], fill("arf-redacted.eml", msgs[1]).encode())
    code, _ = s.rcpt("someone@elsewhere.example") if s.mail("") else (None, None)
    assert code and code >= 500, f"relay attempt answered {code}"
unsub = re.search(r"<(http://[^>]+/u/[^>]+)>", header(msgs[2], "List-Unsubscribe")).group(1)
req = urllib.request.Request(unsub, method="POST", data=b"List-Unsubscribe=One-Click",
    headers={"Content-Type": "application/x-www-form-urlencoded"})
assert urllib.request.urlopen(req, timeout=10).status == 200
call("PUT", "/v1/suppressions/blocked@ok.sluice.test", {"reason": "manual"})
status, body = call("POST", "/v1/campaigns", {"from": "news@sluice.test", "subject": "Again",
    "text": "Hi", "recipients": [{"email": "blocked@ok.sluice.test"}, {"email": "u400@ok.sluice.test"}]})
assert status == 202 and len(body["suppressed"]) == 1, body

# A tenant sends a little, then goes over its rate of 2 requests a second (429s).
def as_shop(method, path, body=None):
    req = urllib.request.Request(f"http://{api}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": "Bearer dashboards-shop-key", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
assert as_shop("POST", "/v1/campaigns", {"from": "news@shop.sluice.test", "subject": "Shop", "text": "Hi",
    "recipients": [{"email": f"s{i}@ok.sluice.test"} for i in range(20)]}) == 202
assert 429 in [as_shop("GET", "/v1/campaigns") for _ in range(6)], "the tenant's rate never answered 429"

# Let Prometheus scrape the end state a few times.
time.sleep(6)

names = set(prom_get("/api/v1/label/__name__/values")["data"])
SUBS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "${site}": ".*", "$site": ".*",
        "${source}": ".*", "$source": ".*", "${domain}": ".*", "$domain": ".*"}
failures, checked = [], 0
for path in sorted(glob.glob(os.path.join(root, "dashboards", "*.json"))):
    d = json.load(open(path))
    exprs = []
    for p in d["panels"]:
        if p.get("datasource", {}).get("uid") != "${datasource}":
            failures.append(f"{os.path.basename(path)}: panel {p['title']!r}: datasource is not the variable")
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", v["query"]["query"])
            if not m:
                failures.append(f"{os.path.basename(path)}: variable {v['name']}: unsupported query")
                continue
            exprs.append((f"variable {v['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    for title, expr in exprs:
        q = expr
        for k, v in SUBS.items():
            q = q.replace(k, v)
        where = f"{os.path.basename(path)}: {title}: {expr}"
        for metric in set(re.findall(r"\bsluice_\w+", q)):
            if metric not in names:
                failures.append(f"{where}: metric {metric} does not exist")
        try:
            r = prom_get("/api/v1/query", query=q)
        except urllib.error.HTTPError as e:
            failures.append(f"{where}: {e.code} {e.read().decode(errors='replace')}")
            continue
        if r.get("status") != "success":
            failures.append(f"{where}: {r}")
        elif not r["data"]["result"]:
            failures.append(f"{where}: no data")
        checked += 1
if not received:
    failures.append("the webhook receiver got no events")
if failures:
    print("dashboards: FAILED"); print("\n".join(failures)); sys.exit(1)
print(f"dashboards: ok ({checked} expressions over {len(glob.glob(os.path.join(root, 'dashboards', '*.json')))} dashboards returned data; {len(names)} metric names scraped; {len(received)} webhook events)")
PY
