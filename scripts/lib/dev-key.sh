# dev_key DIR: makes the development DKIM key config/sluice.toml signs with, DIR/var/dkim/dev.pem
# (RSA-2048, PKCS#8), unless it is there, and prints the DNS record that would publish it.
# Sourced by scripts/run and the first-campaign acceptance script.
dev_key() {
  local key="$1/var/dkim/dev.pem"
  [ -f "$key" ] && return 0
  mkdir -p "$(dirname "$key")"
  (umask 077 && openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$key" 2>/dev/null)
  echo "dev key: made $key (DNS, if it were real: dev._domainkey.example.com TXT \"v=DKIM1; k=rsa; p=$(openssl pkey -in "$key" -pubout -outform DER 2>/dev/null | base64 -w0)\")" >&2
}
