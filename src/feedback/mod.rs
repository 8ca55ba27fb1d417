//! Asynchronous feedback: RFC 3464 delivery status notifications (bounces that arrive after a
//! receiver accepted the message) and RFC 5965 ARF complaint reports, from the inbound SMTP
//! listener or `POST /v1/feedback`.
//!
//! [`parse`] is pure: raw message in, [`Report`] out (MIME by mail-parser, ARF by mail-auth, the
//! delivery-status fields here). [`process`] maps a report to its job — through the VERP token of
//! the envelope recipient, or the `X-Sluice-Ref` trace token or VERP return path in the returned
//! headers — and applies it: job state and counts, suppression, a delivery-log record. Its spool
//! reads and writes go through the spool's blocking pool. In cluster mode a report or an
//! unsubscribe whose token names another node's job is handed to that node ([`Change`]) through
//! the cluster's change stream, since job ids are per node.
//!
//! [`listener`] is the SMTP listener on `[bounce] listen` that feeds it; [`postmaster`] takes
//! the mail it accepts for the bounce domain's postmaster and abuse addresses.

pub mod listener;
pub mod postmaster;

use std::sync::Arc;

use mail_parser::{MessageParser, MimeHeaders, PartType};
use serde::{Deserialize, Serialize};

use crate::effects::delivery_log::LogRecord;
use crate::effects::suppression::{Entry, Reason};
use crate::effects::transition::Transition;
use crate::node::Node;
use crate::outbound::outcome::rules::{Category, Kind};
use crate::outbound::smtp::reply::EnhancedCode;
use crate::outbound::tokens::{NodeTag, Owner, Purpose, tag_hex};
use crate::store::spool::{Durability, JobId, JobRecord, JobState, SpoolError};

/// Per-recipient groups read from one DSN; more are ignored (a DSN for one of our messages names
/// one recipient).
const MAX_DSN_RECIPIENTS: usize = 100;
/// Longest field value kept from a report.
const MAX_FIELD: usize = 1000;

/// One per-recipient group of a DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRecipient {
    pub final_recipient: Option<String>,
    pub original_recipient: Option<String>,
    /// `failed`, `delayed`, `delivered`, `relayed` or `expanded`.
    pub action: String,
    pub status: EnhancedCode,
    /// The reply code of `Diagnostic-Code: smtp; 550 …`, when there is one.
    pub code: Option<u16>,
    /// The diagnostic text, without its type and reply code.
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    pub reporting_mta: Option<String>,
    pub recipients: Vec<DsnRecipient>,
    /// Headers of the returned message (text/rfc822-headers or message/rfc822), if included.
    pub returned_headers: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complaint {
    /// ARF Feedback-Type: `abuse`, `fraud`, `virus`, `not-spam`, `auth-failure`, `other`.
    pub feedback_type: &'static str,
    /// Original-Rcpt-To, absent or redacted by many providers.
    pub original_rcpt_to: Option<String>,
    pub user_agent: Option<String>,
    /// Headers (or the whole) of the reported message.
    pub returned_headers: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Dsn(Dsn),
    Complaint(Complaint),
    /// Not a report: an auto-reply, a person writing back. Accepted and ignored.
    NotAReport(String),
}

/// Why a message that claims to be a report cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a MIME message")]
    NotMime,
    #[error("multipart/report (report-type={0}) without a {1} part")]
    MissingPart(String, &'static str),
    #[error("delivery-status part: {0}")]
    BadDeliveryStatus(String),
    #[error("feedback report: {0}")]
    BadFeedbackReport(String),
}

