//! Ingest: turning API requests into validated campaigns and durable jobs.
//!
//! Owns request validation (campaign fields, templates, recipients) and the [`Upload`], the staged
//! writer that makes a request's recipients durable all at once or not at all. It does CPU work on
//! the calling task in small pieces and reaches the disk only through the spool's writer thread.
//! It never speaks SMTP and never decides delivery.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::LimitsConfig;
use crate::effects::delivery_log::{LogRecord, Unsent};
use crate::intake::address::Address;
use crate::intake::template;
use crate::node::Node;
use crate::outbound::render::Compiled;
use crate::scheduler::index::DomainId;
use crate::store::campaign::{
    Attachment, Campaign, CampaignKind, CampaignRecord, CampaignState, Schedule,
};
use crate::store::spool::{
    Durability, JobId, JobRecord, JobState, PendingWrite, SpoolBatch, SpoolError, Tally,
};

/// Most custom headers on a campaign.
pub const MAX_HEADERS: usize = 50;
/// Most tags on a campaign, and the longest tag.
pub const MAX_TAGS: usize = 20;
pub const MAX_TAG_LEN: usize = 128;
/// Longest subject, display name, header value (before folding).
pub const MAX_HEADER_VALUE: usize = 998;

/// Headers Sluice writes itself; a campaign may not set them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "dkim-signature",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "return-path",
    "received",
    "reply-to",
    "sender",
    "feedback-id",
    "x-sluice-ref",
    "content-disposition",
];

/// A problem with one field of a request: the API turns it into a 4xx naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The template and sender fields of a campaign or message, as validated by [`validate_campaign`].
#[derive(Debug, Default)]
pub struct CampaignFields {
    pub from: String,
    pub from_name: Option<String>,
    pub reply_to: Option<String>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub tags: Vec<String>,
    pub attachments: Vec<Attachment>,
    /// `false`: every recipient gets the same message (see [`CampaignRecord::personalised`]).
    pub personalised: Option<bool>,
    /// The stream of a message (see [`CampaignRecord::stream`]).
    pub stream: Option<String>,
    /// Scheduling, as given (checked by [`check_schedule`]).
    pub priority: Option<serde_json::Value>,
    pub weight: Option<serde_json::Value>,
    pub send_at: Option<String>,
    pub max_rate: Option<String>,
    /// The egress pool (checked against the config by the API).
    pub pool: Option<String>,
    /// The campaign's own breaker thresholds.
    pub guard: Option<crate::config::GuardThresholds>,
}

/// The body of `POST /v1/campaigns` (with `recipients`) and `POST /v1/messages` (with `to` and
/// `vars`). Recipients are kept as raw JSON so one bad recipient is reported on its own instead of
/// failing the whole request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposeRequest<'a> {
    pub from: String,
    #[serde(default)]
    pub from_name: Option<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
    pub subject: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    #[serde(default)]
    pub personalised: Option<bool>,
    #[serde(default)]
    pub stream: Option<String>,
    #[serde(default)]
    pub priority: Option<serde_json::Value>,
    #[serde(default)]
    pub weight: Option<serde_json::Value>,
    #[serde(default)]
    pub send_at: Option<String>,
    #[serde(default)]
    pub max_rate: Option<String>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub guard: Option<crate::config::GuardThresholds>,
    #[serde(default, borrow)]
    pub recipients: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default, borrow)]
    pub vars: Option<&'a RawValue>,
}

impl<'a> ComposeRequest<'a> {
    /// Splits off the campaign fields, leaving the recipient part.
    pub fn into_parts(self) -> (CampaignFields, Recipients<'a>) {
        let fields = CampaignFields {
            from: self.from,
            from_name: self.from_name,
            reply_to: self.reply_to,
            subject: self.subject,
            text: self.text,
            html: self.html,
            headers: self.headers,
            tags: self.tags,
            attachments: self.attachments,
            personalised: self.personalised,
            stream: self.stream,
            priority: self.priority,
            weight: self.weight,
            send_at: self.send_at,
            max_rate: self.max_rate,
            pool: self.pool,
            guard: self.guard,
        };
        (
            fields,
            Recipients {
                list: self.recipients,
                to: self.to,
                vars: self.vars,
            },
        )
    }
}

/// The recipient part of a [`ComposeRequest`]: a list for campaigns, `to` + `vars` for messages.
#[derive(Debug)]
pub struct Recipients<'a> {
    pub list: Option<Vec<&'a RawValue>>,
    pub to: Option<String>,
    pub vars: Option<&'a RawValue>,
}

/// One recipient: an element of `recipients` or one NDJSON line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipientInput<'a> {
    email: String,
    #[serde(default, borrow)]
    vars: Option<&'a RawValue>,
}

/// What ingest needs to know about a campaign to check its recipients.
#[derive(Debug, Clone, Default)]
pub struct RecipientRules {
    /// Variables that land in a header (the subject's): their values may not hold CR or LF.
    pub header_vars: BTreeSet<String>,
    /// The compiled campaign: every recipient's variables must render it.
    pub compiled: Option<Arc<Compiled>>,
    /// The campaign is not personalised: recipients may not carry variables.
    pub no_vars: bool,
}

