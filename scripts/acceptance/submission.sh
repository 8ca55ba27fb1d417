#!/usr/bin/env bash
# SMTP submission against real clients. swaks submits over STARTTLS with AUTH PLAIN (an API key
# as the password) from 127.0.0.5, and is refused before TLS, with a wrong key, and as an
# unauthenticated relay; Postfix's smtp-source submits 2,000 messages of 10 KB from the trusted
# network 127.0.0.1/32. Every message reaches smtp-sink DKIM-signed and dkimpy, resolving through
# NSD, verifies every signature. Python's smtplib submits, with RET=HDRS, ENVID and NOTIFY, to a
# domain NSD says does not exist: the bounce comes back to the submitter's MAIL FROM as a DSN
# that Python's email package reads as RFC 3464 (per-recipient fields, the returned header, no
# body), and the same with NOTIFY=NEVER gives none.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release/sluice"
[ -x "$bin" ] || { echo "submission: build first (cargo build --release)" >&2; exit 1; }
"$root/scripts/setup-peers"
py="$("$root/scripts/setup-dkimpy")"

# shellcheck source=../lib/peers.sh
source "$root/scripts/lib/peers.sh"
start_work
dns_port=5356
sink_port=12527
sub_port=12588
api=127.0.0.1:18027
key="submission-test-key"
for p in "127.0.0.1 $dns_port" "127.0.0.1 $sink_port" "127.0.0.1 $sub_port" "${api/:/ }"; do
  # shellcheck disable=SC2086
  port_free $p || { echo "submission: $p is busy" >&2; exit 1; }
done

# --- Keys and certificate, made by OpenSSL -------------------------------------------------------
mkdir -p "$work/keys"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/keys/rsa.pem" 2>/dev/null
openssl genpkey -algorithm ed25519 -out "$work/keys/ed.pem"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=submit.sub.test" -keyout "$work/keys/tls.key" -out "$work/keys/tls.crt" 2>/dev/null

mkdir -p "$work/nsd"
cat >"$work/nsd/sub.test.zone" <<ZONE
\$ORIGIN sub.test.
\$TTL 60
@ SOA ns.sub.test. admin.sub.test. 1 3600 600 86400 60
@ NS ns.sub.test.
ns A 127.0.0.1
r1._domainkey TXT $(txt "v=DKIM1; k=rsa; p=$(rsa_pub "$work/keys/rsa.pem")")
e1._domainkey TXT $(txt "v=DKIM1; k=ed25519; p=$(ed_pub "$work/keys/ed.pem")")
ZONE
start_nsd "$work/nsd" sub.test $dns_port
for _ in $(seq 1 50); do
  dig +short +time=1 +tries=1 @127.0.0.1 -p $dns_port TXT e1._domainkey.sub.test | grep -q DKIM1 && break
  sleep 0.1
done

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
api_keys = ["$key"]
[secrets]
token_keys = ["peer-token-key-0123456789"]
[spool]
path = "$work/spool"
[log]
level = "info"
delivery_log = "$work/delivery.jsonl"
[dns]
nameservers = ["127.0.0.1:$dns_port"]
confirm_nxdomain_after = "1s"
[delivery]
ehlo_name = "mta.sub.test"
retry_initial = "1s"
[bounce]
domain = "bounces.sub.test"
[submission]
listen = "127.0.0.1:$sub_port"
tls_cert = "$work/keys/tls.crt"
tls_key = "$work/keys/tls.key"
trusted_networks = ["127.0.0.1/32"]
max_auth_failures = 3
[[route]]
domain = "inbox.test"
relay = "127.0.0.1:$sink_port"
[[route]]
domain = "back.test"
relay = "127.0.0.1:$sink_port"
[[dkim]]
domain = "sub.test"
selector = "r1"
algorithm = "rsa-sha256"
key_file = "$work/keys/rsa.pem"
[[dkim]]
domain = "sub.test"
selector = "e1"
algorithm = "ed25519-sha256"
key_file = "$work/keys/ed.pem"
CONF
"$bin" check-config --config "$work/sluice.toml" >/dev/null
start_sluice "$bin" "$work/sluice.toml" "$work/sluice.log" "$api"

fail() { echo "submission: $*" >&2; tail -20 "$work/sluice.log" >&2; exit 1; }

# --- swaks: refused before TLS, with a wrong key, and without AUTH; accepted with both --------
swaks_base=(--server "127.0.0.1:$sub_port" --local-interface 127.0.0.5 --helo client.sub.test
  --from app@sub.test --to someone@inbox.test --h-From app@sub.test --h-Subject "swaks over STARTTLS"
  --body "Sent by swaks with STARTTLS and AUTH PLAIN." --timeout 20)
# Before TLS the server offers no AUTH, so swaks cannot authenticate at all.
out=$(swaks "${swaks_base[@]}" --auth PLAIN --auth-user app --auth-password "$key" 2>&1 || true)
echo "$out" | grep -q "250 2.0.0 queued" && fail "authenticated without TLS: $out"
echo "$out" | grep -Eiq "not advertise|538 5.7.11" || fail "AUTH before STARTTLS: $out"
out=$(swaks "${swaks_base[@]}" 2>&1 || true)
echo "$out" | grep -q "530 5.7.0" || fail "an unauthenticated relay was not refused: $out"
out=$(swaks "${swaks_base[@]}" -tls --auth PLAIN --auth-user app --auth-password wrong-key-123 2>&1 || true)
echo "$out" | grep -q "535 5.7.8" || fail "a wrong key was not refused: $out"
out=$(swaks "${swaks_base[@]}" -tls --auth PLAIN --auth-user app --auth-password "$key" 2>&1) ||
  fail "swaks with STARTTLS and AUTH failed: $out"