/// Reads a raw message (CRLF or LF line ends).
pub fn parse(raw: &[u8]) -> Result<Report, ParseError> {
    let message = MessageParser::default()
        .parse(raw)
        .filter(|m| m.headers_raw().next().is_some())
        .ok_or(ParseError::NotMime)?;
    let root = message.root_part();
    let Some(ct) = root.content_type() else {
        return Ok(Report::NotAReport("no Content-Type".into()));
    };
    if !(ct.ctype().eq_ignore_ascii_case("multipart")
        && ct
            .subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("report")))
    {
        return Ok(Report::NotAReport(format!(
            "content type {}/{}",
            ct.ctype(),
            ct.subtype().unwrap_or("")
        )));
    }
    let report_type = ct
        .attribute("report-type")
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut status = None;
    let mut has_feedback = false;
    let mut returned = None;
    for part in message.parts.iter().skip(1) {
        let Some(pct) = part.content_type() else {
            continue;
        };
        let (t, s) = (
            pct.ctype().to_ascii_lowercase(),
            pct.subtype().unwrap_or("").to_ascii_lowercase(),
        );
        match (t.as_str(), s.as_str()) {
            ("message", "delivery-status" | "global-delivery-status") => {
                status.get_or_insert_with(|| part.contents().to_vec());
            }
            ("message", "feedback-report") => has_feedback = true,
            ("text", "rfc822-headers") | ("message", "rfc822-headers") => {
                returned.get_or_insert_with(|| String::from_utf8_lossy(part.contents()).into());
            }
            ("message", "rfc822" | "global") => {
                if let PartType::Message(m) = &part.body {
                    let raw = m.raw_message();
                    let end = memchr::memmem::find(raw, b"\r\n\r\n")
                        .or_else(|| memchr::memmem::find(raw, b"\n\n"))
                        .unwrap_or(raw.len());
                    returned.get_or_insert_with(|| String::from_utf8_lossy(&raw[..end]).into());
                }
            }
            _ => {}
        }
    }
    match report_type.as_str() {
        "delivery-status" | "global-delivery-status" | "" if status.is_some() || !has_feedback => {
            let Some(fields) = status else {
                return Err(ParseError::MissingPart(
                    if report_type.is_empty() {
                        "(none)".into()
                    } else {
                        report_type
                    },
                    "message/delivery-status",
                ));
            };
            let mut dsn = parse_delivery_status(&fields)?;
            dsn.returned_headers = returned;
            Ok(Report::Dsn(dsn))
        }
        "feedback-report" | "" => {
            if !has_feedback {
                return Err(ParseError::MissingPart(
                    report_type,
                    "message/feedback-report",
                ));
            }
            let f = mail_auth::report::Feedback::parse_rfc5322(raw)
                .map_err(|e| ParseError::BadFeedbackReport(format!("{e:?}")))?;
            use mail_auth::report::FeedbackType as F;
            let feedback_type = match f.feedback_type() {
                F::Abuse => "abuse",
                F::AuthFailure => "auth-failure",
                F::Fraud => "fraud",
                F::NotSpam => "not-spam",
                F::Other => "other",
                F::Virus => "virus",
            };
            let headers = f
                .headers()
                .or(f.message())
                .map(|h| h.to_owned())
                .or(returned);
            Ok(Report::Complaint(Complaint {
                feedback_type,
                original_rcpt_to: f.original_rcpt_to().map(cap),
                user_agent: f.user_agent().map(cap),
                returned_headers: headers,
            }))
        }
        other => Ok(Report::NotAReport(format!("report-type {other}"))),
    }
}

