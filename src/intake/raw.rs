//! Raw messages: MIME a client composed itself, taken over SMTP ([`crate::intake::submission`])
//! or `POST /v1/messages/raw`, checked and queued once however many recipients it has.
//!
//! [`check`] reads the header section and refuses what receivers refuse: a line over 998
//! octets, a CR or LF that is not part of a CRLF, a header line that is neither a field nor a
//! continuation, no From or more than one, more than one of the fields RFC 5322 §3.6 allows once.
//! It takes out the `X-Sluice-*` fields (campaign, tags, pool, priority), which choose how the
//! message is sent and never leave. [`ingest`] then adds what the message lacks (Message-ID,
//! Date) and a Received trace field, and queues it as one message of its stream's bucket: the
//! bytes are stored once, under the key of its first recipient's job, and every recipient is a
//! job whose record ([`CampaignRecord::raw`]) points at them. The message is not personalised,
//! so its recipients are in the bucket's address index: a report about a shared copy finds the
//! recipient it names.

use std::sync::Arc;

use crate::intake::address::Address;
use crate::intake::ingest::{FieldError, Upload, UploadError, ValidRecipient};
use crate::node::{BucketError, Node};
pub use crate::store::campaign::Ret;
use crate::store::campaign::{CampaignKind, CampaignRecord, CampaignState, RawMeta, Schedule};
use crate::store::spool::{JobId, SpoolBatch};
use crate::store::tenants::Tenant;

/// RFC 5322 §2.1.1: a line is at most 998 octets, CRLF excluded.
pub const MAX_LINE: usize = 998;
/// The stream raw messages belong to when they name none (`X-Sluice-Campaign`).
pub const DEFAULT_STREAM_SMTP: &str = "smtp";
pub const DEFAULT_STREAM_HTTP: &str = "raw";
/// The stream of the DSNs Sluice sends to submitters.
pub const DEFAULT_STREAM_DSN: &str = "dsn";
/// The stream of mail to postmaster@ and abuse@ forwarded to the operator.
pub const DEFAULT_STREAM_FORWARD: &str = "operator";

/// Fields RFC 5322 §3.6 allows at most once (From exactly once).
const SINGLE: [&str; 9] = [
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
];

/// A message as checked: its bytes without the `X-Sluice-*` fields, and what was read from its
/// header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub bytes: Vec<u8>,
    /// The From address (the first, if it names several).
    pub from: String,
    pub subject: String,
    pub has_message_id: bool,
    pub has_date: bool,
    /// `X-Sluice-Campaign`: the stream it is counted and reported under.
    pub campaign: Option<String>,
    /// `X-Sluice-Tags`, comma-separated.
    pub tags: Vec<String>,
    /// `X-Sluice-Pool`.
    pub pool: Option<String>,
    /// `X-Sluice-Priority`: `low`, `normal`, `high` or 0 to 9.
    pub priority: Option<String>,
}

/// What is wrong with a message: the field at fault (`from`, `subject`, a header name, `line`,
/// `headers`) and a sentence for the client.
pub type RawError = FieldError;

fn bad(field: &str, message: impl Into<String>) -> RawError {
    FieldError::new(field, message)
}

/// A message uploaded over HTTP in a file's line endings: LF alone (a Unix file) becomes CRLF
/// when the message has no CR at all; a message that mixes them is refused by [`check`]. A
/// missing final line ending is added.
pub fn normalise_line_endings(bytes: Vec<u8>) -> Vec<u8> {
    let mut bytes = if !bytes.contains(&b'\r') && bytes.contains(&b'\n') {
        let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 40);
        for &b in &bytes {
            if b == b'\n' {
                out.push(b'\r');
            }
            out.push(b);
        }
        out
    } else {
        bytes
    };
    if !bytes.is_empty() && !bytes.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes
}

