#!/usr/bin/env bash
# The API against its OpenAPI description, with tools from PyPI (scripts/setup-contract):
#  1. `sluice openapi` validates with openapi-spec-validator and is what GET /v1/openapi.json
#     serves;
#  2. schemathesis runs every operation of it against a running Sluice: examples, coverage
#     (boundary and invalid values of every parameter and body), fuzzing, and stateful
#     sequences along the description's links (a campaign created, then read, paused, resumed,
#     given recipients, cancelled...), checking that no answer is a 5xx and that every status,
#     content type and body conforms to the description;
#  3. a Python client generated from it by openapi-python-client creates a campaign, uploads
#     recipients, pages through suppressions and reads the campaign back.
# Delivery is off: nothing leaves the machine whatever the generated recipients are.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release/sluice"
[ -x "$bin" ] || { echo "openapi-contract: build first (cargo build --release)" >&2; exit 1; }
tools="$("$root/scripts/setup-contract")"
# Test cases per operation and phase; the seed makes a CI run repeatable (any seed must pass:
# `SEED=random` draws one, printed in the output).
examples="${CONTRACT_EXAMPLES:-25}"
seed="${SEED:-20261204}"

# shellcheck source=../lib/peers.sh
source "$root/scripts/lib/peers.sh"
start_work
api=127.0.0.1:18032
# shellcheck disable=SC2086
port_free ${api/:/ } || { echo "openapi-contract: $api is busy" >&2; exit 1; }
key=contract-operator-key-0123456789
client_key=contract-client-key-0123456789

cat >"$work/sluice.toml" <<CONF
[http]
listen = "$api"
[auth]
api_keys = ["$key"]
[secrets]
token_keys = ["contract-token-key-0123456789"]
[spool]
path = "$work/spool"
[log]
level = "warn"
delivery_log = "$work/delivery.jsonl"
[delivery]
enabled = false
# The generated client's tenant: its lists hold only what the client made.
[[tenant]]
name = "client"
api_keys = ["$client_key"]
sending_domains = ["example.com"]
CONF
"$bin" check-config --config "$work/sluice.toml" >/dev/null

# 1. The description is valid OpenAPI 3.1, and the one served.
"$bin" openapi >"$work/openapi.json"
"$tools/openapi-spec-validator" "$work/openapi.json" >/dev/null
start_sluice "$bin" "$work/sluice.toml" "$work/sluice.log" "$api"
curl -sf "http://$api/v1/openapi.json" >"$work/served.json"
python3 - "$work/openapi.json" "$work/served.json" <<'PY'
import json, sys
printed, served = (json.load(open(p)) for p in sys.argv[1:3])
assert printed == served, "sluice openapi and GET /v1/openapi.json differ"
ops = sum(1 for item in printed["paths"].values() for m in item if m in ("get", "put", "post", "delete"))
print(f"openapi-contract: the description validates (OpenAPI {printed['openapi']}, {len(printed['paths'])} paths, {ops} operations) and is the one served")
PY

# 2. schemathesis. Bodies of the non-JSON types: NDJSON lines of the described objects, and
# the text of message/rfc822 (a raw message or report) as it is generated.
cat >"$work/hooks.py" <<'PY'
import json
import schemathesis

@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    rows = value if isinstance(value, list) else [value]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()

schemathesis.serializer.alias("message/rfc822", "text/plain")
PY
seed_arg=(--seed "$seed")
[ "$seed" = random ] && seed_arg=()
set +e
# (Run from $work: schemathesis keeps its reports in the working directory.)
(cd "$work" && PYTHONPATH="$work" SCHEMATHESIS_HOOKS=hooks "$tools/schemathesis" run "$work/openapi.json" \
  --url "http://$api" -H "Authorization: Bearer $key" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing,stateful --max-examples "$examples" "${seed_arg[@]}" \
  --workers 2 --no-color --warnings off >"$work/schemathesis.txt" 2>&1)
rc=$?
set -e
if [ $rc -ne 0 ]; then
  cat "$work/schemathesis.txt" >&2
  echo "openapi-contract: schemathesis failed (rc $rc); sluice's log: $(tail -5 "$work/sluice.log")" >&2
  exit 1