fn cap(s: &str) -> String {
    let mut end = s.len().min(MAX_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Header-style fields, folded lines joined, in groups separated by blank lines.
fn field_groups(text: &str) -> Vec<Vec<(String, String)>> {
    let mut groups: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            if groups.last().is_some_and(|g| !g.is_empty()) {
                groups.push(Vec::new());
            }
            continue;
        }
        let group = groups.last_mut().expect("never empty");
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = group.last_mut()
                && v.len() < MAX_FIELD
            {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            group.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    if groups.last().is_some_and(Vec::is_empty) {
        groups.pop();
    }
    groups
}

/// `rfc822; ann@example.org` → `ann@example.org`.
fn typed_value(v: &str) -> String {
    cap(v.split_once(';').map_or(v, |(_, a)| a).trim())
}

/// The fields of a message/delivery-status part.
pub fn parse_delivery_status(bytes: &[u8]) -> Result<Dsn, ParseError> {
    let text = String::from_utf8_lossy(bytes);
    let mut groups = field_groups(&text).into_iter();
    let per_message = groups
        .next()
        .ok_or_else(|| ParseError::BadDeliveryStatus("empty".into()))?;
    let get = |g: &[(String, String)], name: &str| {
        g.iter().find(|(n, _)| n == name).map(|(_, v)| v.to_owned())
    };
    let mut dsn = Dsn {
        reporting_mta: get(&per_message, "reporting-mta").map(|v| typed_value(&v)),
        recipients: Vec::new(),
        returned_headers: None,
    };
    for (i, g) in groups.take(MAX_DSN_RECIPIENTS).enumerate() {
        let action = get(&g, "action")
            .ok_or_else(|| {
                ParseError::BadDeliveryStatus(format!("recipient {} has no Action field", i + 1))
            })?
            .to_ascii_lowercase();
        let action = action.split_whitespace().next().unwrap_or("").to_owned();
        if !["failed", "delayed", "delivered", "relayed", "expanded"].contains(&action.as_str()) {
            return Err(ParseError::BadDeliveryStatus(format!(
                "recipient {}: unknown Action {action:?}",
                i + 1
            )));
        }
        let raw_status = get(&g, "status").ok_or_else(|| {
            ParseError::BadDeliveryStatus(format!("recipient {} has no Status field", i + 1))
        })?;
        let status = raw_status
            .split_whitespace()
            .next()
            .and_then(|s| EnhancedCode::parse_prefix(s).map(|(e, _)| e))
            .filter(|e| matches!(e.0, 2 | 4 | 5))
            .ok_or_else(|| {
                ParseError::BadDeliveryStatus(format!(
                    "recipient {}: Status {:?} is not a status code like 5.1.1",
                    i + 1,
                    cap(&raw_status)
                ))
            })?;
        let (code, diagnostic) = match get(&g, "diagnostic-code") {
            Some(d) => {
                let text = typed_value(&d);
                let code = text
                    .get(..3)
                    .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|c| c.parse::<u16>().ok())
                    .filter(|c| (200..600).contains(c));
                let rest = match code {
                    Some(_) => text[3..].trim_start_matches(['-', ' ']).to_owned(),
                    None => text.clone(),
                };
                // "5.1.1 text" after the code: the Status field already holds it.
                let rest = match EnhancedCode::parse_prefix(&rest) {
                    Some((_, t)) => t.to_owned(),
                    None => rest,
                };
                (code, Some(rest))
            }
            None => (None, None),
        };
        dsn.recipients.push(DsnRecipient {
            final_recipient: get(&g, "final-recipient").map(|v| typed_value(&v)),
            original_recipient: get(&g, "original-recipient").map(|v| typed_value(&v)),
            action,
            status,
            code,
            diagnostic,
            remote_mta: get(&g, "remote-mta").map(|v| typed_value(&v)),
        });
    }
    if dsn.recipients.is_empty() {
        return Err(ParseError::BadDeliveryStatus(
            "no per-recipient fields (Final-Recipient, Action, Status)".into(),
        ));
    }
    Ok(dsn)
}

/// Whose job a VERP address (`<local>+<token>@…`) names, if its token authenticates.
pub fn verp_owner(node: &Node, address: &str) -> Option<Owner> {
    let local = address
        .trim_start_matches('<')
        .rsplit_once('@')
        .map_or(address, |(l, _)| l);
    let (prefix, token) = local.split_once('+')?;
    if !prefix.eq_ignore_ascii_case(&node.config.bounce.local_part) {
        return None;
    }
    node.assembler.tokens().owner(Purpose::Verp, token)
}

/// The job of this node a VERP address (`<local>+<token>@…`) names, if its token authenticates.
pub fn verp_job(node: &Node, address: &str) -> Option<JobId> {
    match verp_owner(node, address)? {
        Owner::Here(job) => Some(job),
        Owner::Node(_) => None,
    }
}

/// Whose job returned headers name: the trace header first, then a VERP Return-Path.
fn owner_in_headers(node: &Node, headers: &str) -> Option<Owner> {
    let trace = crate::outbound::render::TRACE_HEADER;
    let mut verp = None;
    for line in headers.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case(trace) {
            if let Some(owner) = node.assembler.tokens().owner(Purpose::Trace, value.trim()) {
                return Some(owner);
            }
        } else if name.eq_ignore_ascii_case("Return-Path") && verp.is_none() {
            verp = verp_owner(node, value.trim().trim_end_matches('>'));
        }
    }
    verp
}

/// A report or an unsubscribe about another node's job (cluster mode), handed to that node
/// through the cluster's change stream: job ids are per node, so only the node that sent the
/// job can apply it. The node whose tag is `node` applies it as if it had received it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Change {
    /// A DSN or ARF report as received: the message (base64) and its SMTP recipients.
    #[serde(rename = "feedback.report")]
    Report {
        node: String,
        message: String,
        rcpts: Vec<String>,
        source: String,
    },
    /// An unsubscribe (one-click or mailto) with its token.
    #[serde(rename = "feedback.unsubscribe")]
    Unsubscribe {
        node: String,
        token: String,
        source: String,
    },
}

impl Change {
    /// Whether the node with tag `tag` is the one to apply it.
    pub fn is_for(&self, tag: &NodeTag) -> bool {
        let node = match self {
            Change::Report { node, .. } | Change::Unsubscribe { node, .. } => node,
        };
        *node == tag_hex(tag)
    }
}