/// Validates the campaign fields and compiles the templates. Returns the record (with a fresh
/// id) and the rules for its recipients.
pub fn validate_campaign(
    fields: CampaignFields,
    kind: CampaignKind,
    limits: &LimitsConfig,
    now_ms: u64,
) -> Result<(CampaignRecord, RecipientRules), FieldError> {
    // `from` may carry the display name (`News <news@example.com>`), as in a From header.
    let (name_in_from, from) = crate::intake::address::split_mailbox(&fields.from);
    let from = Address::parse(from).map_err(|e| FieldError::new("from", e.to_string()))?;
    let from_name = match (name_in_from, fields.from_name.clone()) {
        (Some(_), Some(_)) => {
            return Err(FieldError::new(
                "from_name",
                "from already carries a display name (\"Name <address>\"): give the name in one of the two",
            ));
        }
        (Some(name), None) => {
            check_header_text("from", &name)?;
            Some(name)
        }
        (None, name) => {
            if let Some(name) = &name {
                check_header_text("from_name", name)?;
            }
            name
        }
    };
    let reply_to = match &fields.reply_to {
        Some(r) => Some(
            Address::parse(r)
                .map_err(|e| FieldError::new("reply_to", e.to_string()))?
                .into_string(),
        ),
        None => None,
    };
    if fields.subject.trim().is_empty() {
        return Err(FieldError::new("subject", "must not be empty"));
    }
    check_header_text("subject", &fields.subject)?;
    if fields.text.is_none() && fields.html.is_none() {
        return Err(FieldError::new(
            "text",
            "a message needs a text or an html part (or both)",
        ));
    }
    let personalised = match (fields.personalised, kind) {
        (Some(false), CampaignKind::Transactional) => {
            return Err(FieldError::new(
                "personalised",
                "a message has one recipient; \"personalised\": false is for campaigns",
            ));
        }
        (p, _) => p.unwrap_or(true),
    };
    let mut rules = RecipientRules {
        no_vars: !personalised,
        ..RecipientRules::default()
    };
    for (name, part) in [
        ("subject", Some(&fields.subject)),
        ("text", fields.text.as_ref()),
        ("html", fields.html.as_ref()),
    ] {
        let Some(source) = part else { continue };
        if source.len() > limits.max_template_bytes {
            return Err(FieldError::new(
                name,
                format!("is larger than {} bytes", limits.max_template_bytes),
            ));
        }
        let vars = template::check(name, source).map_err(|e| FieldError::new(name, e.message))?;
        if !personalised && !vars.is_empty() {
            let names: Vec<&str> = vars.iter().map(String::as_str).collect();
            return Err(FieldError::new(
                name,
                format!(
                    "uses variables ({}), but with \"personalised\": false every recipient gets the same message",
                    names.join(", ")
                ),
            ));
        }
        if name == "subject" {
            rules.header_vars = vars;
        }
    }
    if fields.headers.len() > MAX_HEADERS {
        return Err(FieldError::new(
            "headers",
            format!("at most {MAX_HEADERS} headers"),
        ));
    }
    for (name, value) in &fields.headers {
        let field = format!("headers.{name}");
        if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
            return Err(FieldError::new(
                field,
                "a header name is printable ASCII without spaces or ':'",
            ));
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(FieldError::new(
                field,
                "this header is set by Sluice and may not be given",
            ));
        }
        check_header_text(&field, value)?;
    }
    check_tags(&fields.tags)?;
    check_attachments(&fields.attachments, limits)?;
    let schedule = check_schedule(&fields, kind, now_ms)?;
    let stream = match (kind, fields.stream) {
        (CampaignKind::Bulk, Some(_)) => {
            return Err(FieldError::new(
                "stream",
                "only messages belong to a stream; group campaigns with tags",
            ));
        }
        (CampaignKind::Bulk, None) => None,
        (CampaignKind::Transactional, s) => Some(check_stream(s)?),
    };
    if let Some(g) = &fields.guard {
        if kind == CampaignKind::Transactional {
            return Err(FieldError::new(
                "guard",
                "only campaigns take breaker thresholds: messages count into their sending domain's",
            ));
        }
        if let Some((key, reason)) = g.problems().into_iter().next() {
            return Err(FieldError::new(format!("guard.{key}"), reason));
        }
    }
    let record = CampaignRecord {
        id: uuid::Uuid::now_v7(),
        kind,
        from: from.into_string(),
        from_name,
        reply_to,
        subject: fields.subject,
        text: fields.text,
        html: fields.html,
        headers: fields.headers,
        tags: fields.tags,
        attachments: fields.attachments,
        personalised,
        state: CampaignState::Active,
        created_at_ms: now_ms,
        lifecycle: Default::default(),
        schedule,
        pool: fields.pool,
        stream,
        raw: None,
        guard: fields.guard,
        breaker: Default::default(),
        tenant: None,
    };
    let compiled = crate::outbound::render::compile(&record).map_err(|e| FieldError::new("", e))?;
    rules.compiled = Some(Arc::new(compiled));
    Ok((record, rules))
}

/// How far ahead `send_at` may be.
const MAX_SEND_AHEAD_MS: u64 = 366 * 86_400_000;

