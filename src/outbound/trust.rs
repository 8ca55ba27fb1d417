//! What outbound TLS and DNSSEC trust besides their built-in roots: the CA certificates of
//! `delivery.tls_ca_file` and the DNSSEC trust anchors of `dane.trust_anchor`. Read once when
//! the settings load (blocking), with errors that name the key.

use std::sync::Arc;

use hickory_resolver::proto::dnssec::TrustAnchors;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::{Config, ConfigError, ConfigErrors};

#[derive(Clone, Default)]
pub struct Trust {
    /// CA certificates trusted besides Mozilla's roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// The DNSSEC trust anchors; `None`: the IANA root keys.
    pub anchors: Option<Arc<TrustAnchors>>,
}

impl Trust {
    /// Reads the files `config` names. Blocking.
    pub fn load(config: &Config, file: &str) -> Result<Trust, ConfigErrors> {
        let mut errors = Vec::new();
        let mut bad = |key: &str, reason: String| errors.push(ConfigError::new(file, key, reason));
        let mut trust = Trust::default();
        if let Some(path) = &config.delivery.tls_ca_file {
            match CertificateDer::pem_file_iter(path).and_then(|certs| certs.collect()) {
                Ok(certs) => {
                    let certs: Vec<CertificateDer<'static>> = certs;
                    let mut store = rustls::RootCertStore::empty();
                    let (added, refused) = store.add_parsable_certificates(certs.iter().cloned());
                    if added == 0 || refused > 0 {
                        bad(
                            "delivery.tls_ca_file",
                            format!(
                                "{}: {added} CA certificates read, {refused} refused; give PEM CERTIFICATE blocks of CA certificates",
                                path.display()
                            ),
                        );
                    }
                    trust.extra_roots = certs;
                }
                Err(e) => bad("delivery.tls_ca_file", format!("{}: {e}", path.display())),
            }
        }
        if let Some(path) = &config.dane.trust_anchor {
            match TrustAnchors::from_file(path) {
                Ok(a) => trust.anchors = Some(Arc::new(a)),
                Err(e) => bad(
                    "dane.trust_anchor",
                    format!(
                        "{}: {e} (give DNSKEY records, one per line, as in a zone file)",
                        path.display()
                    ),
                ),
            }
        }
        if errors.is_empty() {
            Ok(trust)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_files_are_config_errors_naming_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let mut config = Config::default();
        config.delivery.tls_ca_file = Some(junk.clone());
        config.dane.trust_anchor = Some(dir.path().join("missing.keys"));
        let Err(ConfigErrors(errors)) = Trust::load(&config, "t.toml") else {
            panic!("junk files load");
        };
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["delivery.tls_ca_file", "dane.trust_anchor"]);

        // A real CA certificate and a DNSKEY line load.
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).unwrap();
        std::fs::write(&junk, ca.cert.pem()).unwrap();
        let anchor = dir.path().join("anchor.keys");
        std::fs::write(
            &anchor,
            "test.\tIN\tDNSKEY\t257 3 13 R/ASDOynfiGd3J7wW5V7OBOw4k6LF0H4JSE7C0cmCXVZ7MxcZAj2u++UORuMxrOJTzkQn1FbfNiH5J83V1Q27A== ;{id = 7612 (ksk), size = 256b}\n",
        )
        .unwrap();
        config.dane.trust_anchor = Some(anchor);
        let trust = Trust::load(&config, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(trust.extra_roots.len(), 1);
        assert!(trust.anchors.is_some());
    }
}