/// The largest report handed to another node (DSNs and ARF reports are a few KB; the
/// returned message they may carry is the bulk).
const MAX_HANDED_BYTES: usize = 512 * 1024;

/// Hands `change` to the node it is for: staged in this node's spool (synced, so the sender's
/// answer promises it) and published with the other cluster changes.
async fn hand_over(node: &Node, change: &Change) -> Result<(), SpoolError> {
    let mut batch = node.spool.batch();
    crate::cluster::sync::stage(&mut batch, &serde_json::to_vec(change).unwrap_or_default());
    node.spool.write(batch, Durability::Sync).await?;
    FORWARDED.inc();
    Ok(())
}

static FORWARDED: std::sync::LazyLock<prometheus::IntCounter> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter!(
        "sluice_feedback_forwarded_total",
        "Reports and unsubscribes about another node's mail (cluster mode), handed to that node through the cluster's change stream."
    )
    .expect("metric registers once")
});

/// Hands an unsubscribe with `token` (of another node's job, tag `owner`) to that node.
pub async fn forward_unsubscribe(
    node: &Node,
    owner: &NodeTag,
    token: &str,
    source: &str,
) -> Result<(), SpoolError> {
    let change = Change::Unsubscribe {
        node: tag_hex(owner),
        token: token.to_owned(),
        source: source.to_owned(),
    };
    hand_over(node, &change).await
}

/// Applies a change another node handed to this one ([`Change::is_for`]).
pub async fn apply_handed(node: &Arc<Node>, change: &Change) -> Result<(), SpoolError> {
    match change {
        Change::Report {
            message,
            rcpts,
            source,
            ..
        } => {
            use base64::Engine as _;
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(message.as_bytes())
            else {
                tracing::warn!("cluster: a handed-over report is not base64; dropped");
                return Ok(());
            };
            let source = if source == "http" { "http" } else { "smtp" };
            match process(node, &raw, rcpts, source).await {
                Ok(_) | Err(FeedbackError::Parse(_)) => Ok(()),
                Err(FeedbackError::Spool(e)) => Err(e),
            }
        }
        Change::Unsubscribe { token, source, .. } => {
            let Some(job) = node.assembler.tokens().verify(Purpose::Unsubscribe, token) else {
                return Ok(());
            };
            let source = if source == "mailto" {
                "mailto"
            } else {
                "unsubscribe"
            };
            unsubscribe_job(node, job, source).await.map(|_| ())
        }
    }
}

/// What [`process`] did, as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Processed {
    /// `bounce`, `delay`, `delivery`, `complaint`, `feedback` (other ARF types) or `ignored`.
    pub kind: &'static str,
    /// `applied` (state or suppression changed), `recorded` (logged only), `duplicate` (already
    /// applied), `unmapped` (no job found), `forwarded` (another node's mail, handed to it in
    /// cluster mode; its kind is then `bounce` for any DSN) or `ignored`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<uuid::Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<Category>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Processed {
    /// Names the job the report was mapped to.
    fn attach(&mut self, found: &Found, address: &str) {
        self.campaign = Some(found.campaign.record.id);
        self.job = Some(found.job.to_string());
        self.recipient = Some(address.to_owned());
        self.result = "recorded";
    }

    fn new(kind: &'static str, result: &'static str) -> Processed {
        Processed {
            kind,
            result,
            campaign: None,
            job: None,
            recipient: None,
            status: None,
            category: None,
            suppressed: None,
            detail: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Parses `raw` and applies it. `envelope_rcpts` are the SMTP recipients it was sent to (none
/// over HTTP); `source` (`smtp`, `http`) labels records.
pub async fn process(
    node: &Arc<Node>,
    raw: &[u8],
    envelope_rcpts: &[String],
    source: &'static str,
) -> Result<Processed, FeedbackError> {
    let report = parse(raw)?;
    let headers = match &report {
        Report::Dsn(d) => d.returned_headers.as_deref(),
        Report::Complaint(c) => c.returned_headers.as_deref(),
        Report::NotAReport(why) => {
            let mut p = Processed::new("ignored", "ignored");
            p.detail = Some(why.clone());
            INBOUND.with_label_values(&[p.kind, p.result]).inc();
            return Ok(p);
        }
    };
    let owner = envelope_rcpts
        .iter()
        .find_map(|r| verp_owner(node, r))
        .or_else(|| headers.and_then(|h| owner_in_headers(node, h)));
    let job = match owner {
        Some(Owner::Here(job)) => Some(job),
        // Another node's mail (cluster mode): that node applies it; a report too large to
        // carry through the change stream is only counted here.
        Some(Owner::Node(_)) if raw.len() > MAX_HANDED_BYTES => {
            let mut p = Processed::new("ignored", "unmapped");
            p.detail = Some(format!(
                "about another node's mail, and larger than the {MAX_HANDED_BYTES} bytes handed to it"
            ));
            INBOUND.with_label_values(&[p.kind, p.result]).inc();
            return Ok(p);
        }
        Some(Owner::Node(tag)) => {
            use base64::Engine as _;
            let change = Change::Report {
                node: tag_hex(&tag),
                message: base64::engine::general_purpose::STANDARD.encode(raw),
                rcpts: envelope_rcpts.to_vec(),
                source: source.to_owned(),
            };
            hand_over(node, &change).await?;
            let kind = match report {
                Report::Complaint(_) => "complaint",
                _ => "bounce",
            };
            let p = Processed::new(kind, "forwarded");
            INBOUND.with_label_values(&[p.kind, p.result]).inc();
            return Ok(p);
        }
        None => None,
    };
    let result = match report {
        Report::Dsn(dsn) => apply_dsn(node, job, dsn, source).await?,
        Report::Complaint(c) => apply_complaint(node, job, c, source).await?,
        Report::NotAReport(_) => unreachable!("returned above"),
    };
    INBOUND
        .with_label_values(&[result.kind, result.result])
        .inc();
    Ok(result)
}

static INBOUND: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "sluice_feedback_reports_total",
        "DSNs and ARF reports received (listener and /v1/feedback) by kind and result. unmapped means the report named no job Sluice sent; many of them mean the bounce domain gets other mail.",
        &["kind", "result"]
    )
    .expect("metric registers once")
});