/// The scheduling fields: `priority` (`"low"`, `"normal"`, `"high"` or 0 to 9), `weight` (1 to
/// 1000, campaigns only), `send_at` (RFC 3339, at most a year ahead; a past time means now) and
/// `max_rate` (`"10000/h"`, campaigns only). A message's priority equal to its kind's default
/// is not stored, so messages of one stream share one bucket per priority.
pub fn check_schedule(
    fields: &CampaignFields,
    kind: CampaignKind,
    now_ms: u64,
) -> Result<Schedule, FieldError> {
    use crate::scheduler::fair::{
        PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_MAX, PRIORITY_NORMAL, WEIGHT_MAX,
    };
    let campaigns_only = |field: &str| {
        FieldError::new(
            field,
            "only campaigns take one: a message shares its stream's sending",
        )
    };
    let priority = match &fields.priority {
        None => None,
        Some(v) => {
            let p = match v {
                serde_json::Value::String(s) if s == "low" => Some(PRIORITY_LOW),
                serde_json::Value::String(s) if s == "normal" => Some(PRIORITY_NORMAL),
                serde_json::Value::String(s) if s == "high" => Some(PRIORITY_HIGH),
                serde_json::Value::Number(n) => n
                    .as_u64()
                    .filter(|&n| n <= u64::from(PRIORITY_MAX))
                    .map(|n| n as u8),
                _ => None,
            };
            let p = p.ok_or_else(|| {
                FieldError::new(
                    "priority",
                    format!(
                        "{v} is not a priority: \"low\", \"normal\", \"high\" or a number from 0 to {PRIORITY_MAX} (higher goes first)"
                    ),
                )
            })?;
            let default = crate::node::default_priority(kind);
            (kind == CampaignKind::Bulk || p != default).then_some(p)
        }
    };
    let weight = match &fields.weight {
        None => None,
        Some(_) if kind == CampaignKind::Transactional => return Err(campaigns_only("weight")),
        Some(v) => Some(
            v.as_u64()
                .filter(|w| (1..=u64::from(WEIGHT_MAX)).contains(w))
                .map(|w| w as u32)
                .ok_or_else(|| {
                    FieldError::new(
                        "weight",
                        format!("{v} is not a weight: a whole number from 1 to {WEIGHT_MAX}"),
                    )
                })?,
        ),
    };
    let send_at_ms = match &fields.send_at {
        None => None,
        Some(text) => {
            let ms = parse_rfc3339_ms(text).ok_or_else(|| {
                FieldError::new(
                    "send_at",
                    format!("{text:?} is not an RFC 3339 time like \"2026-12-24T09:00:00Z\""),
                )
            })?;
            if ms > now_ms.saturating_add(MAX_SEND_AHEAD_MS) {
                return Err(FieldError::new(
                    "send_at",
                    format!("{text} is more than a year ahead"),
                ));
            }
            // A time already past means now.
            (ms > now_ms).then_some(ms)
        }
    };
    let max_rate = match &fields.max_rate {
        None => None,
        Some(_) if kind == CampaignKind::Transactional => return Err(campaigns_only("max_rate")),
        Some(text) => {
            Some(crate::config::Rate::parse(text).map_err(|e| FieldError::new("max_rate", e))?)
        }
    };
    Ok(Schedule {
        priority,
        weight,
        send_at_ms,
        max_rate,
    })
}

/// An RFC 3339 time (any UTC offset) as Unix milliseconds; `None` if it is not one or is
/// before 1970.
fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The stream of a message without one.
pub const DEFAULT_STREAM: &str = "default";
const MAX_STREAM_LEN: usize = 64;

/// A message's stream name: 1 to 64 of `A-Z a-z 0-9 . _ -`, [`DEFAULT_STREAM`] when absent.
pub fn check_stream(stream: Option<String>) -> Result<String, FieldError> {
    let Some(s) = stream else {
        return Ok(DEFAULT_STREAM.to_owned());
    };
    let ok = (1..=MAX_STREAM_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(FieldError::new(
            "stream",
            format!("a stream name is 1 to {MAX_STREAM_LEN} of A-Z, a-z, 0-9, '.', '_' and '-'"),
        ));
    }
    Ok(s)
}

/// Content types an attachment may not have: they would change the message's structure.
const FORBIDDEN_ATTACHMENT_TYPES: &[&str] = &["multipart", "message"];

fn check_attachments(list: &[Attachment], limits: &LimitsConfig) -> Result<(), FieldError> {
    if list.len() > limits.max_attachments {
        return Err(FieldError::new(
            "attachments",
            format!("at most {} attachments", limits.max_attachments),
        ));
    }
    let mut total = 0usize;
    for (i, a) in list.iter().enumerate() {
        let field = |f: &str| format!("attachments[{i}].{f}");
        let name = &a.filename;
        if name.trim().is_empty()
            || name.len() > 255
            || name.chars().any(|c| c.is_control() || "/\\\"".contains(c))
        {
            return Err(FieldError::new(
                field("filename"),
                "1 to 255 bytes of UTF-8 without control characters, '/', '\\' or '\"'",
            ));
        }
        let ct = a.content_type.to_ascii_lowercase();
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        let ok = ct.split_once('/').is_some_and(|(t, sub)| {
            token(t) && token(sub) && !FORBIDDEN_ATTACHMENT_TYPES.contains(&t)
        });
        if !ok {
            return Err(FieldError::new(
                field("content_type"),
                format!(
                    "{:?} is not a type/subtype media type (multipart and message types are not allowed)",
                    a.content_type
                ),
            ));
        }
        if a.content_base64.len() / 4 * 3 > limits.max_attachment_bytes.saturating_mul(2) {
            return Err(FieldError::new(
                field("content_base64"),
                format!(
                    "attachments may total at most {} bytes",
                    limits.max_attachment_bytes
                ),
            ));
        }
        let data = a
            .decode()
            .map_err(|e| FieldError::new(field("content_base64"), e))?;
        total += data.len();
        if total > limits.max_attachment_bytes {
            return Err(FieldError::new(
                field("content_base64"),
                format!(
                    "attachments may total at most {} bytes; this one brings them to {total}",
                    limits.max_attachment_bytes
                ),
            ));
        }
    }
    Ok(())
}

/// The rules for recipients added later to a stored campaign.
pub fn rules_for(
    campaign: &Campaign,
    assembler: &crate::outbound::render::Assembler,
) -> RecipientRules {
    let header_vars = template::check("subject", &campaign.record.subject).unwrap_or_default();
    RecipientRules {
        header_vars,
        compiled: assembler.compiled(campaign).ok(),
        no_vars: !campaign.record.personalised,
    }
}

/// At most [`MAX_TAGS`] tags of 1 to [`MAX_TAG_LEN`] bytes without control characters.
pub fn check_tags(tags: &[String]) -> Result<(), FieldError> {
    if tags.len() > MAX_TAGS {
        return Err(FieldError::new("tags", format!("at most {MAX_TAGS} tags")));
    }
    for (i, tag) in tags.iter().enumerate() {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.chars().any(char::is_control) {
            return Err(FieldError::new(
                format!("tags[{i}]"),
                format!("a tag is 1 to {MAX_TAG_LEN} bytes without control characters"),
            ));
        }
    }
    Ok(())
}

