#!/usr/bin/env bash
# The README's first campaign, as a new user runs it: what scripts/run does (the development DKIM
# key, `sluice sink` on 127.0.0.1:2525, the node with config/sluice.toml unchanged), from a
# scratch working directory, then the README's commands. Checks the 202, that both messages are
# captured by the sink with DKIM passing, that nothing was suppressed, the campaign's counts, and
# that the captured one-click unsubscribe link works against the node.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release/sluice"
[ -x "$bin" ] || { echo "first-campaign: build first (cargo build --release)" >&2; exit 1; }
work="$(mktemp -d)"
pid="" sink=""
trap 'kill $pid $sink 2>/dev/null || true; wait $pid $sink 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/config"
# The shipped config as is: it routes every domain to the sink on loopback.
cp "$root/config/sluice.toml" "$work/config/sluice.toml"
cd "$work"
# shellcheck source=../lib/peers.sh
source "$root/scripts/lib/peers.sh"
for port in 8025 2525; do
  port_free 127.0.0.1 $port || { echo "first-campaign: 127.0.0.1:$port is busy" >&2; exit 1; }
done
# What scripts/run does before starting the node.
# shellcheck source=../lib/dev-key.sh
source "$root/scripts/lib/dev-key.sh"
dev_key .
"$bin" sink --listen 127.0.0.1:2525 --dir var/sink 2>"$work/sink.log" &
sink=$!
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
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["state"]=="active" and d["counts"]["queued"]+d["counts"]["delivered"]==2, d' "$got"
[ -d "$work/var/spool" ] || { echo "first-campaign: no spool under var/" >&2; exit 1; }

# The README's next steps: the captured messages, then the campaign's counts.
export SLUICE_API_KEY=change-me
for _ in $(seq 1 100); do
  [ "$(ls var/sink/*.eml 2>/dev/null | wc -l)" -ge 2 ] && break
  sleep 0.1
done
"$bin" sink --list >"$work/list.txt"
cat "$work/list.txt"
[ "$(grep -c 'DKIM: pass (d=example.com s=dev)' "$work/list.txt")" = 2 ] \
  || { echo "first-campaign: two messages with a passing signature expected" >&2; exit 1; }
grep -q '2 of 2 messages' "$work/list.txt" || { echo "first-campaign: not two messages" >&2; exit 1; }
"$bin" campaign show "$id" | tee "$work/show.txt"
grep -q 'delivered 2 ' "$work/show.txt" || { echo "first-campaign: not delivered 2" >&2; exit 1; }
# Nothing was suppressed.
supp=$(curl -sS http://127.0.0.1:8025/v1/suppressions -H 'Authorization: Bearer change-me')
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["items"]==[], d' "$supp"
# The captured one-click unsubscribe link works against the running node.
link=$(sed -n 's/^    Unsubscribe: //p' "$work/list.txt" | head -n1)
[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST -d 'List-Unsubscribe=One-Click' "$link")" = 200 ] \
  || { echo "first-campaign: the unsubscribe link $link failed" >&2; exit 1; }
echo "first-campaign: ok (campaign $id: 2 delivered to the sink, DKIM passing, nothing suppressed, unsubscribe link works)"
