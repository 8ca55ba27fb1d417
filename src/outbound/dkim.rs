//! DKIM signing: the keys named by `[[dkim]]`, loaded once into mail-auth signers, and the one
//! function that signs an assembled message with every key matching its From domain.
//!
//! Loading reads key files (blocking, at start-up and on reload). Signing is pure CPU, and for
//! RSA expensive (a modular exponentiation per message): delivery calls it on the blocking pool,
//! never on a tokio worker. The signed headers are [`SIGNED_HEADERS`], From over-signed (listed
//! twice, so a second From cannot be added without breaking the signature); absent headers are
//! signed as empty, so they cannot be added either.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus::{Histogram, register_histogram};

use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
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
        let mut out = Vec::with_capacity(signers.len() * 512 + message.len());
        for s in signers.iter().rev() {
            let sig = s.inner.sign(message).map_err(|e| SignError {
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

    #[test]
    fn signs_with_every_key_and_oversigns_from() {
        let keys = DkimKeys::load(
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
        .unwrap();
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
}