fn check_header_text(field: &str, value: &str) -> Result<(), FieldError> {
    if value.contains(['\r', '\n']) {
        return Err(FieldError::new(field, "must not contain CR or LF"));
    }
    if value.len() > MAX_HEADER_VALUE {
        return Err(FieldError::new(
            field,
            format!("is longer than {MAX_HEADER_VALUE} bytes"),
        ));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// A recipient that passed validation, borrowing from the request.
#[derive(Debug)]
pub struct ValidRecipient<'a> {
    pub address: Address,
    /// JSON object text, or empty.
    pub vars: &'a str,
}

/// Parses and checks one recipient given as JSON text. The error names the sub-field
/// (`email`, `vars.first_name`) relative to the recipient, and echoes the email when it was read.
pub fn parse_recipient<'a>(
    json: &'a str,
    rules: &RecipientRules,
    limits: &LimitsConfig,
) -> Result<ValidRecipient<'a>, (Option<String>, FieldError)> {
    let input: RecipientInput<'a> =
        serde_json::from_str(json).map_err(|e| (None, json_field_error(&e)))?;
    check_recipient(input.email, input.vars, rules, limits)
}

/// Checks one recipient's address and variables (see [`parse_recipient`]).
pub fn check_recipient<'a>(
    email: String,
    vars: Option<&'a RawValue>,
    rules: &RecipientRules,
    limits: &LimitsConfig,
) -> Result<ValidRecipient<'a>, (Option<String>, FieldError)> {
    let address = match Address::parse(&email) {
        Ok(a) => a,
        Err(e) => return Err((Some(email), FieldError::new("email", e.to_string()))),
    };
    if rules.no_vars
        && let Some(raw) = vars
        && !matches!(
            raw.get().split_whitespace().collect::<String>().as_str(),
            "null" | "{}"
        )
    {
        return Err((
            Some(email),
            FieldError::new(
                "vars",
                "the campaign is not personalised (\"personalised\": false): recipients take no variables",
            ),
        ));
    }
    let vars = match vars {
        Some(raw) if raw.get() != "null" => {
            let text = raw.get();
            let map = check_vars(text, rules, limits).map_err(|e| (Some(email.clone()), e))?;
            (text, map)
        }
        _ => ("", None),
    };
    let (vars, map) = vars;
    if let Some(c) = &rules.compiled {
        crate::outbound::render::check_vars(c, vars, map.as_ref())
            .map_err(|e| (Some(email), FieldError::new(e.field, e.message)))?;
    }
    Ok(ValidRecipient { address, vars })
}

/// Checks size, shape and header variables; returns the top-level map when it had to parse it,
/// so the template check does not parse it again.
fn check_vars<'a>(
    text: &'a str,
    rules: &RecipientRules,
    limits: &LimitsConfig,
) -> Result<Option<crate::outbound::render::VarsMap<'a>>, FieldError> {
    if text.len() > limits.max_vars_bytes {
        return Err(FieldError::new(
            "vars",
            format!("is larger than {} bytes", limits.max_vars_bytes),
        ));
    }
    if !text.starts_with('{') {
        return Err(FieldError::new("vars", "must be a JSON object"));
    }
    if rules.header_vars.is_empty() {
        return Ok(None);
    }
    let map: crate::outbound::render::VarsMap<'a> = serde_json::from_str(text)
        .map_err(|e| FieldError::new("vars", format!("must be a JSON object: {e}")))?;
    for name in &rules.header_vars {
        let Some(raw) = map.get(name.as_str()) else {
            continue;
        };
        // Only strings can carry a line break; escapes such as \n or \u000a decode here.
        if raw.get().contains('\\') {
            let value: serde_json::Value = serde_json::from_str(raw.get())
                .map_err(|e| FieldError::new(format!("vars.{name}"), e.to_string()))?;
            if has_line_break(&value) {
                return Err(FieldError::new(
                    format!("vars.{name}"),
                    "must not contain CR or LF: it is used in the subject header",
                ));
            }
        }
    }
    Ok(Some(map))
}

fn has_line_break(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains(['\r', '\n']),
        serde_json::Value::Array(a) => a.iter().any(has_line_break),
        serde_json::Value::Object(o) => o.values().any(has_line_break),
        _ => false,
    }
}

/// Turns a serde_json error on a recipient into a field error with a clean message.
fn json_field_error(e: &serde_json::Error) -> FieldError {
    let msg = e.to_string();
    // serde_json appends " at line L column C"; within one recipient that is noise.
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
    let field = if msg.contains("`email`") {
        "email"
    } else if msg.contains("`vars`") {
        "vars"
    } else {
        ""
    };
    FieldError::new(field, msg)
}

/// A recipient refused at ingest, as reported in the 202's `rejected` list.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rejected {
    pub index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub field: String,
    pub error: String,
}

