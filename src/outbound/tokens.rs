//! Authenticated job tokens: the VERP return path, the one-click unsubscribe link and the trace
//! header all carry one, so whatever comes back (a DSN, a click, a complaint report that redacts
//! the recipient) maps to its job and cannot be forged.
//!
//! A token is 32 lowercase hex characters: the 8-byte job id, then the first 8 bytes of
//! HMAC-SHA256(key, purpose byte ‖ job id). The purpose byte keeps the three uses apart: an
//! unsubscribe token read off a message header is no good as a VERP token. The first configured
//! key signs and every key verifies, so keys rotate without breaking mail in flight. Hex rather
//! than base64 because mail systems may change the case of a local part. Pure CPU, no I/O.

use ring::hmac;
use subtle::ConstantTimeEq;

use crate::store::spool::JobId;

/// Length of a token in characters.
pub const TOKEN_LEN: usize = 32;
const MAC_LEN: usize = 8;

/// What a token is for; part of the MAC input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The envelope sender's `+token`.
    Verp,
    /// The `List-Unsubscribe` URL and mailto.
    Unsubscribe,
    /// The trace header, for complaint reports.
    Trace,
}

impl Purpose {
    fn byte(self) -> u8 {
        match self {
            Purpose::Verp => b'v',
            Purpose::Unsubscribe => b'u',
            Purpose::Trace => b't',
        }
    }
}

/// The token keys, loaded once from `secrets.token_keys`.
pub struct Tokens {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Tokens")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Tokens {
    /// Keys in order; the first signs. The config guarantees at least one.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Tokens {
        Tokens {
            keys: secrets
                .iter()
                .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_ref()))
                .collect(),
        }
    }

    fn mac(key: &hmac::Key, purpose: Purpose, id: &[u8; 8]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(key);
        ctx.update(&[purpose.byte()]);
        ctx.update(id);
        let tag = ctx.sign();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
        out
    }

    /// The token for `job`, signed with the first key.
    pub fn issue(&self, purpose: Purpose, job: JobId) -> String {
        let id = job.key();
        let key = self.keys.first().expect("at least one token key");
        let mac = Self::mac(key, purpose, &id);
        let mut out = String::with_capacity(TOKEN_LEN);
        for b in id.iter().chain(mac.iter()) {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
        out
    }

    /// The job a token names, if any key authenticates it. Case-insensitive.
    pub fn verify(&self, purpose: Purpose, token: &str) -> Option<JobId> {
        let raw = decode_hex(token)?;
        let (id, mac) = raw.split_at(8);
        let id: [u8; 8] = id.try_into().ok()?;
        let ok = self
            .keys
            .iter()
            .any(|k| bool::from(Self::mac(k, purpose, &id).ct_eq(mac)));
        ok.then(|| JobId::from(u64::from_be_bytes(id)))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn decode_hex(s: &str) -> Option<[u8; 16]> {
    let s = s.as_bytes();
    if s.len() != TOKEN_LEN {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: JobId = JobId {
        campaign: 7,
        index: 123_456,
    };

    #[test]
    fn round_trips_and_is_case_insensitive() {
        let t = Tokens::new(&["0123456789abcdef0123"]);
        let tok = t.issue(Purpose::Verp, JOB);
        assert_eq!(tok.len(), TOKEN_LEN);
        assert!(tok.starts_with("00000007"), "{tok}");
        assert_eq!(t.verify(Purpose::Verp, &tok), Some(JOB));
        assert_eq!(
            t.verify(Purpose::Verp, &tok.to_ascii_uppercase()),
            Some(JOB)
        );
    }

    #[test]
    fn refuses_forgeries_other_purposes_and_garbage() {
        let t = Tokens::new(&["0123456789abcdef0123"]);
        let tok = t.issue(Purpose::Unsubscribe, JOB);
        assert_eq!(t.verify(Purpose::Verp, &tok), None, "purposes are separate");
        // Another job id with the same MAC.
        let forged = format!("00000008{}", &tok[8..]);
        assert_eq!(t.verify(Purpose::Unsubscribe, &forged), None);
        for bad in [
            "",
            "zz",
            &tok[..31],
            &format!("{tok}0"),
            &tok.replace('0', "g"),
        ] {
            assert_eq!(t.verify(Purpose::Unsubscribe, bad), None, "{bad:?}");
        }
        let other = Tokens::new(&["another key, 16+ bytes"]);
        assert_eq!(other.verify(Purpose::Unsubscribe, &tok), None);
    }

    #[test]
    fn old_keys_still_verify_after_rotation() {
        let old = Tokens::new(&["the old key 0123456"]);
        let tok = old.issue(Purpose::Trace, JOB);
        let rotated = Tokens::new(&["the new key 0123456", "the old key 0123456"]);
        assert_eq!(rotated.verify(Purpose::Trace, &tok), Some(JOB));
        assert_ne!(rotated.issue(Purpose::Trace, JOB), tok, "the new key signs");
    }
}