/// A report's job, found in the registry and the spool.
struct Found {
    job: JobId,
    campaign: Arc<crate::store::campaign::Campaign>,
    bytes: Vec<u8>,
}

impl Found {
    fn record(&self) -> Result<JobRecord<'_>, SpoolError> {
        JobRecord::decode(&self.bytes).map_err(|reason| SpoolError::Corrupt {
            key: self.job.to_string(),
            reason: reason.to_string(),
        })
    }
}

/// Reads the job's record on the blocking pool; `None` when there is no job or it is gone.
async fn find(node: &Arc<Node>, job: Option<JobId>) -> Result<Option<Found>, SpoolError> {
    let Some(job) = job else {
        return Ok(None);
    };
    let read = Arc::clone(node);
    let found = tokio::task::spawn_blocking(move || read.load_job(job))
        .await
        .map_err(|e| SpoolError::Rocks(format!("job read task: {e}")))??;
    Ok(found.map(|(campaign, bytes)| Found {
        job,
        campaign,
        bytes,
    }))
}

/// The delivery-log record of a report about `found`'s job; callers add what the report says.
fn report_record(
    node: &Node,
    found: &Found,
    rec: &JobRecord<'_>,
    recipient: String,
    kind: &'static str,
) -> LogRecord {
    LogRecord {
        kind,
        time_queued: crate::effects::delivery_log::rfc3339(rec.accepted_at_ms),
        time_logged: crate::effects::delivery_log::rfc3339(crate::now_ms()),
        campaign: found.campaign.record.id.to_string(),
        job: found.job.to_string(),
        recipient,
        sender: node
            .assembler
            .envelope_sender(&found.campaign.record, found.job),
        dsn_action: "delivered",
        dsn_status: "2.0.0".into(),
        reply_code: None,
        dsn_diag: String::new(),
        stage: String::new(),
        mx_host: None,
        mx_ip: None,
        tls: false,
        tls_policy: None,
        source: None,
        pool: None,
        size: 0,
        attempt: rec.attempts,
        bounce_cat: None,
        feedback_type: None,
        tags: Vec::new(),
        tenant: None,
    }
}