/// An in-progress upload: recipients staged in the spool, invisible until [`Upload::commit`].
///
/// Dropping an upload that was not committed (client gone, error) deletes what it staged.
pub struct Upload {
    node: Arc<Node>,
    campaign: Arc<Campaign>,
    id: u64,
    batch: SpoolBatch,
    /// Reserved indexes not yet used: `next..end`.
    next_index: u32,
    end_index: u32,
    /// Jobs added, in order, with their domain: enqueued at commit.
    staged: Vec<(u32, DomainId)>,
    /// Chunk writes handed to the writer; all must succeed before the commit.
    writes: Vec<PendingWrite>,
    first_chunk_written: bool,
    committed: bool,
    accepted_at_ms: u64,
    record_buf: Vec<u8>,
    chunk_domains: Vec<(u32, Box<str>)>,
    /// Recipients found on the suppression list: index, address and reason. They are never
    /// queued; their tombstones are written by the commit, so a rollback has nothing of them to
    /// delete.
    suppressed: Vec<(u32, Box<str>, crate::effects::suppression::Reason)>,
    /// Recipients refused by validation: each gets a `rejected` event with the commit (and
    /// none if the upload fails, since then nothing was accepted).
    rejected: Vec<Rejected>,
    /// The campaign is new: it joins the registry at commit, before its jobs can be taken.
    new_campaign: bool,
    /// The campaign had finished and this upload made it busy again: the commit persists its
    /// record without the finish time.
    reopened: bool,
    /// The record of the message this upload adds to a stream's bucket, stored beside its job.
    message: Option<CampaignRecord>,
    /// The bytes of the raw message this upload adds, stored once under its first job's key.
    raw_body: Option<Vec<u8>>,
    /// Indexes reserved from the campaign at a time.
    index_block: u32,
    /// The first index handed out.
    first_index: Option<u32>,
    /// The index handed out last.
    last_index: Option<u32>,
}

/// Why an upload could not finish.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("the campaign has no room for more recipients")]
    CampaignFull,
    #[error("the campaign is compacted and takes no more recipients")]
    Compacted,
}

/// Indexes reserved from the campaign at a time, so concurrent uploads interleave in blocks.
const INDEX_BLOCK: u32 = 1024;

impl Upload {
    /// An upload that creates `campaign`: the campaign is registered at commit, after its record
    /// is on disk and before delivery can meet its jobs (which it would drop as orphans).
    pub fn for_new_campaign(node: Arc<Node>, campaign: Arc<Campaign>) -> Upload {
        let opened = campaign.upload_open();
        debug_assert_eq!(
            opened,
            Some(false),
            "a new campaign is neither finished nor compacted"
        );
        let mut upload = Upload::open(node, campaign);
        upload.new_campaign = true;
        upload
    }

    /// An upload of more recipients to a registered campaign; refused once the campaign is
    /// compacted (its templates are gone).
    pub fn new(node: Arc<Node>, campaign: Arc<Campaign>) -> Result<Upload, UploadError> {
        let reopened = campaign.upload_open().ok_or(UploadError::Compacted)?;
        let mut upload = Upload::open(node, campaign);
        upload.reopened = reopened;
        Ok(upload)
    }

    /// The upload of one transactional message, `record`, to the stream bucket `bucket`: its
    /// job takes one index of the bucket, and its record is stored beside the job (compacted at
    /// once if the recipient is suppressed).
    pub fn for_message(
        node: Arc<Node>,
        bucket: Arc<Campaign>,
        record: CampaignRecord,
    ) -> Result<Upload, UploadError> {
        let mut upload = Upload::new(node, bucket)?;
        upload.message = Some(record);
        upload.index_block = 1;
        Ok(upload)
    }

    /// The upload of a raw message ([`crate::intake::raw`]) with `recipients` recipients to a
    /// stream's bucket: `record` is each job's record, `body` the message's bytes.
    pub fn for_raw(
        node: Arc<Node>,
        bucket: Arc<Campaign>,
        record: CampaignRecord,
        body: Vec<u8>,
        recipients: u32,
    ) -> Result<Upload, UploadError> {
        let mut upload = Upload::new(node, bucket)?;
        upload.message = Some(record);
        upload.raw_body = Some(body);
        // One block, so the jobs are numbered in a row from the one that holds the bytes.
        upload.index_block = recipients.max(1);
        Ok(upload)
    }

    /// The job of the recipient added last, if any.
    pub fn last_job(&self) -> Option<JobId> {
        self.last_index.map(|i| self.job(i))
    }

    /// When the jobs of this upload are first due: at acceptance, or the `send_at` of the
    /// message or campaign if that is later.
    fn due_ms(&self) -> u64 {
        let send_at = self.content().schedule.send_at_ms.unwrap_or(0);
        self.accepted_at_ms.max(send_at)
    }

    /// The record whose From domain, tags and templates apply: the message's, else the
    /// campaign's.
    fn content(&self) -> &CampaignRecord {
        self.message.as_ref().unwrap_or(&self.campaign.record)
    }

    /// The upload of a campaign whose [`Campaign::upload_open`] has said yes. Until it is
    /// dropped, the campaign is not finished, so retention leaves it alone.
    fn open(node: Arc<Node>, campaign: Arc<Campaign>) -> Upload {
        let id = node.upload_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let batch = node.spool.batch();
        Upload {
            node,
            campaign,
            id,
            batch,
            next_index: 0,
            end_index: 0,
            staged: Vec::new(),
            writes: Vec::new(),
            first_chunk_written: false,
            committed: false,
            accepted_at_ms: crate::now_ms(),
            record_buf: Vec::with_capacity(256),
            chunk_domains: Vec::new(),
            suppressed: Vec::new(),
            rejected: Vec::new(),
            new_campaign: false,
            reopened: false,
            message: None,
            raw_body: None,
            index_block: INDEX_BLOCK,
            first_index: None,
            last_index: None,
        }
    }

    pub fn campaign(&self) -> &Arc<Campaign> {
        &self.campaign
    }

    /// Recipients staged so far.
    pub fn len(&self) -> usize {
        self.staged.len() + self.chunk_domains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Notes a recipient refused by validation, for its event at commit.
    pub fn reject(&mut self, r: &Rejected) {
        self.rejected.push(r.clone());
    }

    /// Recipients recorded as suppressed so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.len() as u64
    }

