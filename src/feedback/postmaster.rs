//! Mail to the role addresses every mail domain must have: `postmaster` (RFC 5321 §4.5.1, also
//! bare, without a domain) and `abuse` (RFC 2142), at the bounce domain. The bounce listener
//! accepts them beside its VERP and feedback addresses. What arrives is forwarded to
//! `bounce.operator_address` through Sluice's own delivery, wrapped as an attachment in a
//! message from `postmaster@` of the bounce domain (so the original reaches the operator
//! unchanged, its authentication intact, and nobody else's From is ever signed with our keys);
//! with no operator address it is kept in the spool for `GET /v1/inbound`, the latest
//! [`MAX_KEPT`].

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::intake::address::Address;
use crate::intake::raw::{Submission, check, ingest, rfc2822_date};
use crate::node::Node;
use crate::store::spool::{Durability, SpoolError};

/// Kept messages beyond this many are dropped, oldest first.
pub const MAX_KEPT: usize = 1_000;

/// What the listener knows about a message for a role address.
pub struct Arrival<'a> {
    pub client: IpAddr,
    pub mail_from: &'a str,
    pub rcpts: &'a [String],
}

/// A kept message's summary, as `GET /v1/inbound` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub id: String,
    pub received_at: String,
    pub client: String,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub from: String,
    pub subject: String,
    pub size: usize,
}

/// Forwards or keeps one message; the text of the 250 reply, or why it failed (a 451 then).
pub async fn take(node: &Arc<Node>, a: &Arrival<'_>, message: &[u8]) -> Result<String, String> {
    let now = crate::now_ms();
    match &node.config.bounce.operator_address {
        Some(operator) => {
            let host = node
                .config
                .bounce
                .domain
                .as_deref()
                .unwrap_or(&node.config.delivery.ehlo_name);
            let wrapped = wrap(host, operator, a, message, now);
            let why_kept = match (check(&wrapped), Address::parse(operator)) {
                (Ok(checked), Ok(to)) => {
                    let s = Submission::ours(checked, to, "forward");
                    let q = ingest(node, s, |_, _| {})
                        .await
                        .map_err(|e| e.to_string())?;
                    if q.queued > 0 {
                        tracing::info!(client = %a.client, mail_from = a.mail_from, rcpt = ?a.rcpts, forwarded = ?q.id.map(|j| j.to_string()), "role address mail forwarded to the operator");
                        return Ok("forwarded to the operator".into());
                    }
                    "the operator address is suppressed".to_owned()
                }
                (Err(e), _) => format!(
                    "the forward is not a valid message: {}: {}",
                    e.field, e.message
                ),
                (_, Err(e)) => format!("the operator address: {e}"),
            };
            // Kept rather than lost, and rather than refused to a sender who did nothing wrong.
            let id = keep(node, a, message, now)
                .await
                .map_err(|e| e.to_string())?;
            tracing::warn!(operator = %operator, %id, reason = %why_kept, "role address mail could not be forwarded; kept for GET /v1/inbound");
            Ok(format!("kept as {id}"))
        }
        None => {
            let id = keep(node, a, message, now)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(client = %a.client, mail_from = a.mail_from, rcpt = ?a.rcpts, %id, "role address mail kept for GET /v1/inbound");
            Ok(format!("kept as {id}"))
        }
    }
}

