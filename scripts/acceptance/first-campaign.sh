#!/usr/bin/env bash
# The README's first campaign, as a new user runs it: the release binary with config/sluice.toml
# unchanged (development key, spool under var/), from a scratch working directory, then the
# README's curl commands. Checks the 202 and that GET shows the recipients queued.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release/sluice"
[ -x "$bin" ] || { echo "first-campaign: build first (cargo build --release)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/config"
# Tests never reach past loopback, so the copy has delivery switched off; nothing else changes.
sed 's/^enabled = true$/enabled = false/' "$root/config/sluice.toml" >"$work/config/sluice.toml"
grep -q '^enabled = false$' "$work/config/sluice.toml"
cd "$work"
if curl -s -o /dev/null http://127.0.0.1:8025/healthz; then
  echo "first-campaign: something already listens on 127.0.0.1:8025" >&2
  exit 1
fi
"$bin" check-config --config config/sluice.toml
"$bin" serve --config config/sluice.toml 2>"$work/sluice.log" &
pid=$!
for _ in $(seq 1 300); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8025/readyz)" = 200 ] && break
  sleep 0.1
done

# The README's example, verbatim apart from capturing the output.
out=$(curl -sS -w '\n%{http_code}' -X POST http://127.0.0.1:8025/v1/campaigns \
  -H 'Authorization: Bearer change-me' -H 'Content-Type: application/json' \
  -d '{
        "from": "news@example.com",
        "from_name": "Example News",
        "subject": "Hello {{ first_name }}",
        "text": "Hi {{ first_name }}, this week at Example...",
        "html": "<p>Hi {{ first_name }}, this week at Example...</p>",
        "recipients": [
          {"email": "ann@example.org", "vars": {"first_name": "Ann"}},
          {"email": "bob@example.net", "vars": {"first_name": "Bob"}}
        ]
      }')
code=$(tail -n1 <<<"$out")
body=$(head -n1 <<<"$out")
[ "$code" = 202 ] || { echo "first-campaign: POST answered $code: $body" >&2; cat "$work/sluice.log" >&2; exit 1; }
id=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["accepted"]==2, d; print(d["id"])' "$body")
got=$(curl -sS "http://127.0.0.1:8025/v1/campaigns/$id" -H 'Authorization: Bearer change-me')
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["state"]=="active" and d["counts"]["queued"]==2, d' "$got"
[ -d "$work/var/spool" ] || { echo "first-campaign: no spool under var/" >&2; exit 1; }
echo "first-campaign: ok (campaign $id queued 2 recipients)"
