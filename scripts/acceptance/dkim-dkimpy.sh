#!/usr/bin/env bash
# DKIM against an independent verifier. NSD serves the public keys on 127.0.0.1:5354; Sluice signs
# 1,000 messages for rsa.dkim.test (RSA-2048 alone, a PKCS#1 key) and 1,000 for dual.dkim.test
# (RSA-2048 + ed25519) and delivers them to Postfix's smtp-sink, which captures each one; dkimpy,
# resolving through dnspython pointed at NSD, must verify every signature of every message, and
# List-Unsubscribe and List-Unsubscribe-Post must be covered by each signature's h=. The messages
# mix 7-bit text with lines that begin with a dot (and a lone dot), non-ASCII subjects, names and
# bodies, lines far over 998 octets in the template, HTML alternatives and a binary attachment.
# A campaign that is not personalised per domain adds shared messages, several recipients each,
# signed once: they must verify too.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release/sluice"
[ -x "$bin" ] || { echo "dkim-dkimpy: build first (cargo build --release)" >&2; exit 1; }
"$root/scripts/setup-peers"
py="$("$root/scripts/setup-dkimpy")"

# shellcheck source=../lib/peers.sh
source "$root/scripts/lib/peers.sh"
start_work
dns_port=5354
sink_port=12525
api=127.0.0.1:18026
for p in "127.0.0.1 $dns_port" "127.0.0.1 $sink_port" "${api/:/ }"; do
  # shellcheck disable=SC2086
  port_free $p || { echo "dkim-dkimpy: $p is busy" >&2; exit 1; }
done

# --- Keys, made by OpenSSL (not by Sluice) -----------------------------------------------------
mkdir -p "$work/keys"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/keys/rsa8.pem" 2>/dev/null
openssl rsa -in "$work/keys/rsa8.pem" -traditional -out "$work/keys/rsa.pem" 2>/dev/null  # PKCS#1
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/keys/rsa2.pem" 2>/dev/null
openssl genpkey -algorithm ed25519 -out "$work/keys/ed.pem"

mkdir -p "$work/nsd"
cat >"$work/nsd/dkim.test.zone" <<ZONE
\$ORIGIN dkim.test.
\$TTL 60
@ SOA ns.dkim.test. admin.dkim.test. 1 3600 600 86400 60
@ NS ns.dkim.test.
ns A 127.0.0.1
s1._domainkey.rsa TXT $(txt "v=DKIM1; k=rsa; p=$(rsa_pub "$work/keys/rsa.pem")")
r1._domainkey.dual TXT $(txt "v=DKIM1; k=rsa; p=$(rsa_pub "$work/keys/rsa2.pem")")
e1._domainkey.dual TXT $(txt "v=DKIM1; k=ed25519; p=$(ed_pub "$work/keys/ed.pem")")
ZONE
start_nsd "$work/nsd" dkim.test $dns_port
for _ in $(seq 1 50); do
  dig +short +time=1 +tries=1 @127.0.0.1 -p $dns_port TXT e1._domainkey.dual.dkim.test | grep -q DKIM1 && break
  sleep 0.1
done
dig +short @127.0.0.1 -p $dns_port TXT s1._domainkey.rsa.dkim.test | grep -q DKIM1 || { cat "$work/nsd/nsd.log" >&2; exit 1; }

# --- Sink ---------------------------------------------------------------------------------------
mkdir -p "$work/mail"
chown nobody "$work/mail" 2>/dev/null || chmod 777 "$work/mail"
user=()
[ "$(id -u)" -eq 0 ] && user=(-u nobody)
smtp-sink "${user[@]}" -d "$work/mail/%Y%m%d%H%M%S." "127.0.0.1:$sink_port" 256 &
pids+=($!)

# --- Sluice -------------------------------------------------------------------------------------
cat >"$work/sluice.toml" <<CONF
[http]
listen = "$api"
[auth]
api_keys = ["dkim-test-key"]
[secrets]
token_keys = ["peer-token-key-0123456789"]
[spool]
path = "$work/spool"
[log]
level = "info"
delivery_log = "$work/delivery.jsonl"
[dns]
nameservers = ["127.0.0.1:$dns_port"]
[delivery]
ehlo_name = "mta.dkim.test"
retry_initial = "1s"
[bounce]
domain = "bounces.dkim.test"
[message]
unsubscribe_url = "https://mta.dkim.test/u/"
unsubscribe_mailto = "unsubscribe@bounces.dkim.test"
[[route]]
domain = "inbox.test"
relay = "127.0.0.1:$sink_port"
[[dkim]]
domain = "rsa.dkim.test"
selector = "s1"
algorithm = "rsa-sha256"
key_file = "$work/keys/rsa.pem"
[[dkim]]
domain = "dual.dkim.test"
selector = "r1"
algorithm = "rsa-sha256"
key_file = "$work/keys/rsa2.pem"
[[dkim]]
domain = "dual.dkim.test"
selector = "e1"
algorithm = "ed25519-sha256"
key_file = "$work/keys/ed.pem"
CONF
"$bin" check-config --config "$work/sluice.toml" >/dev/null
start_sluice "$bin" "$work/sluice.toml" "$work/sluice.log" "$api"

