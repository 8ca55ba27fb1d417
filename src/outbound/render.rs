//! Message assembly: a campaign template plus one job's variables become the signed bytes to send.
//!
//! [`compile`] runs once per campaign (templates parsed, attachments decoded and MIME-encoded
//! once). [`Assembler::assemble`] renders, builds the MIME message with mail-builder and signs it
//! with every DKIM key of the From domain. [`check_vars`] is the same rendering without the
//! output, run at ingest so a recipient whose variables cannot render the template is refused
//! there rather than bounced at delivery.
//!
//! Assembly is deterministic: Message-ID, Date and MIME boundaries come from the job id and the
//! accept time, so a retry sends the same message (the DKIM `t=` tag aside). Pure CPU, no I/O;
//! signing is expensive, so delivery runs [`Assembler::assemble`] on the blocking pool.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::url::URL;
use mail_builder::mime::{BodyPart, MimePart};
use minijinja::Environment;

use crate::config::Config;
use crate::outbound::dkim::{DkimKeys, SignError};
use crate::outbound::tokens::{Purpose, Tokens};
use crate::store::campaign::{Campaign, CampaignKind, CampaignRecord};
use crate::store::spool::JobId;

/// The header carrying the trace token, so a complaint report that redacts the recipient still
/// names its job.
pub const TRACE_HEADER: &str = "X-Sluice-Ref";

/// A campaign's templates, compiled, and its attachments, encoded.
pub struct Compiled {
    env: Environment<'static>,
    has_text: bool,
    has_html: bool,
    /// Complete MIME parts (headers and base64 body), encoded once per campaign.
    attachments: Vec<Vec<u8>>,
    /// The top-level variables each part reads, to name a missing one.
    part_vars: Vec<(&'static str, BTreeSet<String>)>,
    /// When every part is plain `{{ name }}` substitution: all the names, and the subject's.
    bare: Option<(BTreeSet<String>, BTreeSet<String>)>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("has_text", &self.has_text)
            .field("has_html", &self.has_html)
            .field("attachments", &self.attachments.len())
            .finish()
    }
}

/// Compiles a stored campaign's templates and encodes its attachments. Ingest has validated both,
/// so an error here means a corrupt record.
pub fn compile(record: &CampaignRecord) -> Result<Compiled, String> {
    let mut env = crate::intake::template::environment();
    let mut part_vars = Vec::with_capacity(3);
    let mut bare = Some((BTreeSet::new(), BTreeSet::new()));
    for (name, source) in [
        ("subject", Some(&record.subject)),
        ("text", record.text.as_ref()),
        ("html", record.html.as_ref()),
    ] {
        let Some(source) = source else { continue };
        let vars =
            crate::intake::template::check(name, source).map_err(|e| format!("{name}: {e}"))?;
        env.add_template_owned(name, source.clone())
            .map_err(|e| format!("{name}: {e}"))?;
        bare = match (bare, crate::intake::template::bare_variables(source)) {
            (Some((mut all, mut subject)), Some(names)) => {
                if name == "subject" {
                    subject.extend(names.iter().cloned());
                }
                all.extend(names);
                Some((all, subject))
            }
            _ => None,
        };
        part_vars.push((name, vars));
    }
    let mut attachments = Vec::with_capacity(record.attachments.len());
    for (i, a) in record.attachments.iter().enumerate() {
        let data = a
            .decode()
            .map_err(|e| format!("attachments[{i}].content_base64: {e}"))?;
        let mut part = Vec::with_capacity(data.len() * 4 / 3 + 256);
        MimePart::new(a.content_type.as_str(), BodyPart::Binary(data.into()))
            .attachment(a.filename.as_str())
            .write_part(&mut part);
        attachments.push(part);
    }
    Ok(Compiled {
        env,
        has_text: record.text.is_some(),
        has_html: record.html.is_some(),
        attachments,
        part_vars,
        bare,
    })
}

/// Why one recipient's variables cannot render the campaign: the ingest-time refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarsError {
    /// `vars` or `vars.<name>`.
    pub field: String,
    pub message: String,
}

