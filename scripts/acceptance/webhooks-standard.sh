#!/usr/bin/env bash
# Webhook signatures against an independent verifier: the `standardwebhooks` package from PyPI
# (the Standard Webhooks reference library for Python). Sluice signs with a `whsec_` secret and,
# being rotated out, a previous plain-string secret; a Python receiver verifies every POST with
# each secret on its own (the `webhook-signature` header carries one signature per secret) and
# refuses one with a tampered body. The events come from a campaign with refused recipients
# (`rejected` events at ingest), so no SMTP peer is needed.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release/sluice"
[ -x "$bin" ] || { echo "webhooks-standard: build first (cargo build --release)" >&2; exit 1; }
py="$("$root/scripts/setup-dkimpy")"

# shellcheck source=../lib/peers.sh
source "$root/scripts/lib/peers.sh"
start_work
api=127.0.0.1:18029
hook=127.0.0.1:18030
for p in "${api/:/ }" "${hook/:/ }"; do
  # shellcheck disable=SC2086
  port_free $p || { echo "webhooks-standard: $p is busy" >&2; exit 1; }
done

# A Standard Webhooks secret as their libraries make them: whsec_ and 24 random bytes in base64.
secret="whsec_$(head -c 24 /dev/urandom | base64 -w0)"
previous="previous-secret-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
key=acceptance-key-0123456789

cat >"$work/sluice.toml" <<CONF
[http]
listen = "$api"
[auth]
api_keys = ["$key"]
[secrets]
token_keys = ["acceptance-token-key-0123456789"]
[spool]
path = "$work/spool"
[log]
level = "warn"
delivery_log = "$work/delivery.jsonl"
[delivery]
enabled = false
[[webhook]]
name = "standard"
url = "http://$hook/hook"
secret = "$secret"
previous_secrets = ["$previous"]
events = ["rejected"]
batch_size = 5
CONF
"$bin" check-config --config "$work/sluice.toml" >/dev/null

# The receiver: verifies each POST with each secret, records what it saw, answers 204.
"$py" - "$hook" "$secret" "$previous" "$work/received.jsonl" <<'PY' &
import base64, http.server, json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

host, port = sys.argv[1].split(":")
current = Webhook(sys.argv[2])
# A plain-string secret is its own bytes as the key: the library takes it as whsec_<base64>.
previous = Webhook("whsec_" + base64.b64encode(sys.argv[3].encode()).decode())
out = sys.argv[4]

class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        headers = {k.lower(): v for k, v in self.headers.items()}
        seen = {"id": headers.get("webhook-id"), "signatures": headers.get("webhook-signature", "").count("v1,")}
        for name, wh in (("current", current), ("previous", previous)):
            try:
                wh.verify(body, headers)
                seen[name] = True
            except WebhookVerificationError as e:
                seen[name] = str(e)
        try:
            current.verify(body.replace(b"rejected", b"REJECTED", 1), headers)
            seen["tampered"] = "accepted"
        except WebhookVerificationError:
            seen["tampered"] = "refused"
        seen["events"] = [e["id"] for e in json.loads(body)]
        with open(out, "a") as f:
            f.write(json.dumps(seen) + "\n")
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer((host, int(port)), Hook).serve_forever()
PY
pids+=($!)
for _ in $(seq 1 50); do port_free "${hook%:*}" "${hook#*:}" || break; sleep 0.1; done

start_sluice "$bin" "$work/sluice.toml" "$work/sluice.log" "$api"

# Twelve refused recipients (no @): twelve `rejected` events, in batches of five.
recipients=$(python3 -c 'import json; print(json.dumps([{"email": "nobody%d" % i} for i in range(12)] + [{"email": "ok@example.org"}]))')
code=$(curl -s -o "$work/answer.json" -w '%{http_code}' -X POST "http://$api/v1/campaigns" \
  -H "Authorization: Bearer $key" -H 'content-type: application/json' \
  -d "{\"from\":\"news@example.com\",\"subject\":\"s\",\"text\":\"t\",\"recipients\":$recipients}")
[ "$code" = 202 ] || { echo "webhooks-standard: campaign answered $code: $(cat "$work/answer.json")" >&2; exit 1; }

python3 - "$work/received.jsonl" <<'PY'
import json, sys, time
path = sys.argv[1]
deadline = time.time() + 30
posts = []
while time.time() < deadline:
    try:
        posts = [json.loads(l) for l in open(path)]
    except FileNotFoundError:
        posts = []
    if sum(len(p["events"]) for p in posts) >= 12:
        break
    time.sleep(0.2)
events = [e for p in posts for e in p["events"]]
assert len(events) == 12 and len(set(events)) == 12, posts
for p in posts:
    assert p["current"] is True, p
    assert p["previous"] is True, p
    assert p["signatures"] == 2, p
    assert p["tampered"] == "refused", p
    assert p["id"] and p["id"].startswith("msg_"), p
assert len({p["id"] for p in posts}) == len(posts), posts
print(f"webhooks-standard: {len(posts)} POSTs, {len(events)} events, each verified by standardwebhooks "
      f"with the whsec_ secret and with the previous one; a tampered body refused")
PY