async fn apply_dsn(
    node: &Arc<Node>,
    job: Option<JobId>,
    dsn: Dsn,
    source: &'static str,
) -> Result<Processed, SpoolError> {
    let lead = find(node, job).await?;
    if let Some(lead) = lead.as_ref().filter(|f| !f.campaign.record.personalised) {
        // A message of a campaign that is not personalised went to several recipients; the DSN
        // may name any number of them. Each is applied to its own job; the answer describes the
        // first (a failure first, as below).
        // No message has more recipients than `max_recipients_per_message` allows (1000 at
        // most), so a report naming more is cut there.
        let mut order: Vec<&DsnRecipient> = dsn.recipients.iter().take(1000).collect();
        order.sort_by_key(|r| r.action != "failed");
        let mut first = None;
        for r in order {
            let member = member(node, lead, reported(r)).await?;
            let p = apply_dsn_recipient(node, member, &dsn, r, source).await?;
            first.get_or_insert(p);
        }
        return Ok(first.expect("a parsed DSN names at least one recipient"));
    }
    // A DSN about one of our messages names one recipient; prefer a failure if there are more.
    let r = dsn
        .recipients
        .iter()
        .find(|r| r.action == "failed")
        .unwrap_or(&dsn.recipients[0]);
    apply_dsn_recipient(node, lead, &dsn, r, source).await
}

/// The address a DSN recipient names: Final-Recipient, else Original-Recipient.
fn reported(r: &DsnRecipient) -> Option<&str> {
    r.final_recipient
        .as_deref()
        .or(r.original_recipient.as_deref())
}

/// For a report about a message of a campaign that is not personalised (sent to several
/// recipients, with the first one's tokens): the job of the recipient the report names. `None`
/// when it names none (a redacted complaint) or one the campaign does not have.
async fn member(
    node: &Arc<Node>,
    lead: &Found,
    reported: Option<&str>,
) -> Result<Option<Found>, SpoolError> {
    let Some(reported) = reported else {
        return Ok(None);
    };
    let address = reported
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_lowercase();
    if lead.record()?.address.eq_ignore_ascii_case(&address) {
        return Ok(Some(Found {
            job: lead.job,
            campaign: Arc::clone(&lead.campaign),
            bytes: lead.bytes.clone(),
        }));
    }
    // The index holds A-label domains; a report may give the domain in Unicode.
    let address = match crate::intake::address::Address::parse(&address) {
        Ok(a) => a.as_str().to_lowercase(),
        Err(_) => return Ok(None),
    };
    let read = Arc::clone(node);
    let campaign = lead.job.campaign;
    let job = tokio::task::spawn_blocking(move || read.spool.find_recipient(campaign, &address))
        .await
        .map_err(|e| SpoolError::Rocks(format!("recipient lookup task: {e}")))??;
    find(node, job).await
}

/// Applies one recipient's part of a DSN to `found`, its job (unmapped when `None`).
async fn apply_dsn_recipient(
    node: &Arc<Node>,
    found: Option<Found>,
    dsn: &Dsn,
    r: &DsnRecipient,
    source: &'static str,
) -> Result<Processed, SpoolError> {
    let kind = match r.action.as_str() {
        "failed" => "bounce",
        "delayed" => "delay",
        _ => "delivery",
    };
    let diag = r.diagnostic.clone().unwrap_or_default();
    let summary = match r.code {
        Some(c) => format!("{c} {} {diag}", r.status),
        None => format!("{} {diag}", r.status),
    };
    let mut p = Processed::new(kind, "unmapped");
    p.status = Some(r.status.to_string());
    p.detail = Some(summary.trim_end().to_owned());
    p.recipient = r.final_recipient.clone();
    let class = node.rules().classify(r.status, r.code, &diag);
    if kind == "bounce" {
        p.category = Some(class.category);
    }
    let Some(found) = found else {
        return Ok(p);
    };
    let (job, campaign) = (found.job, &found.campaign);
    let rec = found.record()?;
    let address = rec.address.to_lowercase();
    p.attach(&found, &address);
    let mut t = Transition::of(campaign, job);
    if kind == "bounce" {
        if rec.state == JobState::Delivered {
            let last = format!("dsn: {}", p.detail.as_deref().unwrap_or(""));
            let updated = JobRecord {
                state: JobState::Bounced,
                last_response: &last,
                ..rec.clone()
            };
            t.set_record(JobState::Delivered, &updated);
            t.counts = Some((&campaign.counts.delivered, &campaign.counts.bounced));
        }
        if class.kind == Kind::Hard
            && class.suppress
            && node
                .suppressions
                .check(&address, "", campaign.record.tenant())
                .is_none()
        {
            t.suppression = Some(Entry {
                address: address.clone(),
                scope: crate::effects::suppression::stored_scope(
                    campaign.record.tenant(),
                    crate::effects::suppression::GLOBAL,
                ),
                reason: Reason::HardBounce,
                created_at_ms: crate::now_ms(),
                source: Some(format!("dsn via {source}")),
                campaign: Some(campaign.record.id),
                job: Some(job.to_string()),
                category: Some(class.category),
                detail: p.detail.clone(),
            });
        }
        p.result = if t.record.is_some() || t.suppression.is_some() {
            "applied"
        } else {
            "duplicate"
        };
    }
    // The event goes with the state change it reports; a repeated report is an event too.
    t.report = Some(LogRecord {
        dsn_action: match kind {
            "bounce" => "failed",
            "delay" => "delayed",
            _ => "delivered",
        },
        dsn_status: r.status.to_string(),
        reply_code: r.code,
        dsn_diag: diag,
        stage: format!("DSN ({source})"),
        mx_host: r.remote_mta.clone().or_else(|| dsn.reporting_mta.clone()),
        bounce_cat: p.category.map(Category::as_str),
        ..report_record(
            node,
            &found,
            &rec,
            address,
            if kind == "bounce" { "rb" } else { "rs" },
        )
    });
    let reason = t.suppression.as_ref().map(|e| e.reason);
    if t.commit(node).await?.suppressed {
        p.suppressed = reason;
    }
    Ok(p)
}