"$py" - "$api" "$work" "$dns_port" <<'PY'
import base64, collections, functools, glob, json, os, random, sys, time, urllib.request
import dkim, dkim.util, dns.resolver
api, work, dns_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
KEY = "dkim-test-key"
PER_DOMAIN = 1000

def call(method, path, body=None):
    req = urllib.request.Request(f"http://{api}{path}", method=method,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read())

long_line = "word " * 400  # 2,000 octets on one template line
random.seed(7)
blob = base64.b64encode(bytes(random.getrandbits(8) for _ in range(3000))).decode()
shapes = [
    # 7-bit text sent as is: dot-stuffing on the wire must be undone before hashing.
    {"subject": "Plain {{ n }}", "text": "Hello {{ name }}\n.leading dot\n..two dots\n.\nend\n"},
    # Long lines and non-ASCII text: quoted-printable.
    {"subject": "Grüße, {{ name }} — 日本語 {{ n }}", "text": long_line + "\nKäse für {{ name }}\n.dot after\n"},
    # Alternatives with a non-ASCII display name.
    {"subject": "Ünïcode {{ n }}", "text": "Hi {{ name }}", "html": "<p>Hi <b>{{ name }}</b> ✓</p>\n<p>.x</p>",
     "from_name": "Zoë Ñews"},
    # An attachment with a non-ASCII file name.
    {"subject": "Attachment {{ n }}", "text": "See the file, {{ name }}.\n", "html": "<p>See the file</p>",
     "attachments": [{"filename": "résumé.bin", "content_type": "application/octet-stream", "content_base64": blob}]},
]
expected = collections.Counter()
for domain in ("rsa.dkim.test", "dual.dkim.test"):
    for s, shape in enumerate(shapes):
        n = PER_DOMAIN // len(shapes)
        body = dict(shape)
        body["from"] = f"news@{domain}"
        body["tags"] = [f"shape{s}"]
        body["recipients"] = [{"email": f"{domain.split('.')[0]}{s}x{i}@inbox.test",
                               "vars": {"n": i, "name": f"Ännä .{i}"}} for i in range(n)]
        status, resp = call("POST", "/v1/campaigns", body)
        assert status == 202 and resp["accepted"] == n, resp
        expected[domain] += n
# Not personalised: one shared message per transaction to several recipients, signed once.
MERGED = 60
merged_rcpts = collections.Counter()
for domain in ("rsa.dkim.test", "dual.dkim.test"):
    body = {"from": f"news@{domain}", "subject": "The same for everyone",
            "text": "One message, many recipients.\n.dot line\n", "personalised": False,
            "recipients": [{"email": f"{domain.split('.')[0]}m{i}@inbox.test"} for i in range(MERGED)]}
    status, resp = call("POST", "/v1/campaigns", body)
    assert status == 202 and resp["accepted"] == MERGED, resp
    merged_rcpts[domain] += MERGED

def rcpts(path):
    """Recipients of a captured transaction: smtp-sink writes one X-Rcpt-Args line for each."""
    with open(path, "rb") as f:
        return f.read(16384).split(b"\n\n", 1)[0].count(b"\nX-Rcpt-Args:")

total = sum(expected.values()) + sum(merged_rcpts.values())
deadline = time.time() + 180
files = []
while time.time() < deadline:
    files = glob.glob(os.path.join(work, "mail", "*"))
    if sum(rcpts(f) for f in files) >= total:
        break
    time.sleep(0.5)
time.sleep(0.5)
files = glob.glob(os.path.join(work, "mail", "*"))

resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = dns_port
@functools.lru_cache(maxsize=None)
def dnsfunc(name, timeout=5):
    qname = name.decode() if isinstance(name, bytes) else name
    answer = resolver.resolve(qname, "TXT", lifetime=timeout)
    return b"".join(b"".join(r.strings) for r in answer)

def message_of(path):
    raw = open(path, "rb").read().replace(b"\r\n", b"\n")
    # smtp-sink prepends X-Client-*/X-Helo/X-Mail/X-Rcpt fields and a Received field: ordinary,
    # unsigned header fields that DKIM ignores. Lines are LF; give the verifier CRLF.
    return raw.replace(b"\n", b"\r\n")