/// Checks a message whose lines end in CRLF (as SMTP delivers it), and takes out the
/// `X-Sluice-*` fields.
pub fn check(message: &[u8]) -> Result<Checked, RawError> {
    if message.is_empty() {
        return Err(bad("message", "the message is empty"));
    }
    // Lines: every CR and LF is part of a CRLF, and no line is longer than RFC 5322 allows.
    let mut start = 0;
    let mut number = 0usize;
    let mut lines: Vec<(usize, usize)> = Vec::new();
    while start < message.len() {
        number += 1;
        let end = memchr::memchr(b'\n', &message[start..]).map(|i| start + i);
        let Some(end) = end else {
            return Err(bad("line", format!("line {number} does not end in CRLF")));
        };
        if end == start || message[end - 1] != b'\r' {
            return Err(bad(
                "line",
                format!("line {number} ends in a bare LF; lines end in CRLF"),
            ));
        }
        let line = &message[start..end - 1];
        if memchr::memchr(b'\r', line).is_some() {
            return Err(bad("line", format!("line {number} holds a bare CR")));
        }
        if line.len() > MAX_LINE {
            return Err(bad(
                "line",
                format!(
                    "line {number} is {} octets long; RFC 5322 allows {MAX_LINE}",
                    line.len()
                ),
            ));
        }
        lines.push((start, end + 1));
        start = end + 1;
    }
    // The header section: fields and their continuation lines, up to the first empty line.
    struct Field {
        name: String,
        /// Byte range of the whole field, continuation lines included.
        range: (usize, usize),
        value: String,
    }
    let mut fields: Vec<Field> = Vec::new();
    let mut body_start = message.len();
    for (i, &(s, e)) in lines.iter().enumerate() {
        let line = &message[s..e - 2];
        if line.is_empty() {
            body_start = e;
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            let Some(f) = fields.last_mut() else {
                return Err(bad(
                    "headers",
                    "the message starts with a continuation line, not a header field",
                ));
            };
            f.range.1 = e;
            f.value.push_str(&String::from_utf8_lossy(line));
            continue;
        }
        let colon = memchr::memchr(b':', line);
        let name = colon.map(|c| &line[..c]);
        match name {
            Some(n) if !n.is_empty() && n.iter().all(|&b| (33..=126).contains(&b)) => {
                fields.push(Field {
                    name: String::from_utf8_lossy(n).to_ascii_lowercase(),
                    range: (s, e),
                    value: String::from_utf8_lossy(&line[n.len() + 1..]).into_owned(),
                });
            }
            _ => {
                return Err(bad(
                    "headers",
                    format!(
                        "header line {} is neither a field (Name: value) nor a continuation; an empty line must separate the header from the body",
                        i + 1
                    ),
                ));
            }
        }
    }
    for name in SINGLE {
        let n = fields.iter().filter(|f| f.name == name).count();
        if name == "from" && n == 0 {
            return Err(bad("from", "the message has no From field"));
        }
        if n > 1 {
            return Err(bad(
                name,
                format!("the message has {n} {name} fields; RFC 5322 allows one"),
            ));
        }
    }
    let header_end = fields.last().map_or(0, |f| f.range.1);
    let parsed = mail_parser::MessageParser::default()
        .parse_headers(&message[..header_end.max(body_start.min(message.len()))])
        .ok_or_else(|| bad("headers", "the header section cannot be read"))?;
    let from = parsed
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .ok_or_else(|| bad("from", "the From field holds no address"))?;
    let from = Address::parse(from)
        .map_err(|e| bad("from", format!("the From address: {e}")))?
        .into_string();
    let subject = parsed.subject().unwrap_or("").to_owned();
    let mut checked = Checked {
        bytes: Vec::with_capacity(message.len()),
        from,
        subject,
        has_message_id: fields.iter().any(|f| f.name == "message-id"),
        has_date: fields.iter().any(|f| f.name == "date"),
        campaign: None,
        tags: Vec::new(),
        pool: None,
        priority: None,
    };
    let mut copied = 0;
    for f in &fields {
        let Some(ours) = f.name.strip_prefix("x-sluice-") else {
            continue;
        };
        let value = f.value.trim().to_owned();
        match ours {
            "campaign" => checked.campaign = Some(value),
            "tags" => {
                checked.tags = value
                    .split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect();
            }
            "pool" => checked.pool = Some(value),
            "priority" => checked.priority = Some(value),
            // Anything else of ours (a trace field of a message sent back in) is dropped too.
            _ => {}
        }
        checked.bytes.extend_from_slice(&message[copied..f.range.0]);
        copied = f.range.1;
    }
    checked.bytes.extend_from_slice(&message[copied..]);
    Ok(checked)
}