fn parse_vars(vars_json: &str) -> Result<minijinja::Value, String> {
    if vars_json.is_empty() {
        return Ok(minijinja::Value::from(std::collections::BTreeMap::<
            String,
            String,
        >::new()));
    }
    let vars: serde_json::Value =
        serde_json::from_str(vars_json).map_err(|e| format!("vars: {e}"))?;
    Ok(minijinja::Value::from_serialize(&vars))
}

/// A recipient's variables split at the top level, values left as JSON text.
pub type VarsMap<'a> =
    std::collections::HashMap<std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue>;

/// Renders every part of `compiled` with `vars_json` and throws the output away: the ingest check
/// that these variables render (strict undefined, types) and keep the subject on one line.
/// `parsed` is `vars_json` already split by the caller, if it did so.
pub fn check_vars(
    compiled: &Compiled,
    vars_json: &str,
    parsed: Option<&VarsMap<'_>>,
) -> Result<(), VarsError> {
    if let Some((all, subject)) = &compiled.bare
        && bare_vars_present(all, subject, vars_json, parsed)
    {
        return Ok(());
    }
    let ctx = parse_vars(vars_json).map_err(|message| VarsError {
        field: "vars".into(),
        message,
    })?;
    for (name, vars) in &compiled.part_vars {
        let tmpl = compiled.env.get_template(name).map_err(|e| VarsError {
            field: "vars".into(),
            message: e.to_string(),
        })?;
        if *name == "subject" {
            let subject = tmpl
                .render(&ctx)
                .map_err(|e| render_error(name, vars, &ctx, &e))?;
            if subject.contains(['\r', '\n']) {
                return Err(VarsError {
                    field: "vars".into(),
                    message: "the rendered subject would contain a line break".into(),
                });
            }
        } else {
            tmpl.render_captured_to(&ctx, std::io::sink())
                .map(drop)
                .map_err(|e| render_error(name, vars, &ctx, &e))?;
        }
    }
    Ok(())
}

/// The fast path of [`check_vars`] for templates of bare `{{ name }}` expressions: they render
/// when every name is present. Only says yes; anything doubtful (a missing name, an escape in a
/// subject value that might be a line break, unparsable JSON) goes to a real render, which
/// produces the error message.
fn bare_vars_present(
    all: &BTreeSet<String>,
    subject: &BTreeSet<String>,
    vars_json: &str,
    parsed: Option<&VarsMap<'_>>,
) -> bool {
    if all.is_empty() {
        return true;
    }
    if vars_json.is_empty() {
        return false;
    }
    let parsed_here;
    let map = match parsed {
        Some(m) => m,
        None => match serde_json::from_str::<VarsMap<'_>>(vars_json) {
            Ok(m) => {
                parsed_here = m;
                &parsed_here
            }
            Err(_) => return false,
        },
    };
    all.iter().all(|name| {
        map.get(name.as_str())
            .is_some_and(|raw| !subject.contains(name) || !raw.get().contains('\\'))
    })
}

/// Names the variable when the failure is a missing one (the usual case), else passes on
/// minijinja's message with the part and line.
fn render_error(
    part: &str,
    vars: &BTreeSet<String>,
    ctx: &minijinja::Value,
    e: &minijinja::Error,
) -> VarsError {
    let line = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
    if e.kind() == minijinja::ErrorKind::UndefinedError
        && let Some(missing) = vars
            .iter()
            .find(|v| ctx.get_attr(v).is_ok_and(|x| x.is_undefined()))
    {
        return VarsError {
            field: format!("vars.{missing}"),
            message: format!("missing: the {part} template uses it{line}"),
        };
    }
    let detail = e
        .detail()
        .map(str::to_owned)
        .unwrap_or_else(|| e.kind().to_string());
    VarsError {
        field: "vars".into(),
        message: format!("cannot render the {part} template{line}: {detail}"),
    }
}

/// The message for one job, sent as its DKIM-Signature fields followed by the message they
/// sign, two buffers written one after the other rather than joined.
#[derive(Debug)]
pub struct Rendered {
    /// The DKIM-Signature fields (empty when no key signs the From domain).
    pub signatures: Vec<u8>,
    /// The message.
    pub message: Vec<u8>,
    /// The message has bytes above 127 (for BODY=8BITMIME).
    pub eight_bit: bool,
}