    /// Stages one validated recipient; writes a chunk when the batch is full.
    /// Adds a recipient. One on the suppression list for this campaign's From domain is recorded
    /// as suppressed (so the campaign counts it) and never queued: the reason is returned.
    pub async fn add(
        &mut self,
        r: &ValidRecipient<'_>,
    ) -> Result<Option<crate::effects::suppression::Reason>, UploadError> {
        let from_domain = crate::intake::address::domain_of(&self.content().from);
        match self
            .node
            .suppressions
            .check(r.address.as_str(), from_domain, self.content().tenant())
        {
            Some(reason) => {
                let index = self.next_index()?;
                self.suppressed
                    .push((index, r.address.as_str().into(), reason));
                if !self.content().personalised {
                    self.batch
                        .put_recipient(self.job(index), &r.address.as_str().to_lowercase());
                }
                Ok(Some(reason))
            }
            None => {
                self.add_queued(r).await?;
                Ok(None)
            }
        }
    }

    /// Hands out the next recipient index, reserving a block from the campaign when needed.
    fn next_index(&mut self) -> Result<u32, UploadError> {
        if self.next_index == self.end_index {
            let start = self
                .campaign
                .reserve_indexes(self.index_block)
                .ok_or(UploadError::CampaignFull)?;
            self.next_index = start;
            self.end_index = start + self.index_block;
        }
        let index = self.next_index;
        self.next_index += 1;
        self.first_index.get_or_insert(index);
        self.last_index = Some(index);
        Ok(index)
    }

    fn job(&self, index: u32) -> JobId {
        JobId {
            campaign: self.campaign.seq,
            index,
        }
    }

    async fn add_queued(&mut self, r: &ValidRecipient<'_>) -> Result<(), UploadError> {
        let index = self.next_index()?;
        let id = self.job(index);
        let rec = JobRecord {
            state: JobState::Queued,
            upload: self.id,
            accepted_at_ms: self.accepted_at_ms,
            attempts: 0,
            next_attempt_ms: self.due_ms(),
            address: r.address.as_str(),
            vars: r.vars,
            last_response: "",
        };
        self.record_buf.clear();
        rec.encode_into(&mut self.record_buf);
        self.batch.put_job(id, &self.record_buf);
        if !self.content().personalised {
            self.batch
                .put_recipient(id, &r.address.as_str().to_lowercase());
        }
        self.chunk_domains.push((index, r.address.domain().into()));
        if self.batch.len() >= self.node.config.spool.ingest_batch {
            self.flush_chunk().await?;
        }
        Ok(())
    }

    fn intern_chunk(&mut self) {
        if self.chunk_domains.is_empty() {
            return;
        }
        // Pinned until commit or rollback, so a domain id cannot be evicted and reused.
        let ids = self
            .node
            .scheduler
            .stage(self.chunk_domains.iter().map(|(_, d)| &**d));
        self.staged.reserve(ids.len());
        let indexes = self.chunk_domains.drain(..).map(|(index, _)| index);
        self.staged.extend(indexes.zip(ids));
    }

    async fn flush_chunk(&mut self) -> Result<(), UploadError> {
        self.intern_chunk();
        if self.batch.is_empty() {
            return Ok(());
        }
        self.node.spool.check_space()?;
        let mut batch = std::mem::replace(&mut self.batch, self.node.spool.batch());
        if !self.first_chunk_written {
            batch.open_upload(self.id, self.campaign.seq);
            self.first_chunk_written = true;
        }
        let pending = self.node.spool.submit(batch, Durability::Buffered).await?;
        self.writes.push(pending);
        Ok(())
    }

