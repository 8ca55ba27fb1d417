//! DANE for SMTP (RFC 7672, on RFC 6698 TLSA records): which records are usable, and a rustls
//! certificate verifier that accepts a server's chain only when a usable record matches it.
//!
//! * DANE-EE (usage 3): the server's own certificate or public key matches the record. Its
//!   names and validity dates are not checked (RFC 7672 §3.1.1): the DNSSEC-signed record is the
//!   authority.
//! * DANE-TA (usage 2): a certificate the server presents (or its public key) matches the
//!   record; the server's certificate must chain to it and be valid, now, for one of the
//!   reference names: the MX host name, or the name its TLSA records were found under
//!   (RFC 7672 §3.2.2).
//!
//! PKIX usages 0 and 1 are not used for SMTP (RFC 7672 §3.1.3), nor unknown selectors or
//! matching types: such records are unusable, and a TLSA set with none usable is as if there
//! were none (opportunistic TLS, RFC 7672 §2.2).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// One TLSA record (RFC 6698 §2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

/// Presentation form: `3 1 1 <hex>`.
impl std::fmt::Display for Tlsa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} ", self.usage, self.selector, self.matching)?;
        self.data.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl Tlsa {
    /// DANE-TA or DANE-EE, full certificate or SubjectPublicKeyInfo, exact or SHA-256/512, with
    /// association data of the right length for its matching type.
    pub fn usable(&self) -> bool {
        let length_ok = match self.matching {
            0 => !self.data.is_empty(),
            1 => self.data.len() == 32,
            2 => self.data.len() == 64,
            _ => false,
        };
        matches!(self.usage, 2 | 3) && matches!(self.selector, 0 | 1) && length_ok
    }

    /// Whether the record matches certificate `der` (the whole certificate, or its public key).
    pub fn matches(&self, der: &[u8]) -> bool {
        let selected: Vec<u8> = match self.selector {
            0 => der.to_vec(),
            1 => match spki(der) {
                Some(k) => k,
                None => return false,
            },
            _ => return false,
        };
        let digest = |alg| ring::digest::digest(alg, &selected).as_ref().to_vec();
        let value = match self.matching {
            0 => selected,
            1 => digest(&ring::digest::SHA256),
            2 => digest(&ring::digest::SHA512),
            _ => return false,
        };
        value == self.data
    }
}

/// The DER SubjectPublicKeyInfo of certificate `der`.
fn spki(der: &[u8]) -> Option<Vec<u8>> {
    let cert = CertificateDer::from(der);
    let parsed = webpki::EndEntityCert::try_from(&cert).ok()?;
    Some(parsed.subject_public_key_info().as_ref().to_vec())
}

/// Checks a server's certificates against its usable TLSA records (at least one).
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<Tlsa>,
    /// Reference names for DANE-TA: the MX host name, and the TLSA base domain when that is a
    /// different name (a CNAME's target).
    names: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl DaneVerifier {
    /// `None` when no record is usable.
    pub fn new(
        records: Vec<Tlsa>,
        names: Vec<String>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Option<DaneVerifier> {
        let records: Vec<Tlsa> = records.into_iter().filter(Tlsa::usable).collect();
        (!records.is_empty()).then_some(DaneVerifier {
            records,
            names,
            provider,
        })
    }

    /// Whether a DANE-TA record matches a presented certificate to which the end entity chains,
    /// and the end entity is valid now for a reference name.
    fn trust_anchor_matches(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), String> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| e.to_string())?;
        let mut last = String::from("no DANE-TA record matches a certificate the server sent");
        for record in self.records.iter().filter(|r| r.usage == 2) {
            for candidate in intermediates.iter().filter(|c| record.matches(c)) {
                let anchor = match webpki::anchor_from_trusted_cert(candidate) {
                    Ok(a) => a,
                    Err(e) => {
                        last = format!("the DANE-TA certificate does not parse: {e}");
                        continue;
                    }
                };
                let anchors = [anchor];
                let chained = ee.verify_for_usage(
                    self.provider.signature_verification_algorithms.all,
                    &anchors,
                    intermediates,
                    now,
                    webpki::KeyUsage::server_auth(),
                    None,
                    None,
                );
                if let Err(e) = chained {
                    last = format!("the certificate does not chain to the DANE-TA: {e}");
                    continue;
                }
                let named = self.names.iter().any(|n| {
                    ServerName::try_from(n.as_str())
                        .is_ok_and(|name| ee.verify_is_valid_for_subject_name(&name).is_ok())
                });
                if named {
                    return Ok(());
                }
                last = format!(
                    "the certificate chains to the DANE-TA but names none of {}",
                    self.names.join(", ")
                );
            }
        }
        Err(last)
    }
}