fi
python3 - "$work/schemathesis.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
tested = re.search(r"Tested: (\d+)", text)
cases = re.search(r"(\d+) generated, (\d+) passed", text)
seed = re.search(r"Seed: (\d+)", text)
scenarios = re.search(r"Scenarios: +(\d+)", text)
links = re.search(r"API Links: +(\d+) covered / (\d+) selected", text)
assert tested and cases and scenarios and links, text[-3000:]
print(f"openapi-contract: schemathesis passed: {tested.group(1)} operations, {cases.group(1)} test cases, "
      f"{scenarios.group(1)} stateful scenarios along {links.group(1)} of {links.group(2)} links "
      f"(seed {seed.group(1) if seed else '?'})")
PY

# 3. A generated client. openapi-python-client has no serializer for NDJSON, CSV or
# message/rfc822 bodies: it is told to send them as given bytes (a File with the payload), under
# their own Content-Type.
cat >"$work/client.yaml" <<'YAML'
content_type_overrides:
  application/x-ndjson: application/octet-stream
  message/rfc822: application/octet-stream
  text/csv: application/octet-stream
YAML
"$tools/openapi-python-client" generate --path "$work/openapi.json" --output-path "$work/sluice_client" \
  --meta none --config "$work/client.yaml" >"$work/generate.txt" 2>&1 \
  || { cat "$work/generate.txt" >&2; echo "openapi-contract: the client was not generated" >&2; exit 1; }
PYTHONPATH="$work" "$tools/python" - "http://$api" "$client_key" <<'PY'
import datetime, json, sys
from sluice_client import AuthenticatedClient
from sluice_client.api.campaigns import add_recipients, create_campaign, get_campaign, list_campaigns
from sluice_client.api.suppressions import list_suppressions, put_suppression
from sluice_client.models import (Accepted, Campaign, CampaignList, Error, NewCampaign,
                                  PutSuppression, Suppression, SuppressionList)
from sluice_client.types import File

client = AuthenticatedClient(base_url=sys.argv[1], token=sys.argv[2])

def ok(resp, model):
    assert isinstance(resp.parsed, model), (resp.status_code, resp.content[:500])
    return resp.parsed

# Suppressions first: one of the recipients below is on the list.
for i in range(5):
    ok(put_suppression.sync_detailed(f"gone{i}@example.net", client=client,
                                     body=PutSuppression.from_dict({"reason": "manual", "source": "client"})),
       Suppression)
campaign = ok(create_campaign.sync_detailed(client=client, idempotency_key="client-create-1", body=NewCampaign.from_dict({
    "from": "News <news@example.com>",
    "subject": "Hello {{ name }}",
    "text": "Dear {{ name }}, hello.",
    "tags": ["client"],
    "recipients": [{"email": "ann@example.org", "vars": {"name": "Ann"}}],
})), Accepted)
assert campaign.accepted == 1, campaign
lines = b"".join(json.dumps({"email": e, "vars": {"name": n}}).encode() + b"\n"
                 for e, n in [("bob@example.org", "Bob"), ("cy@example.org", "Cy"), ("gone3@example.net", "X")])
added = ok(add_recipients.sync_detailed(campaign.id, client=client, idempotency_key="client-upload-1",
                                        body=File(payload=lines)), Accepted)
assert (added.accepted, added.suppressed_count) == (2, 1), added

# Suppressions, two to a page, by next_cursor.
seen, cursor, pages = [], None, 0
while True:
    kwargs = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
    page = ok(list_suppressions.sync_detailed(client=client, **kwargs), SuppressionList)
    pages += 1
    seen += [s.address for s in page.items]
    assert all(isinstance(s.created_at, datetime.datetime) for s in page.items), page
    if not page.next_cursor:
        break
    cursor = page.next_cursor
assert sorted(seen) == [f"gone{i}@example.net" for i in range(5)], seen
assert pages == 3, pages

# The campaign back, and the campaign list a page at a time.
c = ok(get_campaign.sync_detailed(campaign.id, client=client), Campaign)
assert (c.state, c.from_, c.counts.queued, c.counts.suppressed) == ("active", "news@example.com", 3, 1), c
assert c.created_at.tzinfo is not None and c.tags == ["client"], c
listed = ok(list_campaigns.sync_detailed(client=client, limit=1), CampaignList)
assert len(listed.campaigns) == 1 and listed.total >= 1, listed
missing = get_campaign.sync_detailed("01234567-89ab-7def-8123-456789abcdef", client=client)
assert missing.status_code == 404 and isinstance(missing.parsed, Error), missing
assert missing.parsed.error.code.value == "campaign_not_found", missing.parsed
print(f"openapi-contract: the generated client created campaign {campaign.id}, added 2 recipients "
      f"(1 suppressed), paged through 5 suppressions in {pages} pages and read the campaign back "
      f"({c.counts.queued} queued)")
PY