async fn apply_complaint(
    node: &Arc<Node>,
    job: Option<JobId>,
    c: Complaint,
    source: &'static str,
) -> Result<Processed, SpoolError> {
    // "other" and "not-spam" say nothing about wanting the mail; they are only logged.
    let complaint = matches!(c.feedback_type, "abuse" | "fraud" | "virus");
    let kind = if complaint { "complaint" } else { "feedback" };
    let mut p = Processed::new(kind, "unmapped");
    p.detail = Some(format!(
        "feedback-type {}{}",
        c.feedback_type,
        c.user_agent
            .as_deref()
            .map(|u| format!(" from {u}"))
            .unwrap_or_default()
    ));
    let Some(mut found) = find(node, job).await? else {
        return Ok(p);
    };
    if !found.campaign.record.personalised {
        // The message went to several recipients: only the report can say which one complained.
        match member(node, &found, c.original_rcpt_to.as_deref()).await? {
            Some(m) => found = m,
            None => {
                p.campaign = Some(found.campaign.record.id);
                return Ok(p);
            }
        }
    }
    let rec = found.record()?;
    // The job knows the recipient even when the report redacts Original-Rcpt-To.
    let address = rec.address.to_lowercase();
    p.attach(&found, &address);
    let record = LogRecord {
        dsn_diag: p.detail.clone().unwrap_or_default(),
        stage: format!("ARF ({source})"),
        feedback_type: Some(c.feedback_type),
        ..report_record(node, &found, &rec, address, "f")
    };
    if !complaint {
        let mut t = Transition::of(&found.campaign, found.job);
        t.report = Some(record);
        t.commit(node).await?;
        return Ok(p);
    }
    // Every complaint is reported, even about an address already suppressed.
    let new = suppress_for_sender(
        node,
        &found,
        Reason::Complaint,
        format!("arf via {source}"),
        record,
        true,
    )
    .await?;
    p.result = if new { "applied" } else { "duplicate" };
    if new {
        p.suppressed = Some(Reason::Complaint);
    }
    Ok(p)
}

/// Suppresses a job's recipient for its campaign's From domain (`unsubscribe_mailto`). `None`
/// when the job no longer exists.
pub async fn unsubscribe_job(
    node: &Arc<Node>,
    job: JobId,
    source: &str,
) -> Result<Option<(String, String)>, SpoolError> {
    let Some(found) = find(node, Some(job)).await? else {
        return Ok(None);
    };
    unsubscribe(node, &found, source).await.map(Some)
}

/// Suppresses the recipient of `found`'s job for its campaign's From domain with reason
/// unsubscribe, synced, counted once in the campaign's `unsubscribed`. Idempotent: a repeated
/// click changes nothing and reports nothing. Returns the address and the scope (the domain).
async fn unsubscribe(
    node: &Arc<Node>,
    found: &Found,
    source: &str,
) -> Result<(String, String), SpoolError> {
    let rec = found.record()?;
    let address = rec.address.to_lowercase();
    let record = LogRecord {
        stage: format!("unsubscribe ({source})"),
        ..report_record(node, found, &rec, address.clone(), "u")
    };
    suppress_for_sender(
        node,
        found,
        Reason::Unsubscribe,
        source.to_owned(),
        record,
        false,
    )
    .await?;
    let scope = sender_scope(&found.campaign);
    let shown = crate::effects::suppression::split_scope(&scope)
        .1
        .to_owned();
    Ok((address, shown))
}