failures = []
verified = collections.Counter()
merged_msgs = collections.Counter()
merged_seen = collections.Counter()
single = []
algs = collections.Counter()
for path in files:
    msg = message_of(path)
    head = msg.split(b"\r\n\r\n", 1)[0]
    headers, _ = dkim.rfc822_parse(msg)
    sigs = [(n, v) for n, v in headers if n.lower() == b"dkim-signature"]
    if not sigs:
        failures.append(f"{os.path.basename(path)}: no DKIM-Signature"); continue
    d = dkim.DKIM(msg)
    domain = None
    for idx, (_, value) in enumerate(sigs):
        tags = dkim.util.parse_tag_value(value)
        domain = tags[b"d"].decode()
        h = [x.strip().lower() for x in tags[b"h"].split(b":")]
        for need in (b"list-unsubscribe", b"list-unsubscribe-post", b"from"):
            if need not in h:
                failures.append(f"{os.path.basename(path)}: {need.decode()} not in h= of signature {idx}")
        if h.count(b"from") < 2:
            failures.append(f"{os.path.basename(path)}: From not over-signed")
        try:
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
        except Exception as e:
            ok = False
            failures.append(f"{os.path.basename(path)}: signature {idx} ({tags[b'a'].decode()}): {e}")
        if ok:
            algs[(domain, tags[b"a"].decode())] += 1
        elif len(failures) < 20:
            failures.append(f"{os.path.basename(path)}: signature {idx} ({tags[b'a'].decode()}, s={tags[b's'].decode()}) does not verify")
    if b"\nTo: undisclosed-recipients:;" in head:
        merged_msgs[domain] += 1
        merged_seen[domain] += rcpts(path)
        continue
    single.append(path)
    if b"\nList-Unsubscribe-Post: List-Unsubscribe=One-Click" not in head:
        failures.append(f"{os.path.basename(path)}: no List-Unsubscribe-Post")
    verified[domain] += 1

# The verifier must be able to say no: a changed List-Unsubscribe or body breaks every signature.
for path in single[:5]:
    msg = message_of(path)
    for tampered in (msg.replace(b"List-Unsubscribe: <https://mta.dkim.test/u/", b"List-Unsubscribe: <https://evil.test/u/", 1),
                     msg[:-40] + msg[-40:].replace(b"\r\n", b"\r\nX", 1)):
        assert tampered != msg
        headers, _ = dkim.rfc822_parse(tampered)
        n = sum(1 for k, _ in headers if k.lower() == b"dkim-signature")
        d = dkim.DKIM(tampered)
        def passes(i):
            try:
                return d.verify(idx=i, dnsfunc=dnsfunc)
            except dkim.ValidationError:
                return False
        if n == 0 or any(passes(i) for i in range(n)):
            failures.append(f"{os.path.basename(path)}: a tampered copy still verifies")

# The shapes really made it onto the wire.
features = collections.Counter()
for path in files:
    m = open(path, "rb").read()
    for name, needle in (("dot lines", b"\n.leading dot\n..two dots\n.\n"), ("quoted-printable", b"quoted-printable"),
                         ("encoded subject", b"Subject: =?utf-8?"), ("attachment", b"multipart/mixed"),
                         ("alternative", b"multipart/alternative")):
        if needle in m:
            features[name] += 1
quarter = PER_DOMAIN // len(shapes) * 2
for name in ("dot lines", "encoded subject", "attachment"):
    if features[name] < quarter:
        failures.append(f"only {features[name]} messages with {name}, want at least {quarter}")

want_algs = {("rsa.dkim.test", "rsa-sha256"): expected["rsa.dkim.test"] + merged_msgs["rsa.dkim.test"],
             ("dual.dkim.test", "rsa-sha256"): expected["dual.dkim.test"] + merged_msgs["dual.dkim.test"],
             ("dual.dkim.test", "ed25519-sha256"): expected["dual.dkim.test"] + merged_msgs["dual.dkim.test"]}
if len(single) != sum(expected.values()):
    failures.append(f"the sink captured {len(single)} personalised messages, want {sum(expected.values())}")
if merged_seen != merged_rcpts:
    failures.append(f"shared messages reached {dict(merged_seen)} recipients, want {dict(merged_rcpts)}")
if not any(rcpts(f) > 1 for f in files):
    failures.append("no captured message had more than one recipient")
if dict(algs) != want_algs:
    failures.append(f"verified signatures {dict(algs)}, want {want_algs}")
if failures:
    print("dkim-dkimpy: FAILED"); print("\n".join(failures[:40])); sys.exit(1)
print(f"dkim-dkimpy: ok ({len(files)} messages captured, {sum(merged_msgs.values())} of them shared by "
      f"{sum(merged_seen.values())} recipients; dkimpy verified {dict(algs)}; {dict(features)})")
PY