impl Rendered {
    /// The signed message's size in bytes.
    pub fn size(&self) -> usize {
        self.signatures.len() + self.message.len()
    }

    /// The signed message as the pieces it is sent in.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.signatures, &self.message]
    }
}

/// Why a message could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// These variables cannot render this template: permanent for this recipient.
    #[error("message could not be rendered: {0}")]
    Render(String),
    /// A local signing problem: the message must not leave unsigned, so it waits.
    #[error(transparent)]
    Sign(#[from] SignError),
}

/// What assembly needs beyond the campaign: token keys, DKIM keys and the configured addresses.
pub struct Assembler {
    tokens: Tokens,
    dkim: RwLock<Arc<DkimKeys>>,
    unsubscribe_url: String,
    /// `(local, domain)` of `message.unsubscribe_mailto`.
    unsubscribe_mailto: Option<(String, String)>,
    feedback_sender_id: String,
    bounce_local: String,
    bounce_domain: Option<String>,
    /// Compiled templates by campaign sequence: installed at ingest, or compiled on first use
    /// after a restart. Kept as long as the campaign is (campaigns are never removed today).
    templates: RwLock<HashMap<u32, Result<Arc<Compiled>, String>>>,
}

impl Assembler {
    pub fn new(config: &Config, dkim: DkimKeys) -> Assembler {
        let m = &config.message;
        Assembler {
            tokens: Tokens::new(
                &config.secrets.token_keys,
                config
                    .cluster
                    .as_ref()
                    .map(|c| crate::outbound::tokens::node_tag(&c.node_id)),
            ),
            dkim: RwLock::new(Arc::new(dkim)),
            unsubscribe_url: m.unsubscribe_url.clone(),
            unsubscribe_mailto: m.unsubscribe_mailto.as_ref().and_then(|a| {
                a.rsplit_once('@')
                    .map(|(l, d)| (l.to_owned(), d.to_ascii_lowercase()))
            }),
            feedback_sender_id: m.feedback_sender_id.clone(),
            bounce_local: config.bounce.local_part.clone(),
            bounce_domain: config
                .bounce
                .domain
                .as_ref()
                .map(|d| d.to_ascii_lowercase()),
            templates: RwLock::default(),
        }
    }

    /// A campaign's compiled templates, compiled on first use; the error is the compile error.
    /// A message's are compiled for each use and not kept: it is sent once or a few times, and
    /// a backlog of messages must not hold a compiled template each.
    pub fn compiled(&self, campaign: &Campaign) -> Result<Arc<Compiled>, String> {
        if campaign.is_message() {
            return compile(&campaign.record).map(Arc::new);
        }
        if let Some(c) = self
            .templates
            .read()
            .expect("templates lock")
            .get(&campaign.seq)
        {
            return c.clone();
        }
        // Compiled outside the lock; a race compiles twice and keeps the first.
        let compiled = compile(&campaign.record).map(Arc::new);
        self.templates
            .write()
            .expect("templates lock")
            .entry(campaign.seq)
            .or_insert(compiled)
            .clone()
    }