echo "$out" | grep -q "250 2.0.0 queued as" || fail "no queued reply: $out"
echo "swaks: no AUTH before TLS, refused without AUTH (530) and with a wrong key (535); accepted over STARTTLS with AUTH PLAIN"

# --- smtp-source from the trusted network --------------------------------------------------------
count=2000
started=$(date +%s.%N)
smtp-source -s 20 -m $count -l 10240 -f app@sub.test -t bulk@inbox.test "127.0.0.1:$sub_port"
ended=$(date +%s.%N)
echo "smtp-source: $count messages of 10 KB submitted in $(echo "$ended - $started" | bc) s"

"$py" - "$work" "$dns_port" "$sub_port" "$count" <<'PY'
import email, email.policy, functools, glob, os, smtplib, sys, time
import dkim, dns.resolver
work, dns_port, sub_port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

# DSN requests: a domain NSD says does not exist bounces at once.
s = smtplib.SMTP("127.0.0.1", sub_port)
s.ehlo("app.sub.test")
assert s.has_extn("dsn") and s.has_extn("chunking") and s.has_extn("pipelining"), s.esmtp_features
message = b"From: app@sub.test\r\nSubject: to nowhere\r\nX-Sluice-Tags: dsn-test\r\n\r\nthe body stays here\r\n"
s.sendmail("app@back.test", ["someone@nxdomain.sub.test"], message,
           mail_options=["RET=HDRS", "ENVID=order+2B7"], rcpt_options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;someone+40nxdomain.sub.test"])
s.sendmail("quiet@back.test", ["other@nxdomain.sub.test"], message, rcpt_options=["NOTIFY=NEVER"])
s.quit()

def envelope(path):
    """smtp-sink's record of the envelope: the MAIL argument and the RCPT arguments."""
    head = open(path, "rb").read(16384).split(b"\n\n", 1)[0].decode("latin-1")
    field = lambda name: [l.split(":", 1)[1].strip() for l in head.split("\n") if l.startswith(name)]
    return field("X-Mail-Args:"), field("X-Rcpt-Args:")

expected = count + 1 + 1  # smtp-source, swaks, one DSN
deadline = time.time() + 180
while time.time() < deadline:
    files = glob.glob(os.path.join(work, "mail", "*"))
    if len(files) >= expected:
        break
    time.sleep(0.5)
time.sleep(2)  # a DSN for NOTIFY=NEVER would have come by now
files = sorted(glob.glob(os.path.join(work, "mail", "*")))
assert len(files) == expected, f"{len(files)} messages captured, expected {expected}"

resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = dns_port
@functools.lru_cache(maxsize=None)
def dnsfunc(name, timeout=5):
    qname = name.decode() if isinstance(name, bytes) else name
    return b"".join(b"".join(r.strings) for r in resolver.resolve(qname, "TXT", lifetime=timeout))

dsns, verified, signatures = [], 0, 0
for path in files:
    raw = open(path, "rb").read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    # smtp-sink's own fields come first; the message starts at its Received field's end.
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    sigs = msg.get_all("DKIM-Signature") or []
    assert sigs, f"{path}: not signed"
    for i in range(len(sigs)):
        d = dkim.DKIM(raw)
        assert d.verify(idx=i, dnsfunc=dnsfunc), f"{path}: signature {i} does not verify"
        signatures += 1
    verified += 1
    if msg.get_content_type() == "multipart/report":
        dsns.append((path, msg))
assert len(dsns) == 1, f"{len(dsns)} DSNs: NOTIFY=NEVER must give none"
path, dsn = dsns[0]
mail_args, rcpt_args = envelope(path)
assert rcpt_args == ["<app@back.test>"], rcpt_args
assert mail_args and mail_args[0].startswith("<>"), f"a DSN has a null return path: {mail_args}"
assert dsn.get_param("report-type") == "delivery-status"
parts = dsn.get_payload()
status = parts[1]
assert status.get_content_type() == "message/delivery-status"
per_message, per_recipient = status.get_payload()[0], status.get_payload()[1]
assert per_message["Reporting-MTA"] == "dns; mta.sub.test", per_message.items()
assert per_message["Original-Envelope-Id"] == "order+7", per_message.items()
assert per_recipient["Final-Recipient"] == "rfc822; someone@nxdomain.sub.test", per_recipient.items()
assert per_recipient["Original-Recipient"] == "rfc822;someone@nxdomain.sub.test", per_recipient.items()
assert per_recipient["Action"] == "failed" and per_recipient["Status"].startswith("5."), per_recipient.items()
returned = parts[2]
assert returned.get_content_type() == "text/rfc822-headers", returned.get_content_type()
text = returned.get_payload() if isinstance(returned.get_payload(), str) else str(returned.get_payload()[0])
assert "Subject: to nowhere" in text and "the body stays here" not in text, text
print(f"dkimpy: {signatures} signatures of {verified} messages verified (swaks, {count} from smtp-source, the DSN)")
print(f"DSN: one, read by Python's email as RFC 3464 ({per_recipient['Status']}, {per_recipient['Diagnostic-Code']!r}); none for NOTIFY=NEVER")
PY
echo "submission: ok"