/// A recipient of a raw message, with its RFC 3461 request.
#[derive(Debug, Clone)]
pub struct Recipient {
    pub address: Address,
    /// `NOTIFY=`, upper-case, comma-separated as given (`NEVER`, or some of `SUCCESS`,
    /// `FAILURE`, `DELAY`); `None`: the default (failures and delays).
    pub notify: Option<String>,
    /// `ORCPT=`, decoded (`rfc822;someone@example.com`).
    pub orcpt: Option<String>,
}

impl Recipient {
    /// The DSN request as the job's `vars` keep it: JSON, or empty when there is none.
    fn dsn_json(&self) -> String {
        if self.notify.is_none() && self.orcpt.is_none() {
            return String::new();
        }
        serde_json::json!({"notify": self.notify, "orcpt": self.orcpt}).to_string()
    }
}

/// One raw message to queue.
pub struct Submission {
    /// As [`check`] returned it.
    pub checked: Checked,
    pub recipients: Vec<Recipient>,
    /// The submitter's envelope sender, where DSNs about this message go (empty: none).
    pub mail_from: String,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    /// `smtp` or `http`; `dsn` for a DSN of ours, `forward` for role-address mail forwarded
    /// to the operator (both sent with the null return path).
    pub via: &'static str,
    /// The Received field to put on top (without its CRLF), naming the client; none for a DSN
    /// of ours.
    pub received: Option<String>,
    /// The tenant whose key submitted it: its From domain must be one of the tenant's, and it
    /// counts against the tenant's daily quota. `None` for mail of our own and from trusted
    /// networks: the default tenant, unchecked.
    pub tenant: Option<Arc<Tenant>>,
}

impl Submission {
    /// A message of ours (a DSN, forwarded role-address mail) to one address, with the null
    /// return path and no DSN request of its own.
    pub fn ours(checked: Checked, to: Address, via: &'static str) -> Submission {
        Submission {
            checked,
            recipients: vec![Recipient {
                address: to,
                notify: None,
                orcpt: None,
            }],
            mail_from: String::new(),
            ret: None,
            envid: None,
            via,
            received: None,
            tenant: None,
        }
    }
}

/// What [`ingest`] queued: the message's id (its first job) and the recipients queued and found
/// suppressed.
#[derive(Debug, Clone)]
pub struct Queued {
    pub id: Option<JobId>,
    pub campaign: uuid::Uuid,
    pub stream: String,
    pub queued: usize,
    /// Recipients on a suppression list: their position among the recipients, address and why.
    pub suppressed: Vec<(usize, String, crate::effects::suppression::Reason)>,
}

/// Why [`ingest`] queued nothing.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The message or a choice it makes (`X-Sluice-*`) is refused: permanent.
    #[error("{}: {}", .0.field, .0.message)]
    Invalid(RawError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error(transparent)]
    Bucket(#[from] BucketError),
    /// The tenant's daily quota would be passed: temporary.
    #[error("the daily quota of {} recipients is reached ({} accepted today)", .0.quota, .0.used)]
    Quota(crate::store::tenants::QuotaExceeded),
}

pub use crate::config::MAX_MESSAGE_RECIPIENTS as MAX_RECIPIENTS;