    /// Installs templates compiled at ingest, so delivery does not compile them again.
    pub fn install_compiled(&self, campaign: u32, compiled: Arc<Compiled>) {
        self.templates
            .write()
            .expect("templates lock")
            .insert(campaign, Ok(compiled));
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// The DKIM keys in use.
    pub fn dkim(&self) -> Arc<DkimKeys> {
        Arc::clone(&self.dkim.read().expect("dkim lock"))
    }

    /// Swaps in newly loaded keys (a reload): messages assembled from now on use them. Queued
    /// mail is signed at delivery, so it picks up the new keys too.
    pub fn replace_dkim(&self, keys: DkimKeys) {
        *self.dkim.write().expect("dkim lock") = Arc::new(keys);
    }

    /// The VERP return path of a job: `<local>+<token>@<bounce domain>`; empty (the null
    /// reverse-path) for a DSN we send, from which nothing may bounce (RFC 5321 §4.5.5), and for
    /// role-address mail forwarded to the operator (a bounce of it could only loop).
    pub fn envelope_sender(&self, record: &CampaignRecord, job: JobId) -> String {
        if record
            .raw
            .as_ref()
            .is_some_and(|r| r.via == "dsn" || r.via == "forward")
        {
            return String::new();
        }
        let domain = self
            .bounce_domain
            .as_deref()
            .unwrap_or_else(|| crate::intake::address::domain_of(&record.from));
        format!(
            "{}+{}@{}",
            self.bounce_local,
            self.tokens.issue(Purpose::Verp, job),
            domain
        )
    }

    /// Renders, builds and signs one job's message.
    pub fn assemble(
        &self,
        record: &CampaignRecord,
        compiled: &Compiled,
        job: JobId,
        accepted_at_ms: u64,
        to: &str,
        vars_json: &str,
    ) -> Result<Rendered, AssembleError> {
        let message = self
            .build(record, compiled, job, accepted_at_ms, to, vars_json)
            .map_err(AssembleError::Render)?;
        self.sign(record, message)
    }

    /// `message` with the DKIM signatures of the From domain's keys to put in front of it.
    fn sign(&self, record: &CampaignRecord, message: Vec<u8>) -> Result<Rendered, AssembleError> {
        let from_domain = crate::intake::address::domain_of(&record.from);
        let signatures = self.dkim().sign(from_domain, &message)?;
        let eight_bit = !message.is_ascii() || !signatures.is_ascii();
        Ok(Rendered {
            signatures,
            message,
            eight_bit,
        })
    }

    /// The message of a campaign that is not personalised, for several recipients at once: `lead`
    /// is the first of them, whose job names the message (Message-ID, MIME boundaries, trace
    /// token). `To:` is the empty group `undisclosed-recipients:;`, so no recipient sees another,
    /// and there is no List-Unsubscribe: its one-click link names one recipient.
    pub fn assemble_merged(
        &self,
        record: &CampaignRecord,
        compiled: &Compiled,
        lead: JobId,
        accepted_at_ms: u64,
    ) -> Result<Rendered, AssembleError> {
        let message = self
            .build_for(record, compiled, lead, accepted_at_ms, None, "")
            .map_err(AssembleError::Render)?;
        self.sign(record, message)
    }

    /// [`Assembler::assemble`] of a job's record, or with `merged` [`Assembler::assemble_merged`]
    /// led by it.
    pub fn assemble_job(
        &self,
        record: &CampaignRecord,
        compiled: &Compiled,
        job: JobId,
        rec: &crate::store::spool::JobRecord<'_>,
        merged: bool,
    ) -> Result<Rendered, AssembleError> {
        if merged {
            return self.assemble_merged(record, compiled, job, rec.accepted_at_ms);
        }
        self.assemble(
            record,
            compiled,
            job,
            rec.accepted_at_ms,
            rec.address,
            rec.vars,
        )
    }

    /// A raw message ([`crate::intake::raw`]) for job `job` (the lead of its transaction): the
    /// trace field naming the job, then the stored bytes, signed for its From domain.
    pub fn assemble_raw(
        &self,
        record: &CampaignRecord,
        body: &[u8],
        job: JobId,
    ) -> Result<Rendered, AssembleError> {
        let token = self.tokens.issue(Purpose::Trace, job);
        let mut message = Vec::with_capacity(TRACE_HEADER.len() + token.len() + 4 + body.len());
        message.extend_from_slice(TRACE_HEADER.as_bytes());
        message.extend_from_slice(b": ");
        message.extend_from_slice(token.as_bytes());
        message.extend_from_slice(b"\r\n");
        message.extend_from_slice(body);
        self.sign(record, message)
    }

    /// Whether mail from `from_domain` is signed with an RSA key (the costly kind).
    pub fn signs_with_rsa(&self, from_domain: &str) -> bool {
        self.dkim()
            .for_domain(from_domain)
            .iter()
            .any(|s| s.algorithm == crate::config::DkimAlgorithm::RsaSha256)
    }

    /// The unsigned message.
    pub fn build(
        &self,
        record: &CampaignRecord,
        compiled: &Compiled,
        job: JobId,
        accepted_at_ms: u64,
        to: &str,
        vars_json: &str,
    ) -> Result<Vec<u8>, String> {
        self.build_for(record, compiled, job, accepted_at_ms, Some(to), vars_json)
    }

    /// The unsigned message to `to`, or to several recipients when `None`.
    fn build_for(
        &self,
        record: &CampaignRecord,
        compiled: &Compiled,
        job: JobId,
        accepted_at_ms: u64,
        to: Option<&str>,
        vars_json: &str,
    ) -> Result<Vec<u8>, String> {
        let ctx = parse_vars(vars_json)?;
        let part = |name: &str| -> Result<String, String> {
            compiled
                .env
                .get_template(name)
                .and_then(|t| t.render(&ctx))
                .map_err(|e| format!("{name}: {e:#}"))
        };
        let subject = part("subject")?;
        if subject.contains(['\r', '\n']) {
            return Err("subject: the rendered subject contains a line break".into());
        }
        let from_domain = crate::intake::address::domain_of(&record.from);
        let campaign = record.id.simple().to_string();
        let message_id = format!("{campaign}.{}@{from_domain}", job.index);
        let from: mail_builder::headers::address::Address<'_> = match &record.from_name {
            Some(name) => (name.as_str(), record.from.as_str()).into(),
            None => record.from.as_str().into(),
        };
        let mut builder = mail_builder::MessageBuilder::new().from(from);
        builder = match to {
            Some(to) => builder.to(to),
            None => builder.header("To", Raw::new("undisclosed-recipients:;")),
        };
        builder = builder
            .subject(subject)
            .date((accepted_at_ms / 1000) as i64)
            .message_id(message_id);
        if let Some(r) = &record.reply_to {
            builder = builder.reply_to(r.as_str());
        }
        if record.kind == CampaignKind::Bulk && to.is_some() {
            let token = self.tokens.issue(Purpose::Unsubscribe, job);
            let mut urls = vec![format!("{}{token}", self.unsubscribe_url)];
            if let Some((local, domain)) = &self.unsubscribe_mailto {
                urls.push(format!("mailto:{local}+{token}@{domain}"));
            }
            builder = builder
                .header("List-Unsubscribe", URL::new_list(urls.into_iter()))
                .header(
                    "List-Unsubscribe-Post",
                    Raw::new("List-Unsubscribe=One-Click"),
                );
        }
        builder = builder
            .header("Feedback-ID", Raw::new(self.feedback_id(record, &campaign)))
            .header(
                TRACE_HEADER,
                Raw::new(self.tokens.issue(Purpose::Trace, job)),
            );
        for (name, value) in &record.headers {
            builder = builder.header(
                name.as_str(),
                mail_builder::headers::text::Text::new(value.as_str()),
            );
        }
        // Multipart parts are built by hand rather than with text_body/html_body so boundaries
        // come from the job, not a random source: a retry must send the same bytes.
        let boundary = |kind: &str| format!("=_{campaign}.{}.{kind}", job.index);
        let text = if compiled.has_text {
            Some(MimePart::new("text/plain", part("text")?))
        } else {
            None
        };
        let html = if compiled.has_html {
            Some(MimePart::new("text/html", part("html")?))
        } else {
            None
        };
        let body = match (text, html) {
            (Some(t), Some(h)) => MimePart::new(
                ContentType::new("multipart/alternative").attribute("boundary", boundary("alt")),
                BodyPart::Multipart(vec![t, h]),
            ),
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => return Err("the campaign has neither a text nor an html part".into()),
        };
        let body = if compiled.attachments.is_empty() {
            body
        } else {
            let mut parts = Vec::with_capacity(1 + compiled.attachments.len());
            parts.push(body);
            for a in &compiled.attachments {
                parts.push(MimePart::raw(BodyPart::Binary(a.as_slice().into())));
            }
            MimePart::new(
                ContentType::new("multipart/mixed").attribute("boundary", boundary("mix")),
                BodyPart::Multipart(parts),
            )
        };
        builder = builder.body(body);
        builder
            .write_to_vec()
            .map_err(|e| format!("building the message: {e}"))
    }