/// The scope of a suppression for a campaign's sender: its From domain.
fn sender_scope(campaign: &crate::store::campaign::Campaign) -> String {
    crate::effects::suppression::stored_scope(
        campaign.record.tenant(),
        &crate::intake::address::domain_of(&campaign.record.from).to_ascii_lowercase(),
    )
}

/// Suppresses the recipient of `record` (the job of `found`) for its campaign's From domain (an
/// unsubscribe or a complaint), synced, reported by `record`; the campaign counts it once. When
/// the address already is suppressed there, only `record` is reported, and only if
/// `report_repeats`. True when the suppression is new.
async fn suppress_for_sender(
    node: &Arc<Node>,
    found: &Found,
    reason: Reason,
    source: String,
    record: LogRecord,
    report_repeats: bool,
) -> Result<bool, SpoolError> {
    let campaign = &found.campaign;
    let scope = sender_scope(campaign);
    let mut t = Transition::of(campaign, found.job);
    if node.suppressions.scopes(&record.recipient).contains(&scope) {
        if report_repeats {
            t.report = Some(record);
            t.commit(node).await?;
        }
        return Ok(false);
    }
    t.suppression = Some(Entry {
        address: record.recipient.clone(),
        scope,
        reason,
        created_at_ms: crate::now_ms(),
        source: Some(source),
        campaign: Some(campaign.record.id),
        job: Some(found.job.to_string()),
        category: None,
        detail: (!record.dsn_diag.is_empty()).then(|| record.dsn_diag.clone()),
    });
    t.report = Some(record);
    // Two requests at once both write the same record; only the first to reach the index counts.
    Ok(t.commit(node).await?.suppressed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POSTFIX_STATUS: &str = "Reporting-MTA: dns; mx.example.org\r\n\
        X-Postfix-Queue-ID: 4Q1\r\n\
        Arrival-Date: Mon, 23 Nov 2026 10:00:00 +0000 (UTC)\r\n\
        \r\n\
        Final-Recipient: rfc822; ann@example.org\r\n\
        Original-Recipient: rfc822;ann@example.org\r\n\
        Action: failed\r\n\
        Status: 5.1.1\r\n\
        Remote-MTA: dns; mx2.example.org\r\n\
        Diagnostic-Code: smtp; 550 5.1.1 <ann@example.org>: Recipient address\r\n    rejected: User unknown in virtual mailbox table\r\n";

    #[test]
    fn delivery_status_fields_are_read() {
        let d = parse_delivery_status(POSTFIX_STATUS.as_bytes()).unwrap();
        assert_eq!(d.reporting_mta.as_deref(), Some("mx.example.org"));
        let r = &d.recipients[0];
        assert_eq!(r.final_recipient.as_deref(), Some("ann@example.org"));
        assert_eq!(r.action, "failed");
        assert_eq!(r.status, EnhancedCode(5, 1, 1));
        assert_eq!(r.code, Some(550));
        assert_eq!(
            r.diagnostic.as_deref(),
            Some(
                "<ann@example.org>: Recipient address rejected: User unknown in virtual mailbox table"
            )
        );
        assert_eq!(r.remote_mta.as_deref(), Some("mx2.example.org"));
    }

    #[test]
    fn bad_delivery_status_is_named() {
        for (text, want) in [
            ("", "empty"),
            ("Reporting-MTA: dns; x\n", "no per-recipient"),
            (
                "Reporting-MTA: dns; x\n\nFinal-Recipient: rfc822; a@b\nStatus: 5.1.1\n",
                "no Action",
            ),
            ("Reporting-MTA: dns; x\n\nAction: failed\n", "no Status"),
            (
                "Reporting-MTA: dns; x\n\nAction: failed\nStatus: 9.9\n",
                "not a status code",
            ),
            (
                "Reporting-MTA: dns; x\n\nAction: exploded\nStatus: 5.0.0\n",
                "unknown Action",
            ),
        ] {
            let e = parse_delivery_status(text.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn non_reports_and_broken_reports() {
        assert!(matches!(
            parse(b"Subject: out of office\r\n\r\nBack on Monday.\r\n"),
            Ok(Report::NotAReport(_))
        ));
        let no_status = b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsorry\r\n--b--\r\n";
        assert_eq!(
            parse(no_status).unwrap_err(),
            ParseError::MissingPart("delivery-status".into(), "message/delivery-status")
        );
        assert_eq!(parse(b"").unwrap_err(), ParseError::NotMime);
    }
}
