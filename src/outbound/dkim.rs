//! DKIM signing: the keys named by `[[dkim]]`, loaded once into mail-auth signers, and the one
//! function that signs an assembled message with every key matching its From domain.
//!
//! Loading reads key files (blocking, at start-up and on reload). Signing is pure CPU, and for
//! RSA expensive (a modular exponentiation per message): delivery calls it on the blocking pool,
//! never on a tokio worker. The signed headers are [`SIGNED_HEADERS`], From over-signed (listed
//! twice, so a second From cannot be added without breaking the signature); absent headers are
//! signed as empty, so they cannot be added either.
//!
//! The body hash is worked out once per message, whatever the number of keys (they all sign
//! with relaxed body canonicalisation and SHA-256), and in one call to SHA-256 over the body
//! as it is when that is already in relaxed canonical form but for its trailing empty lines:
//! the bodies Sluice builds are, unless their text has tabs or runs of spaces (line breaks
//! are CRLF, and quoted-printable encodes a space before a line break). [`relaxed_as_is`]
//! tells in one vectorised pass; any other body goes through mail-auth's canonicaliser,
//! and a message whose header section is not well formed is signed by mail-auth whole. The
//! header hash and the signature are mail-auth's, on the template its own `sign` uses.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus::{Histogram, register_histogram};

use mail_auth::common::crypto::{
    Algorithm, DkimKey, Ed25519Key, HashAlgorithm, RsaKey, Sha256, SigningKey,
};
use mail_auth::common::headers::{HeaderStream, HeaderWriter, Writable, Writer};
use mail_auth::dkim::{Canonicalization, DkimSigner, Done, Signature};
use memchr::{memchr, memchr2};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::config::{ConfigError, ConfigErrors, DkimAlgorithm, DkimEntry};

/// Headers covered by every signature, in this order.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Reply-To",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
];

pub(crate) static SIGN_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_dkim_sign_seconds",
        "Time to DKIM-sign one message with all of its keys (hashing and the signature operations).",
        prometheus::exponential_buckets(0.00002, 2.0, 16).expect("static buckets")
    )
    .expect("metric registers once")
});

