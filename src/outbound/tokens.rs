//! Authenticated job tokens: the VERP return path, the one-click unsubscribe link and the trace
//! header all carry one, so whatever comes back (a DSN, a click, a complaint report that redacts
//! the recipient) maps to its job and cannot be forged.
//!
//! A token is lowercase hex: the 8-byte job id, then (cluster mode) a 4-byte tag of the node that
//! sent the job, then the first 8 bytes of HMAC-SHA256(key, purpose byte ‖ job id ‖ tag): 32
//! characters on a single node, 40 in cluster mode. Job ids are per node, so the tag is what
//! lets a node that receives a token another node issued (a bounce or an unsubscribe can reach
//! any node of a fleet) tell that the job is not its own and hand the report to its owner
//! ([`Tokens::owner`]) rather than apply it to a job of its own with the same id. The purpose
//! byte keeps the three uses apart: an unsubscribe token read off a message header is no good as
//! a VERP token. The first configured key signs and every key verifies, so keys rotate without
//! breaking mail in flight. Hex rather than base64 because mail systems may change the case of a
//! local part. Pure CPU, no I/O.

use ring::hmac;
use subtle::ConstantTimeEq;

use crate::store::spool::JobId;

/// Length of a token without a node tag, in characters.
pub const TOKEN_LEN: usize = 32;
const MAC_LEN: usize = 8;
const TAG_LEN: usize = 4;

/// Which node issued a token (cluster mode): the first bytes of SHA-256 of its `node_id`.
pub type NodeTag = [u8; TAG_LEN];

/// The tag of node `node_id`.
pub fn node_tag(node_id: &str) -> NodeTag {
    let digest = ring::digest::digest(&ring::digest::SHA256, node_id.as_bytes());
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&digest.as_ref()[..TAG_LEN]);
    tag
}

/// What an authentic token names ([`Tokens::owner`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A job of this node.
    Here(JobId),
    /// A job of another node of the cluster, the one with this tag.
    Node(NodeTag),
}

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

/// The token keys, loaded once from `secrets.token_keys`, and this node's tag in cluster mode.
pub struct Tokens {
    keys: Vec<hmac::Key>,
    node: Option<NodeTag>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Tokens")
            .field("keys", &self.keys.len())
            .field("node", &self.node)
            .finish()
    }
}