/// Why DANE refused a certificate.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// A certificate error (not a general one), so the handshake's failure says the certificate was
/// refused.
fn refused(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Refused(reason)),
    )))
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .records
            .iter()
            .any(|r| r.usage == 3 && r.matches(end_entity))
        {
            return Ok(ServerCertVerified::assertion());
        }
        if !self.records.iter().any(|r| r.usage == 2) {
            return Err(refused(
                "DANE: no TLSA record matches the server's certificate".into(),
            ));
        }
        self.trust_anchor_matches(end_entity, intermediates, now)
            .map(|()| ServerCertVerified::assertion())
            .map_err(|e| refused(format!("DANE: {e}")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn sha256(b: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, b)
            .as_ref()
            .to_vec()
    }

    /// A CA, and a server certificate for `name` it issued.
    fn chain(name: &str) -> (CertificateDer<'static>, CertificateDer<'static>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (leaf.der().clone(), issuer.as_ref().der().clone())
    }

    fn check(
        v: &DaneVerifier,
        leaf: &CertificateDer<'_>,
        rest: &[CertificateDer<'_>],
    ) -> Result<(), String> {
        let name = ServerName::try_from("mx.example.net").unwrap();
        v.verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
            .map(drop)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn unusable_records_are_left_out() {
        let ok = Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data: vec![0; 32],
        };
        assert!(ok.usable());
        for bad in [
            Tlsa {
                usage: 1,
                ..ok.clone()
            },
            Tlsa {
                usage: 0,
                ..ok.clone()
            },
            Tlsa {
                selector: 2,
                ..ok.clone()
            },
            Tlsa {
                matching: 3,
                ..ok.clone()
            },
            Tlsa {
                data: vec![0; 31],
                ..ok.clone()
            },
            Tlsa {
                matching: 2,
                ..ok.clone()
            },
        ] {
            assert!(!bad.usable(), "{bad:?}");
        }
        assert!(DaneVerifier::new(vec![Tlsa { usage: 1, ..ok }], vec![], provider()).is_none());
    }

    #[test]
    fn dane_ee_matches_the_key_or_certificate_whatever_the_name() {
        let (leaf, ca) = chain("other.example.org");
        let key = spki(&leaf).unwrap();
        for (selector, matching, data) in [
            (1, 1, sha256(&key)),
            (0, 1, sha256(&leaf)),
            (1, 0, key.clone()),
            (
                1,
                2,
                ring::digest::digest(&ring::digest::SHA512, &key)
                    .as_ref()
                    .to_vec(),
            ),
        ] {
            let v = DaneVerifier::new(
                vec![Tlsa {
                    usage: 3,
                    selector,
                    matching,
                    data,
                }],
                vec!["mx.example.net".into()],
                provider(),
            )
            .unwrap();
            assert_eq!(check(&v, &leaf, &[]), Ok(()), "3 {selector} {matching}");
        }
        // Another key: refused.
        let v = DaneVerifier::new(
            vec![Tlsa {
                usage: 3,
                selector: 1,
                matching: 1,
                data: sha256(&spki(&ca).unwrap()),
            }],
            vec!["mx.example.net".into()],
            provider(),
        )
        .unwrap();
        let e = check(&v, &leaf, &[ca]).unwrap_err();
        assert!(e.contains("no TLSA record matches"), "{e}");
    }

    #[test]
    fn dane_ta_needs_the_chain_and_a_reference_name() {
        let (leaf, ca) = chain("mx.example.net");
        let ta = |cert: &CertificateDer<'_>| Tlsa {
            usage: 2,
            selector: 1,
            matching: 1,
            data: sha256(&spki(cert).unwrap()),
        };
        let names = vec!["mx.example.net".to_owned()];
        let v = DaneVerifier::new(vec![ta(&ca)], names.clone(), provider()).unwrap();
        assert_eq!(check(&v, &leaf, std::slice::from_ref(&ca)), Ok(()));
        // The TA must be presented by the server.
        let e = check(&v, &leaf, &[]).unwrap_err();
        assert!(e.contains("no DANE-TA record matches"), "{e}");
        // A certificate from another CA, with the record's CA sent along, does not chain.
        let (stranger, _) = chain("mx.example.net");
        let e = check(&v, &stranger, std::slice::from_ref(&ca)).unwrap_err();
        assert!(e.contains("does not chain"), "{e}");
        // The right chain for the wrong name.
        let (leaf2, ca2) = chain("www.example.net");
        let v = DaneVerifier::new(vec![ta(&ca2)], names, provider()).unwrap();
        let e = check(&v, &leaf2, &[ca2]).unwrap_err();
        assert!(e.contains("names none of mx.example.net"), "{e}");
    }
}