    /// `campaign:tag:kind:sender` (`campaign:tag:tenant:sender` for a tenant's mail), Gmail's
    /// Feedback-ID layout: complaint rates are reported per value of each field. The tag is the
    /// campaign's first, reduced to safe characters.
    fn feedback_id(&self, record: &CampaignRecord, campaign: &str) -> String {
        let tag: String = record
            .tags
            .first()
            .map(|t| {
                t.chars()
                    .take(32)
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect()
            })
            .unwrap_or_else(|| "untagged".into());
        // A tenant's mail names the tenant in the third field instead of the kind, so Gmail's
        // Postmaster Tools report each tenant's complaint rate.
        let third = match (&record.tenant, record.kind) {
            (Some(tenant), _) => tenant.as_str(),
            (None, CampaignKind::Bulk) => "bulk",
            (None, CampaignKind::Transactional) => "transactional",
        };
        format!("{campaign}:{tag}:{third}:{}", self.feedback_sender_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::campaign::{Attachment, CampaignState};

    fn record() -> CampaignRecord {
        CampaignRecord {
            id: uuid::Uuid::nil(),
            kind: CampaignKind::Bulk,
            from: "news@example.com".into(),
            from_name: Some("Example News".into()),
            reply_to: None,
            subject: "Hi {{ name }}".into(),
            text: Some("Hello {{ name }}.\n.leading dot\n".into()),
            html: Some("<p>{{ name }}</p>".into()),
            headers: [("X-Campaign".to_owned(), "spring".to_owned())].into(),
            tags: vec!["spring sale".into()],
            attachments: vec![],
            personalised: true,
            state: CampaignState::Active,
            created_at_ms: 0,
            lifecycle: Default::default(),
            schedule: Default::default(),
            pool: None,
            stream: None,
            raw: None,
            guard: None,
            breaker: Default::default(),
            tenant: None,
        }
    }

    fn assembler(dkim: DkimKeys) -> Assembler {
        let mut config = Config::default();
        config.bounce.domain = Some("bounces.example.net".into());
        config.message.unsubscribe_url = "https://mta.example.net/u/".into();
        config.message.unsubscribe_mailto = Some("unsub@bounces.example.net".into());
        Assembler::new(&config, dkim)
    }

    const JOB: JobId = JobId {
        campaign: 3,
        index: 7,
    };

    fn text_of(a: &Assembler, rec: &CampaignRecord, vars: &str) -> String {
        let c = compile(rec).unwrap();
        let r = a
            .assemble(rec, &c, JOB, 1_700_000_000_000, "ann@example.org", vars)
            .unwrap();
        String::from_utf8(r.parts().concat()).unwrap()
    }

    #[test]
    fn renders_deterministically_with_escaping_and_headers() {
        let rec = record();
        let a = assembler(DkimKeys::default());
        let first = text_of(&a, &rec, r#"{"name":"<Ann>"}"#);
        let again = text_of(&a, &rec, r#"{"name":"<Ann>"}"#);
        assert_eq!(first, again, "a retry sends the same message");
        let text = first;
        assert!(
            text.contains("Message-ID: <00000000000000000000000000000000.7@example.com>"),
            "{text}"
        );
        assert!(text.contains("Subject: Hi <Ann>"), "{text}");
        assert!(text.contains("&lt;Ann&gt;"), "HTML is escaped: {text}");
        assert!(text.contains("X-Campaign: spring"), "{text}");
        let unsub = a.tokens().issue(Purpose::Unsubscribe, JOB);
        assert!(
            text.contains(&format!(
                "List-Unsubscribe: <https://mta.example.net/u/{unsub}>,"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("<mailto:unsub+{unsub}@bounces.example.net>")),
            "{text}"
        );
        assert!(
            text.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "Feedback-ID: 00000000000000000000000000000000:spring-sale:bulk:sluice\r\n"
            ),
            "{text}"
        );
        let trace = a.tokens().issue(Purpose::Trace, JOB);
        assert!(
            text.contains(&format!("X-Sluice-Ref: {trace}\r\n")),
            "{text}"
        );
        assert!(text.contains("\r\n"), "CRLF line endings");
        assert!(!text.replace("\r\n", "").contains('\n'), "no bare LF");
        assert_eq!(
            a.envelope_sender(&rec, JOB),
            format!(
                "bounce+{}@bounces.example.net",
                a.tokens().issue(Purpose::Verp, JOB)
            )
        );
    }

    #[test]
    fn transactional_messages_have_no_unsubscribe_header() {
        let mut rec = record();
        rec.kind = CampaignKind::Transactional;
        let text = text_of(&assembler(DkimKeys::default()), &rec, r#"{"name":"Ann"}"#);
        assert!(!text.contains("List-Unsubscribe"), "{text}");
        assert!(text.contains(":transactional:sluice"), "{text}");
    }

    #[test]
    fn a_tenants_mail_names_the_tenant_in_its_feedback_id() {
        let mut rec = record();
        rec.tenant = Some("acme".into());
        let text = text_of(&assembler(DkimKeys::default()), &rec, r#"{"name":"Ann"}"#);
        assert!(
            text.contains(
                "Feedback-ID: 00000000000000000000000000000000:spring-sale:acme:sluice\r\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn non_ascii_long_lines_and_attachments_are_encoded() {
        let mut rec = record();
        rec.subject = "Grüße, {{ name }} — ünïcödé".into();
        rec.from_name = Some("Zoë Ünïcode".into());
        rec.text = Some(format!("{}\nKäse\n", "x".repeat(3000)));
        rec.attachments = vec![Attachment {
            filename: "prix déjà.pdf".into(),
            content_type: "application/pdf".into(),
            content_base64: "JVBERi0xLjQKJcfsj6IK".into(),
        }];
        let text = text_of(&assembler(DkimKeys::default()), &rec, r#"{"name":"Ann"}"#);
        assert!(text.is_ascii(), "everything is encoded: {text}");
        assert!(text.contains("Subject: =?utf-8?"), "{text}");
        assert!(text.contains("multipart/mixed"), "{text}");
        assert!(text.contains("JVBERi0xLjQKJcfsj6IK"), "{text}");
        for line in text.split("\r\n") {
            assert!(line.len() <= 998, "a line of {} octets", line.len());
        }
    }

    #[test]
    fn the_messages_built_are_hashed_for_dkim_as_they_are() {
        // The signing path hashes a body without canonicalising it when it is in canonical
        // form already: the messages built here are, plain, multipart and encoded alike, unless
        // the text itself has tabs or runs of spaces.
        let plain = record();
        let mut encoded = record();
        encoded.text = Some(format!("{}\nKäse \n\n\n", "x ".repeat(600)));
        encoded.attachments = vec![Attachment {
            filename: "a.pdf".into(),
            content_type: "application/pdf".into(),
            content_base64: "JVBERi0xLjQKJcfsj6IK".into(),
        }];
        for rec in [plain, encoded] {
            let text = text_of(&assembler(DkimKeys::default()), &rec, r#"{"name":"Ann"}"#);
            let (fields, body) =
                crate::outbound::dkim::split_header(text.as_bytes()).expect("a header section");
            assert!(fields.len() > 5, "{text}");
            assert!(
                crate::outbound::dkim::relaxed_as_is(body).is_some(),
                "{text}"
            );
        }
        let mut tabbed = record();
        tabbed.text = Some("a\tb\n".into());
        let text = text_of(
            &assembler(DkimKeys::default()),
            &tabbed,
            r#"{"name":"Ann"}"#,
        );
        let (_, body) = crate::outbound::dkim::split_header(text.as_bytes()).expect("a header");
        assert_eq!(crate::outbound::dkim::relaxed_as_is(body), None, "{text}");
    }

    #[test]
    fn check_vars_names_the_missing_variable() {
        let rec = record();
        let c = compile(&rec).unwrap();
        assert_eq!(check_vars(&c, r#"{"name":"Ann"}"#, None), Ok(()));
        let e = check_vars(&c, "", None).unwrap_err();
        assert_eq!(e.field, "vars.name");
        assert!(e.message.contains("subject"), "{e:?}");
        let mut rec = record();
        rec.text = Some("{% for i in items %}{{ i }}{% endfor %}".into());
        let c = compile(&rec).unwrap();
        let e = check_vars(&c, r#"{"name":"Ann","items":3}"#, None).unwrap_err();
        assert_eq!(e.field, "vars");
        assert!(e.message.contains("text template"), "{e:?}");
        let e = check_vars(&c, r#"{"name":"a\nBcc: x","items":[]}"#, None).unwrap_err();
        assert!(e.message.contains("line break"), "{e:?}");
    }
}