impl Tokens {
    /// Keys in order; the first signs. The config guarantees at least one. `node`: this node's
    /// tag in cluster mode, which its tokens carry.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S], node: Option<NodeTag>) -> Tokens {
        Tokens {
            keys: secrets
                .iter()
                .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_ref()))
                .collect(),
            node,
        }
    }

    fn mac(key: &hmac::Key, purpose: Purpose, id: &[u8; 8], tag: &[u8]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(key);
        ctx.update(&[purpose.byte()]);
        ctx.update(id);
        ctx.update(tag);
        let sig = ctx.sign();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&sig.as_ref()[..MAC_LEN]);
        out
    }

    /// The token for `job`, signed with the first key.
    pub fn issue(&self, purpose: Purpose, job: JobId) -> String {
        let id = job.key();
        let tag: &[u8] = self.node.as_ref().map_or(&[], |t| t.as_slice());
        let key = self.keys.first().expect("at least one token key");
        let mac = Self::mac(key, purpose, &id, tag);
        let mut out = String::with_capacity(TOKEN_LEN + 2 * tag.len());
        push_hex(&mut out, id.iter().chain(tag).chain(mac.iter()));
        out
    }

    /// The job of this node a token names, if any key authenticates it and it is not another
    /// node's. Case-insensitive.
    pub fn verify(&self, purpose: Purpose, token: &str) -> Option<JobId> {
        match self.owner(purpose, token)? {
            Owner::Here(job) => Some(job),
            Owner::Node(_) => None,
        }
    }

    /// Whose job an authentic token names: this node's, or (cluster mode) another node's. A
    /// token without a tag is taken as this node's (issued before cluster mode, or on a single
    /// node). Case-insensitive.
    pub fn owner(&self, purpose: Purpose, token: &str) -> Option<Owner> {
        let mut raw = [0u8; 8 + TAG_LEN + MAC_LEN];
        let len = decode_hex(token, &mut raw)?;
        let (id, rest) = raw[..len].split_at(8);
        let (tag, mac) = rest.split_at(rest.len() - MAC_LEN);
        let id: [u8; 8] = id.try_into().ok()?;
        let ok = self
            .keys
            .iter()
            .any(|k| bool::from(Self::mac(k, purpose, &id, tag).ct_eq(mac)));
        if !ok {
            return None;
        }
        match (NodeTag::try_from(tag), self.node) {
            (Ok(theirs), Some(mine)) if theirs != mine => Some(Owner::Node(theirs)),
            // Another node's tag on a node without one: not a job of this node.
            (Ok(_), None) => None,
            _ => Some(Owner::Here(JobId::from(u64::from_be_bytes(id)))),
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `bytes` to `out` as lowercase hex, as tokens write them.
fn push_hex<'a>(out: &mut String, bytes: impl Iterator<Item = &'a u8>) {
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
}

/// A node tag as text (lowercase hex, as in the node's tokens).
pub fn tag_hex(tag: &NodeTag) -> String {
    let mut out = String::with_capacity(2 * TAG_LEN);
    push_hex(&mut out, tag.iter());
    out
}

/// Decodes a token of either length into `out`; returns the bytes written.
fn decode_hex(s: &str, out: &mut [u8; 8 + TAG_LEN + MAC_LEN]) -> Option<usize> {
    let s = s.as_bytes();
    if s.len() != TOKEN_LEN && s.len() != TOKEN_LEN + 2 * TAG_LEN {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(s.len() / 2)
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
        let t = Tokens::new(&["0123456789abcdef0123"], None);
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
        let t = Tokens::new(&["0123456789abcdef0123"], None);
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
        let other = Tokens::new(&["another key, 16+ bytes"], None);
        assert_eq!(other.verify(Purpose::Unsubscribe, &tok), None);
    }

    #[test]
    fn old_keys_still_verify_after_rotation() {
        let old = Tokens::new(&["the old key 0123456"], None);
        let tok = old.issue(Purpose::Trace, JOB);
        let rotated = Tokens::new(&["the new key 0123456", "the old key 0123456"], None);
        assert_eq!(rotated.verify(Purpose::Trace, &tok), Some(JOB));
        assert_ne!(rotated.issue(Purpose::Trace, JOB), tok, "the new key signs");
    }

    #[test]
    fn cluster_tokens_name_their_node() {
        let keys = ["0123456789abcdef0123"];
        let (a, b) = (node_tag("node-a"), node_tag("node-b"));
        let on_a = Tokens::new(&keys, Some(a));
        let on_b = Tokens::new(&keys, Some(b));
        let tok = on_a.issue(Purpose::Unsubscribe, JOB);
        assert_eq!(tok.len(), TOKEN_LEN + 8);
        assert_eq!(on_a.verify(Purpose::Unsubscribe, &tok), Some(JOB));
        assert_eq!(
            on_a.owner(Purpose::Unsubscribe, &tok),
            Some(Owner::Here(JOB))
        );
        // Node B has a job with the same id: the token is not about it.
        assert_eq!(on_b.verify(Purpose::Unsubscribe, &tok), None);
        assert_eq!(on_b.owner(Purpose::Unsubscribe, &tok), Some(Owner::Node(a)));
        // The tag is under the MAC: moving a token to another node does not verify.
        let moved = format!("{}{}{}", &tok[..16], tag_hex(&b), &tok[24..]);
        assert_eq!(on_b.owner(Purpose::Unsubscribe, &moved), None);
        assert_eq!(on_a.owner(Purpose::Unsubscribe, &moved), None);
        // A single node takes no tagged token as its own; a tagless one is anyone's own.
        let single = Tokens::new(&keys, None);
        assert_eq!(single.verify(Purpose::Unsubscribe, &tok), None);
        let old = single.issue(Purpose::Unsubscribe, JOB);
        assert_eq!(
            on_b.owner(Purpose::Unsubscribe, &old),
            Some(Owner::Here(JOB))
        );
    }
}