/// Queues `s`: synced to the spool when this returns `Ok`, together with what `finish` adds to
/// the commit's batch (an idempotency record) from the answer.
pub async fn ingest(
    node: &Arc<Node>,
    s: Submission,
    finish: impl FnOnce(&Queued, &mut SpoolBatch),
) -> Result<Queued, IngestError> {
    let now = crate::now_ms();
    let record = record(node, &s, now).map_err(IngestError::Invalid)?;
    if s.recipients.is_empty() || s.recipients.len() > MAX_RECIPIENTS {
        return Err(IngestError::Invalid(bad(
            "to",
            format!(
                "a message has 1 to {MAX_RECIPIENTS} recipients, not {}",
                s.recipients.len()
            ),
        )));
    }
    let mut record = record;
    let tenant = s
        .tenant
        .clone()
        .unwrap_or_else(|| node.tenants.default_tenant());
    if s.tenant.is_some() {
        let domain = crate::effects::guard::domain_of(&record.from);
        if !tenant.may_send_as(&domain) {
            return Err(IngestError::Invalid(bad(
                "From",
                format!(
                    "{domain} is not a sending domain of tenant {:?}",
                    tenant.name()
                ),
            )));
        }
        record.tenant = crate::store::tenants::record_field(tenant.name());
        if record.pool.is_none() {
            record.pool.clone_from(&tenant.spec.pool);
        }
    }
    let quota = tenant
        .reserve(s.recipients.len() as u64, now)
        .map_err(IngestError::Quota)?;
    let stream = record.stream.clone().unwrap_or_default();
    let bucket = node
        .stream_bucket(tenant.name(), &stream, record.schedule.priority, now)
        .await?;
    record.id = bucket.record.id;
    let bytes = assemble_stored(&s, &record, bucket.seq, now);
    let n = s.recipients.len() as u32;
    let mut upload = Upload::for_raw(Arc::clone(node), Arc::clone(&bucket), record, bytes, n)?;
    let mut suppressed = Vec::new();
    let mut first = None;
    for (i, r) in s.recipients.iter().enumerate() {
        let vars = r.dsn_json();
        let valid = ValidRecipient {
            address: r.address.clone(),
            vars: &vars,
        };
        if let Some(reason) = upload.add(&valid).await? {
            suppressed.push((i, r.address.as_str().to_owned(), reason));
        }
        first = first.or(upload.last_job());
    }
    let answer = Queued {
        id: first,
        campaign: bucket.record.id,
        stream,
        queued: upload.len(),
        suppressed,
    };
    upload
        .commit(|batch| {
            quota.stage(batch);
            finish(&answer, batch)
        })
        .await?;
    quota.confirm();
    Ok(answer)
}

/// The message's record: what reports show (From, Subject, tags) and how it is sent (stream,
/// pool, priority), from its header and the `X-Sluice-*` fields.
fn record(node: &Node, s: &Submission, now: u64) -> Result<CampaignRecord, RawError> {
    let c = &s.checked;
    let stream = match &c.campaign {
        Some(name) => crate::intake::ingest::check_stream(Some(name.clone()))
            .map_err(|e| bad("X-Sluice-Campaign", e.message))?,
        None => match s.via {
            "smtp" => DEFAULT_STREAM_SMTP.to_owned(),
            "dsn" => DEFAULT_STREAM_DSN.to_owned(),
            "forward" => DEFAULT_STREAM_FORWARD.to_owned(),
            _ => DEFAULT_STREAM_HTTP.to_owned(),
        },
    };
    let fields = crate::intake::ingest::CampaignFields {
        priority: c.priority.as_ref().map(|p| match p.parse::<u64>() {
            Ok(n) => serde_json::Value::from(n),
            Err(_) => serde_json::Value::from(p.to_ascii_lowercase()),
        }),
        ..Default::default()
    };
    let schedule: Schedule =
        crate::intake::ingest::check_schedule(&fields, CampaignKind::Transactional, now)
            .map_err(|e| bad("X-Sluice-Priority", e.message))?;
    crate::intake::ingest::check_tags(&c.tags).map_err(|e| bad("X-Sluice-Tags", e.message))?;
    if let Some(p) = &c.pool
        && !node.config.has_pool(p)
    {
        return Err(bad("X-Sluice-Pool", format!("no pool is named {p:?}")));
    }
    Ok(CampaignRecord {
        id: uuid::Uuid::nil(),
        kind: CampaignKind::Transactional,
        from: c.from.clone(),
        from_name: None,
        reply_to: None,
        subject: c.subject.chars().take(998).collect(),
        text: None,
        html: None,
        headers: Default::default(),
        tags: c.tags.clone(),
        attachments: Vec::new(),
        personalised: false,
        state: CampaignState::Active,
        created_at_ms: now,
        lifecycle: Default::default(),
        schedule,
        pool: c.pool.clone(),
        stream: Some(stream),
        raw: Some(RawMeta {
            body: 0,
            recipients: s.recipients.len() as u32,
            via: s.via.to_owned(),
            mail_from: s.mail_from.clone(),
            ret: s.ret,
            envid: s.envid.clone(),
        }),
        guard: None,
        breaker: Default::default(),
        tenant: None,
    })
}