/// One key, ready to sign.
pub struct Signer {
    pub domain: String,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    inner: DkimSigner<DkimKey, Done>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

/// Why a message could not be signed.
#[derive(Debug, thiserror::Error)]
#[error("DKIM signing with {domain}/{selector} failed: {reason}")]
pub struct SignError {
    pub domain: String,
    pub selector: String,
    pub reason: String,
}

/// All configured keys by signing domain. Built once; a reload builds a new one.
#[derive(Debug, Default)]
pub struct DkimKeys {
    by_domain: HashMap<String, Vec<Arc<Signer>>>,
}

impl DkimKeys {
    /// Reads and parses every key file. Errors name `dkim[i].key_file` and say what is wrong:
    /// unreadable, not PEM, or not a key of the configured algorithm.
    pub fn load(entries: &[DkimEntry], file: &str) -> Result<DkimKeys, ConfigErrors> {
        let mut keys = DkimKeys::default();
        let mut errors = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match load_key(&e.key_file, e.algorithm) {
                Ok(key) => {
                    let inner = DkimSigner::from_key(key)
                        .domain(e.domain.to_ascii_lowercase())
                        .selector(e.selector.clone())
                        .headers(SIGNED_HEADERS.iter().copied());
                    keys.by_domain
                        .entry(e.domain.to_ascii_lowercase())
                        .or_default()
                        .push(Arc::new(Signer {
                            domain: e.domain.to_ascii_lowercase(),
                            selector: e.selector.clone(),
                            algorithm: e.algorithm,
                            inner,
                        }));
                }
                Err(reason) => errors.push(ConfigError {
                    file: file.to_owned(),
                    key: format!("dkim[{i}].key_file"),
                    reason: format!("{}: {reason}", e.key_file.display()),
                }),
            }
        }
        if errors.is_empty() {
            Ok(keys)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The keys that sign mail from `from_domain`: those of the domain itself, or else of its
    /// nearest parent with keys (`news.example.com` is signed by `example.com`'s keys, which
    /// DMARC's relaxed alignment accepts).
    pub fn for_domain(&self, from_domain: &str) -> &[Arc<Signer>] {
        let mut d = from_domain;
        loop {
            if let Some(v) = self.by_domain.get(d) {
                return v;
            }
            match d.split_once('.') {
                Some((_, parent)) if parent.contains('.') => d = parent,
                _ => return &[],
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// Signs `message` with every key for `from_domain` and returns the DKIM-Signature header
    /// fields to put in front of it (empty when no key matches). Fields come in reverse config
    /// order, as if each key had signed in turn on the way out (the last key's on top).
    pub fn sign(&self, from_domain: &str, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let signers = self.for_domain(from_domain);
        if signers.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let split =
            split_header(message).map(|(fields, body)| (fields, body, relaxed_body_hash(body)));
        let mut out = Vec::with_capacity(signers.len() * 512);
        for s in signers.iter().rev() {
            let signed = match &split {
                Some((fields, body, hash)) => s.sign(message, fields, body, hash, now),
                None => s.inner.sign(message),
            };
            let sig = signed.map_err(|e| SignError {
                domain: s.domain.clone(),
                selector: s.selector.clone(),
                reason: e.to_string(),
            })?;
            sig.write_header(&mut out);
        }
        SIGN_SECONDS.observe(started.elapsed().as_secs_f64());
        Ok(out)
    }
}

impl Signer {
    /// The signature, at `now` (Unix seconds), of `message`, split into header `fields` and
    /// `body` by [`split_header`], whose relaxed canonical body hashes to `body_hash`: what
    /// mail-auth's `DkimSigner::sign` makes of the whole message, without hashing the body
    /// again for each key. A template that would hash the body another way (never one `load`
    /// builds) is left to mail-auth whole.
    fn sign(
        &self,
        message: &[u8],
        fields: &[Field<'_>],
        body: &[u8],
        body_hash: &[u8],
        now: u64,
    ) -> mail_auth::Result<Signature> {
        let template = &self.inner.template;
        let sha256 = matches!(template.a, Algorithm::RsaSha256 | Algorithm::Ed25519Sha256);
        if !sha256 || template.cb != Canonicalization::Relaxed || template.l != 0 {
            return self.inner.sign(message);
        }
        let (_, headers, signed, _) = template.canonicalize(Fields {
            fields: fields.iter(),
            body,
        });
        if signed.is_empty() {
            return Err(mail_auth::Error::NoHeadersFound);
        }
        let mut sig = template.clone();
        sig.bh = body_hash.to_vec();
        sig.t = now;
        if sig.x > 0 {
            sig.x += now;
        }
        sig.h = signed;
        sig.b = self.inner.key.sign(SignedPart {
            headers,
            signature: &sig,
        })?;
        Ok(sig)
    }
}

/// A message's header fields as (name, value) pairs, the value with its line breaks, and its
/// body: what mail-auth's canonicaliser reads a message as.
struct Fields<'a, 'x> {
    fields: std::slice::Iter<'a, Field<'x>>,
    body: &'x [u8],
}

impl<'x> HeaderStream<'x> for Fields<'_, 'x> {
    fn next_header(&mut self) -> Option<(&'x [u8], &'x [u8])> {
        self.fields.next().copied()
    }

    fn body(&mut self) -> &'x [u8] {
        self.body
    }
}

/// A header field as mail-auth's canonicaliser takes it: its name, and its value from after
/// the colon to the end of its last line, line breaks included.
pub(crate) type Field<'x> = (&'x [u8], &'x [u8]);

/// A well-formed message's header fields (name, then the value after the colon up to and
/// including the CRLF that ends the field, folded lines and all) and its body (after the
/// empty line). `None` when a field has no name or no colon, a line ends in a bare LF or the
/// header section does not end in an empty line: mail-auth then reads the message itself,
/// with its own rules for such input.
pub(crate) fn split_header(message: &[u8]) -> Option<(Vec<Field<'_>>, &[u8])> {
    let mut fields = Vec::with_capacity(SIGNED_HEADERS.len() + 8);
    let mut pos = 0;
    loop {
        let rest = message.get(pos..)?;
        if rest.starts_with(b"\r\n") {
            return Some((fields, message.get(pos + 2..)?));
        }
        let colon = pos + memchr2(b':', b'\n', rest)?;
        let name = message.get(pos..colon)?;
        if message.get(colon) != Some(&b':')
            || name.is_empty()
            || !name.iter().all(u8::is_ascii_graphic)
        {
            return None;
        }
        let mut end = colon + 1;
        loop {
            let lf = end + memchr(b'\n', message.get(end..)?)?;
            if lf == 0 || message.get(lf - 1) != Some(&b'\r') {
                return None;
            }
            end = lf + 1;
            if !matches!(message.get(end), Some(b' ' | b'\t')) {
                break;
            }
        }
        fields.push((name, message.get(colon + 1..end)?));
        pos = end;
    }
}

/// What the signature covers: the signed header fields, canonicalised, then the
/// DKIM-Signature field itself without its `b=` value (RFC 6376 §3.7).
struct SignedPart<'a, H> {
    headers: H,
    signature: &'a Signature,
}

impl<H: Writable> Writable for SignedPart<'_, H> {
    fn write(self, writer: &mut impl Writer) {
        self.headers.write(writer);
        self.signature.write(writer, false);
    }
}

/// SHA-256 of `body` in relaxed canonical form (RFC 6376 §3.4.4).
fn relaxed_body_hash(body: &[u8]) -> Vec<u8> {
    let digest = match relaxed_as_is(body) {
        Some(lines) => HashAlgorithm::Sha256.hash(LinesAndBreak(lines)),
        None => HashAlgorithm::Sha256.hash(Canonicalization::Relaxed.canonical_body(body, 0)),
    };
    digest.as_ref().to_vec()
}

/// A canonical body given as its lines without the final CRLF, which follows unless it is
/// empty.
struct LinesAndBreak<'a>(&'a [u8]);

impl Writable for LinesAndBreak<'_> {
    fn write(self, writer: &mut impl Writer) {
        if !self.0.is_empty() {
            writer.write(self.0);
            writer.write(b"\r\n");
        }
    }
}

/// `body`'s relaxed canonical form without its final CRLF, when that is `body` itself less
/// its trailing line breaks: every line break a CRLF, no tab, and no space followed by a
/// space or a line break or ending the body. `None` for any other body, which needs the
/// canonicaliser.
pub(crate) fn relaxed_as_is(body: &[u8]) -> Option<&[u8]> {
    let (Some(&first), Some(&last)) = (body.first(), body.last()) else {
        return Some(body);
    };
    if first == b'\n' || matches!(last, b' ' | b'\t' | b'\r') {
        return None;
    }
    // Each byte with the next, branch-free so that the compiler checks many at once; in
    // blocks, so that a body that fails stops early.
    let next = body.get(1..).unwrap_or_default();
    for (these, following) in body.chunks(4096).zip(next.chunks(4096)) {
        let bad = these
            .iter()
            .zip(following)
            .fold(0u8, |bad, (&x, &y)| bad | needs_canonicalising(x, y));
        if bad != 0 {
            return None;
        }
    }
    let mut end = body.len();
    while end >= 2 && body.get(end - 2..end) == Some(b"\r\n".as_slice()) {
        end -= 2;
    }
    body.get(..end)
}

/// 1 when byte `x` followed by byte `y` is not already relaxed canonical: a tab, a space
/// before a space or a line break, a CR not before an LF or an LF not after a CR.
#[inline(always)]
fn needs_canonicalising(x: u8, y: u8) -> u8 {
    let space = (x == b' ') as u8;
    let wsp_or_break = (y == b' ') as u8 | (y == b'\r') as u8 | (y == b'\n') as u8;
    (x == b'\t') as u8 | (space & wsp_or_break) | ((x == b'\r') as u8 ^ (y == b'\n') as u8)
}

/// The DNS TXT record that publishes `entry`'s public key (`v=DKIM1; k=rsa; p=...`): the
/// PKCS#1 RSAPublicKey, or the 32 raw bytes of an Ed25519 key, in base64. Reads the key file.
pub fn public_record(entry: &DkimEntry) -> Result<String, String> {
    use base64::Engine;
    use ring::signature::KeyPair;
    let path = &entry.key_file;
    let pem =
        std::fs::read(path).map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: no PEM private key in it: {e}", path.display()))?;
    let bad = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let (k, public) = match (entry.algorithm, der) {
        (DkimAlgorithm::RsaSha256, PrivateKeyDer::Pkcs8(der)) => (
            "rsa",
            ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
                .map_err(|e| bad(&e))?
                .public()
                .as_ref()
                .to_vec(),
        ),
        (DkimAlgorithm::RsaSha256, PrivateKeyDer::Pkcs1(der)) => (
            "rsa",
            ring::signature::RsaKeyPair::from_der(der.secret_pkcs1_der())
                .map_err(|e| bad(&e))?
                .public()
                .as_ref()
                .to_vec(),
        ),
        (DkimAlgorithm::Ed25519Sha256, PrivateKeyDer::Pkcs8(der)) => (
            "ed25519",
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
                .map_err(|e| bad(&e))?
                .public_key()
                .as_ref()
                .to_vec(),
        ),
        _ => return Err(bad(&"not a key of the configured algorithm")),
    };
    Ok(format!(
        "v=DKIM1; k={k}; p={}",
        base64::engine::general_purpose::STANDARD.encode(public)
    ))
}

fn load_key(path: &Path, algorithm: DkimAlgorithm) -> Result<DkimKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!("no PEM private key in it ({e}); expected PKCS#8 (\"PRIVATE KEY\") or, for RSA, PKCS#1 (\"RSA PRIVATE KEY\")")
    })?;
    match (algorithm, der) {
        (DkimAlgorithm::RsaSha256, der @ (PrivateKeyDer::Pkcs8(_) | PrivateKeyDer::Pkcs1(_))) => {
            RsaKey::<Sha256>::from_key_der(der)
                .map(DkimKey::Rsa)
                .map_err(|e| {
                    format!("not a usable RSA key for rsa-sha256 (2048 to 4096 bits): {e}")
                })
        }
        (DkimAlgorithm::Ed25519Sha256, PrivateKeyDer::Pkcs8(der)) => {
            Ed25519Key::from_pkcs8_maybe_unchecked_der(der.secret_pkcs8_der())
                .map(DkimKey::Ed25519)
                .map_err(|e| format!("not an Ed25519 key for ed25519-sha256: {e}"))
        }
        (DkimAlgorithm::Ed25519Sha256, _) => {
            Err("an ed25519-sha256 key must be PKCS#8 (\"PRIVATE KEY\")".into())
        }
        (DkimAlgorithm::RsaSha256, _) => {
            Err("an rsa-sha256 key must be PKCS#8 or PKCS#1 (\"RSA PRIVATE KEY\")".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn data(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/dkim")
            .join(name)
    }

    fn entry(domain: &str, selector: &str, algorithm: DkimAlgorithm, file: &str) -> DkimEntry {
        DkimEntry {
            domain: domain.into(),
            selector: selector.into(),
            algorithm,
            key_file: data(file),
        }
    }

    fn errors(entries: &[DkimEntry]) -> Vec<String> {
        match DkimKeys::load(entries, "t.toml") {
            Ok(_) => vec![],
            Err(ConfigErrors(es)) => es.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn loads_pkcs8_pkcs1_and_ed25519_keys() {
        let keys = DkimKeys::load(
            &[
                entry(
                    "example.com",
                    "rsa8",
                    DkimAlgorithm::RsaSha256,
                    "rsa2048.pem",
                ),
                entry(
                    "example.com",
                    "rsa1",
                    DkimAlgorithm::RsaSha256,
                    "rsa2048.pkcs1.pem",
                ),
                entry(
                    "example.com",
                    "ed",
                    DkimAlgorithm::Ed25519Sha256,
                    "ed25519.pem",
                ),
            ],
            "t.toml",
        )
        .unwrap();
        assert_eq!(keys.for_domain("example.com").len(), 3);
        assert_eq!(
            keys.for_domain("news.example.com").len(),
            3,
            "parent domain"
        );
        assert!(keys.for_domain("example.org").is_empty());
        assert!(keys.for_domain("com").is_empty());
    }

    #[test]
    fn bad_keys_fail_with_the_key_named() {
        let e = errors(&[
            entry("example.com", "a", DkimAlgorithm::RsaSha256, "ed25519.pem"),
            entry(
                "example.com",
                "b",
                DkimAlgorithm::Ed25519Sha256,
                "rsa2048.pem",
            ),
            entry(
                "example.com",
                "c",
                DkimAlgorithm::Ed25519Sha256,
                "rsa2048.pkcs1.pem",
            ),
            entry("example.com", "d", DkimAlgorithm::RsaSha256, "rsa1024.pem"),
            entry("example.com", "e", DkimAlgorithm::RsaSha256, "missing.pem"),
            entry("example.com", "f", DkimAlgorithm::RsaSha256, "README.md"),
        ]);
        assert_eq!(e.len(), 6, "{e:#?}");
        for (i, msg) in e.iter().enumerate() {
            assert!(
                msg.starts_with(&format!("t.toml: dkim[{i}].key_file: ")),
                "{msg}"
            );
        }
        assert!(e[0].contains("not a usable RSA key"), "{}", e[0]);
        assert!(e[1].contains("not an Ed25519 key"), "{}", e[1]);
        assert!(e[2].contains("must be PKCS#8"), "{}", e[2]);
        assert!(e[3].contains("2048 to 4096 bits"), "{}", e[3]);
        assert!(e[4].contains("cannot read it"), "{}", e[4]);
        assert!(e[5].contains("no PEM private key"), "{}", e[5]);
    }

    /// An RSA key (`rsa`) and an Ed25519 key (`ed`) for example.com, in that order.
    fn rsa_and_ed25519() -> DkimKeys {
        DkimKeys::load(
            &[
                entry(
                    "example.com",
                    "rsa",
                    DkimAlgorithm::RsaSha256,
                    "rsa2048.pem",
                ),
                entry(
                    "example.com",
                    "ed",
                    DkimAlgorithm::Ed25519Sha256,
                    "ed25519.pem",
                ),
            ],
            "t.toml",
        )
        .unwrap()
    }

    #[test]
    fn signs_with_every_key_and_oversigns_from() {
        let keys = rsa_and_ed25519();
        let msg = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n";
        let out = String::from_utf8(keys.sign("example.com", msg).unwrap()).unwrap();
        let sigs: Vec<&str> = out.split("DKIM-Signature: ").skip(1).collect();
        assert_eq!(sigs.len(), 2, "{out}");
        assert!(
            sigs[0].contains("a=ed25519-sha256"),
            "the last configured key (ed25519) on top: {out}"
        );
        assert!(sigs[1].contains("a=rsa-sha256"), "{out}");
        for s in sigs {
            let compact: String = s.split_whitespace().collect();
            assert!(compact.contains("c=relaxed/relaxed"), "{s}");
            let h = compact
                .split(';')
                .find_map(|t| t.strip_prefix("h="))
                .expect("h= tag")
                .to_ascii_lowercase();
            let names: Vec<&str> = h.split(':').collect();
            assert_eq!(names.iter().filter(|n| **n == "from").count(), 2, "{h}");
            for n in [
                "list-unsubscribe",
                "list-unsubscribe-post",
                "feedback-id",
                "to",
            ] {
                assert!(names.contains(&n), "{n} in {h}");
            }
        }
        assert!(keys.sign("example.org", msg).unwrap().is_empty());
    }

    /// mail-auth's relaxed body canonicalisation of `body`.
    fn canonical(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Canonicalization::Relaxed
            .canonical_body(body, 0)
            .write(&mut out);
        out
    }

    #[test]
    fn bodies_taken_as_they_are_canonicalise_to_themselves() {
        // Every body of up to 8 bytes over an alphabet of what canonicalisation acts on (and
        // two bytes it passes), then longer random ones: whenever `relaxed_as_is` takes a body,
        // its lines and a CRLF are what mail-auth's canonicaliser makes of it.
        const ALPHABET: &[u8] = b"a \t\r\n\x0b\xc3";
        let mut taken = 0;
        let mut check = |body: &[u8]| {
            if let Some(lines) = relaxed_as_is(body) {
                taken += 1;
                let mut ours = lines.to_vec();
                if !ours.is_empty() {
                    ours.extend_from_slice(b"\r\n");
                }
                assert_eq!(ours, canonical(body), "{:?}", String::from_utf8_lossy(body));
            }
        };
        for len in 0..=8u32 {
            for mut n in 0..(ALPHABET.len() as u64).pow(len) {
                let mut body = Vec::new();
                for _ in 0..len {
                    body.push(ALPHABET[(n % ALPHABET.len() as u64) as usize]);
                    n /= ALPHABET.len() as u64;
                }
                check(&body);
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut body = Vec::new();
            for _ in 0..random() % 200 {
                let state = random();
                // Mostly letters and single spaces, with a CRLF now and then.
                match state % 16 {
                    0 => body.extend_from_slice(b"\r\n"),
                    1..=3 => body.push(b' '),
                    4 => body.push(ALPHABET[(state >> 8) as usize % ALPHABET.len()]),
                    _ => body.push(b'x'),
                }
            }
            check(&body);
        }
        assert!(taken > 50_000, "only {taken} bodies took the direct path");
    }

    #[test]
    fn bodies_that_need_canonicalising_are_left_to_the_canonicaliser() {
        for body in [
            &b"a\tb\r\n"[..],
            b"a  b\r\n",
            b"a \r\nb\r\n",
            b"a\nb\r\n",
            b"a\rb\r\n",
            b"a\r\nb ",
            b"a\r\n\r\r\n",
        ] {
            assert_eq!(
                relaxed_as_is(body),
                None,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            relaxed_as_is(b"a b\r\n c\r\n\r\n\r\n"),
            Some(&b"a b\r\n c"[..])
        );
        assert_eq!(relaxed_as_is(b"\r\n\r\n"), Some(&b""[..]));
        assert_eq!(
            relaxed_as_is(b"no break at the end"),
            Some(&b"no break at the end"[..])
        );
    }

    #[test]
    fn signatures_are_the_ones_mail_auth_makes() {
        // RSA PKCS#1 v1.5 and Ed25519 are deterministic: for the same second, the signature
        // fields must be byte for byte mail-auth's own, for a body taken as it is and for one
        // that needs canonicalising.
        let keys = rsa_and_ed25519();
        let plain =
            b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi,\r\n folded\r\n\r\n a b\r\n\r\n";
        let messy = b"From: a@example.com\r\nSubject: hi\r\n\r\n a\t b \r\n\nc  \r\n\r\n";
        let body_of = |m: &'static [u8]| split_header(m).expect("a header section").1;
        assert!(relaxed_as_is(body_of(plain)).is_some());
        assert!(relaxed_as_is(body_of(messy)).is_none());
        for bad in [
            &b"From: a@example.com\nSubject: hi\n\nbody\n"[..],
            b"From: a@example.com\r\nno colon\r\n\r\nbody\r\n",
            b"From: a@example.com\r\nSubject: no empty line\r\n",
        ] {
            assert!(
                split_header(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            assert!(!keys.sign("example.com", bad).unwrap().is_empty());
        }
        for message in [&plain[..], &messy[..], b"From: a@example.com\r\n\r\n"] {
            for s in keys.for_domain("example.com") {
                let mut mine = Vec::new();
                let mut theirs = Vec::new();
                for _ in 0..3 {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    let (fields, body) = split_header(message).unwrap();
                    let hash = relaxed_body_hash(body);
                    let sig = s.sign(message, &fields, body, &hash, now).unwrap();
                    let reference = s.inner.sign(message).unwrap();
                    if sig.t == reference.t {
                        mine.clear();
                        theirs.clear();
                        sig.write_header(&mut mine);
                        reference.write_header(&mut theirs);
                        break;
                    }
                }
                assert!(
                    !mine.is_empty(),
                    "the clock kept ticking between the two signatures"
                );
                assert_eq!(
                    String::from_utf8_lossy(&mine),
                    String::from_utf8_lossy(&theirs)
                );
            }
        }
    }
}