/// The forwarded message: a short note of the envelope, then the original as `message/rfc822`
/// (or base64 `application/octet-stream` when it has lines a message part may not have).
fn wrap(host: &str, operator: &str, a: &Arrival<'_>, message: &[u8], now: u64) -> Vec<u8> {
    let boundary = format!("=_sluice_{}", uuid::Uuid::now_v7().simple());
    let (_, subject) = from_and_subject(message);
    let role = a
        .rcpts
        .first()
        .and_then(|r| r.split('@').next())
        .unwrap_or("postmaster")
        .to_ascii_lowercase();
    let mut out = format!(
        "From: Sluice <postmaster@{host}>\r\nTo: <{operator}>\r\nSubject: [{role}] {}\r\nDate: {}\r\nMIME-Version: 1.0\r\nAuto-Submitted: auto-forwarded\r\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nReceived from {}, envelope sender <{}>, {} bytes, attached as it arrived, for:\r\n",
        if subject.is_empty() { "(no subject)" } else { &subject },
        rfc2822_date(now),
        a.client,
        a.mail_from.chars().take(256).collect::<String>(),
        message.len(),
    )
    .into_bytes();
    for r in a.rcpts {
        out.extend_from_slice(format!("  {r}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
    if fits_a_message_part(message) {
        out.extend_from_slice(b"Content-Type: message/rfc822\r\n");
        if !message.is_ascii() {
            out.extend_from_slice(b"Content-Transfer-Encoding: 8bit\r\n");
        }
        out.extend_from_slice(
            b"Content-Disposition: attachment; filename=\"original.eml\"\r\n\r\n",
        );
        out.extend_from_slice(message);
        if !message.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    } else {
        out.extend_from_slice(
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"original.eml\"\r\n\r\n",
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode(message);
        for line in encoded.as_bytes().chunks(76) {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// Whether `message` may be a `message/rfc822` part as it is: CRLF line ends only, no line
/// over 998 octets.
fn fits_a_message_part(message: &[u8]) -> bool {
    let mut line = 0usize;
    let mut prev = 0u8;
    for &b in message {
        match b {
            b'\n' if prev != b'\r' => return false,
            b'\n' => line = 0,
            _ if prev == b'\r' => return false,
            b'\r' => {}
            _ => {
                line += 1;
                if line > 998 {
                    return false;
                }
            }
        }
        prev = b;
    }
    prev != b'\r'
}

/// The From and Subject field values of `message` as one line each (unfolded by the report
/// parser's field reader, control characters dropped, at most 200 characters), empty when
/// absent.
fn from_and_subject(message: &[u8]) -> (String, String) {
    let end = memchr::memmem::find(message, b"\r\n\r\n")
        .or_else(|| memchr::memmem::find(message, b"\n\n"))
        .unwrap_or(message.len());
    let head = String::from_utf8_lossy(&message[..end]);
    let fields: Vec<(String, String)> = super::field_groups(&head).into_iter().flatten().collect();
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| {
                v.chars()
                    .filter(|c| !c.is_control())
                    .take(200)
                    .collect::<String>()
            })
            .unwrap_or_default()
    };
    (get("from"), get("subject"))
}

/// Stores the message (summary and bytes, synced) and drops the oldest beyond [`MAX_KEPT`].
async fn keep(
    node: &Arc<Node>,
    a: &Arrival<'_>,
    message: &[u8],
    now: u64,
) -> Result<String, SpoolError> {
    let key = uuid::Uuid::now_v7();
    let id = key.simple().to_string();
    let (from, subject) = from_and_subject(message);
    let summary = Summary {
        id: id.clone(),
        received_at: crate::effects::delivery_log::rfc3339(now),
        client: a.client.to_string(),
        mail_from: a.mail_from.to_owned(),
        rcpt_to: a.rcpts.to_vec(),
        from,
        subject,
        size: message.len(),
    };
    let mut batch = node.spool.batch();
    batch.put_inbound(key.as_bytes(), &encode(&summary, message));
    node.spool.write(batch, Durability::Sync).await?;
    let spool = Arc::clone(&node.spool);
    let old = tokio::task::spawn_blocking(move || spool.inbound_keys())
        .await
        .map_err(|e| SpoolError::Rocks(e.to_string()))??;
    if old.len() > MAX_KEPT {
        let mut batch = node.spool.batch();
        for k in &old[..old.len() - MAX_KEPT] {
            batch.delete_inbound(k);
        }
        node.spool.write(batch, Durability::Buffered).await?;
    }
    Ok(id)
}

/// Stored form: the summary's JSON length (u32 big-endian), the JSON, the message.
fn encode(summary: &Summary, message: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(summary).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + json.len() + message.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(message);
    out
}

/// The summary and the message of a stored value; `None` when it is not one.
pub fn decode(value: &[u8]) -> Option<(Summary, &[u8])> {
    let len = u32::from_be_bytes(value.get(..4)?.try_into().ok()?) as usize;
    let json = value.get(4..4 + len)?;
    Some((serde_json::from_slice(json).ok()?, &value[4 + len..]))
}

/// The spool key of a kept message's id (32 hex digits).
pub fn key_of(id: &str) -> Option<[u8; 16]> {
    uuid::Uuid::try_parse(id).ok().map(|u| *u.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(extra: &str) -> Config {
        let text = format!(
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n[delivery]\nehlo_name = \"mta.example.com\"\n{extra}"
        );
        toml::from_str(&text).expect("config parses")
    }

    #[test]
    fn role_addresses_of_the_bounce_domain_only() {
        let c = config(
            "[bounce]\ndomain = \"bounces.example.com\"\n[message]\nunsubscribe_mailto = \"u@unsub.example.com\"\n",
        );
        for yes in [
            "postmaster",
            "PostMaster",
            "postmaster@bounces.example.com",
            "Abuse@BOUNCES.example.com",
            "postmaster@mta.example.com",
            "abuse@unsub.example.com",
        ] {
            assert!(c.is_role_address(yes), "{yes}");
        }
        for no in [
            "postmaster@example.org",
            "abuse@example.com",
            "hostmaster@bounces.example.com",
            "postmaster+x@bounces.example.com",
            "abuse",
        ] {
            assert!(!c.is_role_address(no), "{no}");
        }
    }

    #[test]
    fn without_a_bounce_domain_the_signing_domains_count() {
        let c = config(
            "[[dkim]]\ndomain = \"shop.example\"\nselector = \"s1\"\nalgorithm = \"ed25519-sha256\"\nkey_file = \"k.pem\"\n",
        );
        assert!(c.is_role_address("abuse@shop.example"));
        assert!(!c.is_role_address("abuse@other.example"));
    }

    fn arrival() -> (IpAddr, Vec<String>) {
        (
            IpAddr::from([192, 0, 2, 7]),
            vec!["abuse@bounces.example.com".to_owned()],
        )
    }

    #[test]
    fn the_original_is_attached_unchanged_and_the_wrapper_passes_the_checks() {
        let (client, rcpts) = arrival();
        let a = Arrival {
            client,
            mail_from: "reporter@isp.example",
            rcpts: &rcpts,
        };
        let original = b"From: Reporter <reporter@isp.example>\r\nSubject: Spam from\r\n your IP\r\n\r\nSee attached.\r\n.\r\n";
        let w = wrap("bounces.example.com", "ops@example.com", &a, original, 0);
        let c = check(&w).expect("the wrapper is a good message");
        assert_eq!(c.from, "postmaster@bounces.example.com");
        assert_eq!(c.subject, "[abuse] Spam from your IP");
        let text = String::from_utf8_lossy(&w);
        assert!(text.contains("Content-Type: message/rfc822\r\n"), "{text}");
        assert!(
            text.contains("from 192.0.2.7, envelope sender <reporter@isp.example>"),
            "{text}"
        );
        let at = memchr::memmem::find(&w, original).expect("original inside");
        assert!(w[at + original.len()..].starts_with(b"--=_sluice_"));
    }

    #[test]
    fn an_original_with_long_or_bare_lines_goes_as_base64() {
        let (client, rcpts) = arrival();
        let a = Arrival {
            client,
            mail_from: "",
            rcpts: &rcpts,
        };
        let mut long = b"Subject: x\r\n\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'a', 2000));
        for original in [long, b"Subject: y\n\nbare\n".to_vec()] {
            let w = wrap("b.example", "ops@example.com", &a, &original, 0);
            check(&w).expect("the wrapper is a good message");
            let text = String::from_utf8_lossy(&w);
            assert!(text.contains("Content-Transfer-Encoding: base64"), "{text}");
        }
    }

    #[test]
    fn stored_values_read_back_and_garbage_does_not() {
        let s = Summary {
            id: "x".into(),
            received_at: "2026-12-03T00:00:00Z".into(),
            client: "192.0.2.7".into(),
            mail_from: String::new(),
            rcpt_to: vec!["postmaster".into()],
            from: "a@b".into(),
            subject: "hi".into(),
            size: 3,
        };
        let v = encode(&s, b"abc");
        let (back, message) = decode(&v).expect("decodes");
        assert_eq!((back.subject.as_str(), message), ("hi", &b"abc"[..]));
        assert!(decode(b"\xff\xff\xff\xffzz").is_none());
        assert!(decode(b"").is_none());
    }
}