/// The bytes stored and sent: the Received field, a Message-ID and Date when the message has
/// none (RFC 6409 §8: a submission server may add them), then the message.
fn assemble_stored(s: &Submission, record: &CampaignRecord, bucket: u32, now: u64) -> Vec<u8> {
    let c = &s.checked;
    let mut out = Vec::with_capacity(c.bytes.len() + 256);
    if let Some(received) = &s.received {
        out.extend_from_slice(received.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !c.has_message_id {
        let domain = crate::intake::address::domain_of(&c.from);
        // Unique without the job number, which is not known yet: the bucket, the time and a
        // process-wide counter.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        out.extend_from_slice(
            format!(
                "Message-ID: <{}.{bucket}.{now}.{seq}@{domain}>\r\n",
                record.id.simple()
            )
            .as_bytes(),
        );
    }
    if !c.has_date {
        out.extend_from_slice(format!("Date: {}\r\n", rfc2822_date(now)).as_bytes());
    }
    out.extend_from_slice(&c.bytes);
    out
}

/// `Thu, 03 Dec 2026 11:41:25 +0000`.
pub fn rfc2822_date(ms: u64) -> String {
    mail_builder::headers::date::Date::new((ms / 1000) as i64).to_rfc822()
}

/// The next item of `rx`, or `None` once `stop` is cancelled or the channel is closed.
async fn next<T>(
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<T> {
    tokio::select! {
        _ = stop.cancelled() => None,
        m = rx.recv() => m,
    }
}

/// Checks a message of ours (`bytes`) like any raw message and queues it to `to` with the null
/// return path; `whom` names the address in an error.
async fn queue_ours(
    node: &Arc<Node>,
    bytes: &[u8],
    to: &str,
    via: &'static str,
    whom: &str,
) -> Result<Queued, String> {
    let checked = check(bytes).map_err(|e| e.to_string())?;
    let to = Address::parse(to).map_err(|e| format!("{whom}: {e}"))?;
    ingest(node, Submission::ours(checked, to, via), |_, _| {})
        .await
        .map_err(|e| e.to_string())
}

/// Sends the DSNs the node's transitions ask for ([`crate::effects::dsn`]) until `stop`: each
/// is built, checked like any raw message and queued to the submitter with a null return path.
pub async fn send_dsns(node: Arc<Node>, stop: tokio_util::sync::CancellationToken) {
    use crate::effects::dsn::{DSNS, build};
    let Some(mut rx) = node.dsns.receiver() else {
        return;
    };
    while let Some(notice) = next(&mut rx, &stop).await {
        let host = &node.config.delivery.ehlo_name;
        let bytes = build(&notice, host, crate::now_ms());
        match queue_ours(&node, &bytes, &notice.to, "dsn", "the return path").await {
            Ok(q) => {
                DSNS.with_label_values(&["queued"]).inc();
                tracing::info!(job = %notice.job, to = %notice.to, dsn = ?q.id.map(|j| j.to_string()), "DSN queued to the submitter");
            }
            Err(e) => {
                DSNS.with_label_values(&["failed"]).inc();
                tracing::warn!(job = %notice.job, to = %notice.to, error = %e, "a DSN could not be queued");
            }
        }
    }
}

/// Queues the TLS report mail the delivery engine builds ([`crate::effects::tls_reports`])
/// until `stop`: each is checked like any raw message and queued with a null return path.
pub async fn send_report_mail(node: Arc<Node>, stop: tokio_util::sync::CancellationToken) {
    let Some(mut rx) = node.tls_reports.mail_receiver() else {
        return;
    };
    while let Some(out) = next(&mut rx, &stop).await {
        match queue_ours(&node, &out.bytes, &out.to, "tlsrpt", "the rua address").await {
            Ok(q) => {
                tracing::info!(to = %out.to, message = ?q.id.map(|j| j.to_string()), "TLS report queued")
            }
            Err(e) => tracing::warn!(to = %out.to, error = %e, "a TLS report could not be queued"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Checked {
        check(text.as_bytes()).unwrap_or_else(|e| panic!("{text:?}: {e:?}"))
    }

    fn err(text: &str) -> RawError {
        check(text.as_bytes()).expect_err(text)
    }

    #[test]
    fn a_plain_message_passes_and_our_fields_are_taken_out() {
        let c = ok(
            "From: Ann <ann@example.com>\r\nX-Sluice-Tags: a, b\r\nSubject: Hi\r\nX-Sluice-Campaign: receipts\r\n x\r\nX-Sluice-Pool: warm\r\nX-Sluice-Priority: high\r\n\r\nbody\r\n",
        );
        assert_eq!(c.from, "ann@example.com");
        assert_eq!(c.subject, "Hi");
        assert_eq!(c.tags, vec!["a", "b"]);
        assert_eq!(c.campaign.as_deref(), Some("receipts x"));
        assert_eq!(c.pool.as_deref(), Some("warm"));
        assert_eq!(c.priority.as_deref(), Some("high"));
        assert_eq!(
            c.bytes,
            b"From: Ann <ann@example.com>\r\nSubject: Hi\r\n\r\nbody\r\n"
        );
        assert!(!c.has_message_id && !c.has_date);
        // A header-only message is a message.
        assert_eq!(ok("From: a@b.test\r\n").bytes, b"From: a@b.test\r\n");
    }

    #[test]
    fn broken_messages_name_their_fault() {
        let cases = [
            ("From: a@b.test\r\nFrom: c@d.test\r\n\r\nx\r\n", "from"),
            ("Subject: x\r\n\r\nbody\r\n", "from"),
            ("From: a@b.test\r\nDate: x\r\nDate: y\r\n\r\n", "date"),
            ("From: a@b.test\r\n\r\nbare\nLF\r\n", "line"),
            ("From: a@b.test\r\n\r\nbare\rCR\r\n", "line"),
            ("From: a@b.test\r\n\r\nno end", "line"),
            (" folded: x\r\nFrom: a@b.test\r\n\r\n", "headers"),
            ("From: a@b.test\r\nno colon here\r\n\r\n", "headers"),
            ("From: a@b.test\r\nBad Name: x\r\n\r\n", "headers"),
            ("From: undisclosed\r\n\r\n", "from"),
            ("", "message"),
        ];
        for (text, field) in cases {
            assert_eq!(err(text).field, field, "{text:?}");
        }
        let long = format!("From: a@b.test\r\n\r\n{}\r\n", "x".repeat(999));
        let e = err(&long);
        assert_eq!(e.field, "line");
        assert!(e.message.contains("999 octets"), "{}", e.message);
        let fine = format!("From: a@b.test\r\n\r\n{}\r\n", "x".repeat(998));
        ok(&fine);
    }

    #[test]
    fn unix_files_get_crlf_and_mixed_ones_stay_refusable() {
        assert_eq!(
            normalise_line_endings(b"From: a@b.test\n\nx".to_vec()),
            b"From: a@b.test\r\n\r\nx\r\n"
        );
        let mixed = normalise_line_endings(b"From: a@b.test\r\n\nx\n".to_vec());
        assert_eq!(check(&mixed).expect_err("mixed").field, "line");
    }
}