    /// Makes every staged recipient durable and visible at once: writes the last chunk plus
    /// `finish` (campaign record, idempotency record) in one synced batch, then enqueues the jobs.
    pub async fn commit(
        mut self,
        finish: impl FnOnce(&mut SpoolBatch),
    ) -> Result<usize, UploadError> {
        self.intern_chunk();
        for w in std::mem::take(&mut self.writes) {
            w.wait().await?;
        }
        self.node.spool.check_space()?;
        let mut batch = std::mem::replace(&mut self.batch, self.node.spool.batch());
        if self.first_chunk_written {
            batch.close_upload(self.id);
        }
        for (index, address, reason) in &self.suppressed {
            let stone = JobRecord {
                state: JobState::Suppressed,
                upload: self.id,
                accepted_at_ms: self.accepted_at_ms,
                attempts: 0,
                next_attempt_ms: self.accepted_at_ms,
                address,
                vars: "",
                last_response: reason.as_str(),
            };
            self.record_buf.clear();
            stone.encode_into(&mut self.record_buf);
            batch.put_final(self.job(*index), &self.record_buf);
        }
        // Every recipient that will never be sent is reported with the commit that decides it.
        let mut reports = Vec::with_capacity(self.suppressed.len() + self.rejected.len());
        let campaign_id = self.campaign.record.id.to_string();
        for (index, address, reason) in &self.suppressed {
            reports.push(LogRecord::unsent(Unsent {
                kind: "s",
                campaign: campaign_id.clone(),
                job: self.job(*index).to_string(),
                recipient: address,
                accepted_at_ms: self.accepted_at_ms,
                attempts: 0,
                detail: format!("suppressed: {}", reason.as_str()),
                stage: "ingest",
            }));
        }
        for r in &self.rejected {
            reports.push(LogRecord::unsent(Unsent {
                kind: "r",
                campaign: campaign_id.clone(),
                job: String::new(),
                recipient: r.email.as_deref().unwrap_or(""),
                accepted_at_ms: self.accepted_at_ms,
                attempts: 0,
                detail: format!("{}: {}", r.field, r.error),
                stage: "ingest",
            }));
        }
        for r in &mut reports {
            r.tags.clone_from(&self.content().tags);
            r.tenant.clone_from(&self.content().tenant);
            self.node.webhooks.stage(&mut batch, r);
        }
        for ((index, _, _), r) in self.suppressed.iter().zip(&reports) {
            batch.put_history(self.job(*index), self.accepted_at_ms, &r.history_entry());
        }
        let seq = self.campaign.seq;
        let job = |index: u32| JobId {
            campaign: seq,
            index,
        };
        if let Some(message) = &mut self.message {
            if let (Some(raw), Some(first)) = (&mut message.raw, self.first_index) {
                raw.body = first;
                if let Some(body) = &self.raw_body
                    && !self.staged.is_empty()
                {
                    batch.put_message_body(job(first), body);
                }
            }
            let full = message.encode();
            for (index, _) in &self.staged {
                batch.put_message(job(*index), &full);
            }
            let compacted = message.compacted().encode();
            for (index, _, _) in &self.suppressed {
                batch.put_message(job(*index), &compacted);
            }
        }
        let mut tally = Tally {
            next_index: self.next_index,
            ..Tally::default()
        };
        tally.finals[Tally::slot(JobState::Suppressed).expect("a final state")] =
            self.suppressed.len() as i64;
        batch.tally(self.campaign.seq, &tally);
        finish(&mut batch);
        if self.reopened {
            // Record writes are serialised, so a state change cannot be overwritten by an
            // older copy of the record.
            let _serial = self.node.state_changes.lock().await;
            let record = self.campaign.stored_record(self.campaign.state());
            batch.put_campaign(self.campaign.seq, &record.encode());
            self.node.spool.write(batch, Durability::Sync).await?;
        } else {
            self.node.spool.write(batch, Durability::Sync).await?;
        }
        self.committed = true;
        if self.new_campaign {
            self.node.register(Arc::clone(&self.campaign));
        }
        let staged = std::mem::take(&mut self.staged);
        let n = staged.len();
        self.campaign.add_live(n as u64);
        self.campaign
            .counts
            .queued
            .fetch_add(n as u64, Ordering::Relaxed);
        self.campaign
            .counts
            .suppressed
            .fetch_add(self.suppressed(), Ordering::Relaxed);
        crate::metrics::RECIPIENTS_ACCEPTED.inc_by(n as u64);
        self.node
            .tenants
            .with_label(self.content().tenant(), |tenant| {
                crate::metrics::TENANT_ACCEPTED
                    .with_label_values(&[tenant])
                    .inc_by(n as u64);
            });
        crate::metrics::RECIPIENTS_SUPPRESSED.inc_by(self.suppressed());
        for r in reports {
            self.node.log.record(r);
        }
        // Indexed in slices by a task of its own: delivery keeps running meanwhile, and a client
        // that leaves now (dropping this future) cannot keep committed jobs out of the queue.
        let node = Arc::clone(&self.node);
        let (campaign, due) = (self.campaign.seq, self.due_ms());
        let indexing = tokio::spawn(async move {
            node.scheduler.enqueue_staged(campaign, due, staged).await;
        });
        if let Err(e) = indexing.await {
            tracing::error!(error = %e, "indexing committed jobs failed; they are queued again at the next start");
        }
        Ok(n)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.campaign.upload_closed();
        if self.committed {
            return;
        }
        self.intern_chunk();
        self.node
            .scheduler
            .unstage(self.staged.iter().map(|&(_, d)| d));
        if !self.first_chunk_written {
            return;
        }
        // Staged chunks reached the writer: delete them and the open record. If this fails too,
        // recovery at the next start does the same.
        let mut batch = self.node.spool.batch();
        for (index, _) in &self.staged {
            batch.delete_job(self.job(*index));
        }
        batch.close_upload(self.id);
        let node = Arc::clone(&self.node);
        let upload = self.id;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = node.spool.write(batch, Durability::Buffered).await {
                    tracing::warn!(upload, error = %e, "rolling back an abandoned upload failed; recovery will finish it");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LimitsConfig {
        LimitsConfig::default()
    }

    fn fields(json: &str) -> CampaignFields {
        serde_json::from_str::<ComposeRequest<'_>>(json)
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn campaign_validation_names_fields() {
        let ok = r#"{"from":"News@Example.com","subject":"Hi {{ name }}","text":"x"}"#;
        let (rec, rules) = validate_campaign(fields(ok), CampaignKind::Bulk, &limits(), 5).unwrap();
        assert_eq!(rec.from, "News@example.com");
        assert_eq!(rules.header_vars.iter().collect::<Vec<_>>(), vec!["name"]);
        // The RFC 5322 form gives the display name.
        let named = r#"{"from":"News Desk <News@Example.com>","subject":"s","text":"x"}"#;
        let (rec, _) = validate_campaign(fields(named), CampaignKind::Bulk, &limits(), 5).unwrap();
        assert_eq!(
            (rec.from.as_str(), rec.from_name.as_deref()),
            ("News@example.com", Some("News Desk"))
        );

        let cases = [
            (r#"{"from":"bad","subject":"s","text":"x"}"#, "from"),
            (
                r#"{"from":"a@example.com","reply_to":"x@","subject":"s","text":"x"}"#,
                "reply_to",
            ),
            (
                r#"{"from":"a@example.com","subject":" ","text":"x"}"#,
                "subject",
            ),
            (
                r#"{"from":"a@example.com","subject":"a\r\nBcc: x@y.com","text":"x"}"#,
                "subject",
            ),
            (r#"{"from":"a@example.com","subject":"s"}"#, "text"),
            (
                r#"{"from":"a@example.com","subject":"s","html":"{% if %}"}"#,
                "html",
            ),
            (
                r#"{"from":"a@example.com","subject":"s","text":"x","headers":{"X-A":"1\nBcc: y"}}"#,
                "headers.X-A",
            ),
            (
                r#"{"from":"a@example.com","subject":"s","text":"x","headers":{"Subject":"again"}}"#,
                "headers.Subject",
            ),
            (
                r#"{"from":"a@example.com","subject":"s","text":"x","headers":{"Bad Name":"v"}}"#,
                "headers.Bad Name",
            ),
            (
                r#"{"from":"a@example.com","from_name":"A\nB","subject":"s","text":"x"}"#,
                "from_name",
            ),
            (
                r#"{"from":"A <a@example.com>","from_name":"B","subject":"s","text":"x"}"#,
                "from_name",
            ),
            (
                r#"{"from":"A\nB <a@example.com>","subject":"s","text":"x"}"#,
                "from",
            ),
            (r#"{"from":"A <a@>","subject":"s","text":"x"}"#, "from"),
            (
                r#"{"from":"a@example.com","subject":"s","text":"x","tags":[""]}"#,
                "tags[0]",
            ),
        ];
        for (json, field) in cases {
            let err =
                validate_campaign(fields(json), CampaignKind::Bulk, &limits(), 0).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
    }

    #[test]
    fn scheduling_fields_are_checked() {
        let now = 1_700_000_000_000;
        let with = |extra: &str| {
            fields(&format!(
                r#"{{"from":"a@example.com","subject":"s","text":"x",{extra}}}"#
            ))
        };
        let ok = |extra: &str, kind| {
            let f = with(extra);
            check_schedule(&f, kind, now).unwrap_or_else(|e| panic!("{extra}: {e}"))
        };
        let bulk = CampaignKind::Bulk;
        let message = CampaignKind::Transactional;
        let s = ok(
            r#""priority":"low","weight":3,"max_rate":"10000/h","send_at":"2023-11-14T23:13:21+01:00""#,
            bulk,
        );
        assert_eq!(s.priority, Some(2));
        assert_eq!(s.weight, Some(3));
        assert_eq!(
            s.max_rate.map(|r| r.to_string()).as_deref(),
            Some("10000/h")
        );
        // 22:13:21 UTC: after `now` (22:13:20).
        assert_eq!(s.send_at_ms, Some(1_700_000_001_000));
        // A time already past means now.
        assert_eq!(
            ok(r#""send_at":"2020-01-01T00:00:00Z""#, bulk).send_at_ms,
            None
        );
        assert_eq!(ok(r#""priority":9"#, bulk).priority, Some(9));
        // A message's default priority is not stored: such messages share one bucket.
        assert_eq!(ok(r#""priority":"high""#, message).priority, None);
        assert_eq!(ok(r#""priority":"normal""#, message).priority, Some(5));
        for (extra, kind, field) in [
            (r#""priority":"urgent""#, bulk, "priority"),
            (r#""priority":10"#, bulk, "priority"),
            (r#""priority":-1"#, bulk, "priority"),
            (r#""weight":0"#, bulk, "weight"),
            (r#""weight":1001"#, bulk, "weight"),
            (r#""weight":"3""#, bulk, "weight"),
            (r#""weight":2"#, message, "weight"),
            (r#""max_rate":"fast""#, bulk, "max_rate"),
            (r#""max_rate":"10/s""#, message, "max_rate"),
            (r#""send_at":"tomorrow""#, bulk, "send_at"),
            (r#""send_at":"2023-11-14 23:13:21""#, bulk, "send_at"),
            (r#""send_at":"2030-01-01T00:00:00Z""#, bulk, "send_at"),
        ] {
            let err = check_schedule(&with(extra), kind, now).unwrap_err();
            assert_eq!(err.field, field, "{extra}: {err}");
        }
    }

    #[test]
    fn recipients_are_checked() {
        let rules = RecipientRules {
            header_vars: ["name".to_owned()].into(),
            compiled: None,
            no_vars: false,
        };
        let r = parse_recipient(
            r#"{"email":"a@Example.COM","vars":{"name":"Ann","n":1}}"#,
            &rules,
            &limits(),
        )
        .unwrap();
        assert_eq!(r.address.as_str(), "a@example.com");
        assert_eq!(r.vars, r#"{"name":"Ann","n":1}"#);
        assert_eq!(
            parse_recipient(
                r#"{"email":"a@example.com","vars":null}"#,
                &rules,
                &limits()
            )
            .unwrap()
            .vars,
            ""
        );

        let bad = |json: &str| parse_recipient(json, &rules, &limits()).unwrap_err();
        assert_eq!(bad(r#"{"email":"nope"}"#).1.field, "email");
        assert_eq!(bad(r#"{"email":"nope"}"#).0.as_deref(), Some("nope"));
        assert_eq!(bad(r#"{"vars":{}}"#).1.field, "email");
        assert!(
            bad(r#"{"vars":{}}"#)
                .1
                .message
                .contains("missing field `email`")
        );
        assert_eq!(
            bad(r#"{"email":"a@example.com","vars":[1]}"#).1.field,
            "vars"
        );
        assert_eq!(
            bad(r#"{"email":"a@example.com","vars":{"name":"x\r\nBcc: v@x.com"}}"#)
                .1
                .field,
            "vars.name"
        );
        assert_eq!(
            bad(r#"{"email":"a@example.com","vars":{"name":"x\u000aBcc"}}"#)
                .1
                .field,
            "vars.name"
        );
        // Line breaks in a variable the subject does not use are body content, not a header.
        assert!(
            parse_recipient(
                r#"{"email":"a@example.com","vars":{"body":"a\nb"}}"#,
                &rules,
                &limits()
            )
            .is_ok()
        );
        assert!(
            bad(r#"{"email":"a@example.com","emial":"x"}"#)
                .1
                .message
                .contains("unknown field")
        );
        assert!(bad("{not json").1.message.contains("key must be a string"));
        let big = format!(
            r#"{{"email":"a@example.com","vars":{{"x":"{}"}}}}"#,
            "y".repeat(20_000)
        );
        assert_eq!(bad(&big).1.field, "vars");
    }
}
