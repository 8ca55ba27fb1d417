//! Turning a campaign template and one job's variables into the message bytes to send.
//!
//! The one function delivery calls is [`render`]. Rendering is deterministic: Message-ID and
//! Date come from the job id and the accept time, so a retry sends the same message. Pure CPU,
//! no I/O. Templates are compiled once per campaign ([`Compiled`]) and cached on the campaign.

use mail_builder::headers::content_type::ContentType;
use mail_builder::mime::{BodyPart, MimePart};
use minijinja::Environment;

use crate::campaign::CampaignRecord;
use crate::spool::JobId;

/// A campaign's templates, compiled.
pub struct Compiled {
    env: Environment<'static>,
    has_text: bool,
    has_html: bool,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("has_text", &self.has_text)
            .field("has_html", &self.has_html)
            .finish()
    }
}

pub fn compile(record: &CampaignRecord) -> Result<Compiled, String> {
    let mut env = crate::template::environment();
    env.add_template_owned("subject", record.subject.clone())
        .map_err(|e| format!("subject: {e}"))?;
    if let Some(t) = &record.text {
        env.add_template_owned("text", t.clone())
            .map_err(|e| format!("text: {e}"))?;
    }
    if let Some(h) = &record.html {
        env.add_template_owned("html", h.clone())
            .map_err(|e| format!("html: {e}"))?;
    }
    Ok(Compiled {
        env,
        has_text: record.text.is_some(),
        has_html: record.html.is_some(),
    })
}

/// The message for one job.
#[derive(Debug)]
pub struct Rendered {
    pub bytes: Vec<u8>,
    /// The message has bytes above 127 (for BODY=8BITMIME).
    pub eight_bit: bool,
}

/// Renders one job's message. An error means these variables cannot render this template: a
/// permanent failure for this recipient.
pub fn render(
    record: &CampaignRecord,
    compiled: &Compiled,
    job: JobId,
    accepted_at_ms: u64,
    to: &str,
    vars_json: &str,
) -> Result<Rendered, String> {
    let vars: serde_json::Value = if vars_json.is_empty() {
        serde_json::Value::Object(Default::default())
    } else {
        serde_json::from_str(vars_json).map_err(|e| format!("vars: {e}"))?
    };
    let ctx = minijinja::Value::from_serialize(&vars);
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
    let from_domain = crate::address::domain_of(&record.from);
    let message_id = format!("{}.{}@{}", record.id.simple(), job.index, from_domain);
    let from: mail_builder::headers::address::Address<'_> = match &record.from_name {
        Some(name) => (name.as_str(), record.from.as_str()).into(),
        None => record.from.as_str().into(),
    };
    let mut builder = mail_builder::MessageBuilder::new()
        .from(from)
        .to(to)
        .subject(subject)
        .message_id(message_id)
        .date((accepted_at_ms / 1000) as i64);
    if let Some(r) = &record.reply_to {
        builder = builder.reply_to(r.as_str());
    }
    for (name, value) in &record.headers {
        builder = builder.header(
            name.as_str(),
            mail_builder::headers::text::Text::new(value.as_str()),
        );
    }
    // Built by hand rather than with text_body/html_body so the boundary is derived from the
    // job, not random: a retry must send byte-for-byte the same message.
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
        (Some(t), Some(h)) => {
            let boundary = format!("=_sluice_{}_{}", record.id.simple(), job.index);
            let ct = ContentType::new("multipart/alternative").attribute("boundary", boundary);
            MimePart::new(ct, BodyPart::Multipart(vec![t, h]))
        }
        (Some(only), None) | (None, Some(only)) => only,
        (None, None) => return Err("the campaign has neither a text nor an html part".into()),
    };
    builder = builder.body(body);
    let bytes = builder
        .write_to_vec()
        .map_err(|e| format!("building the message: {e}"))?;
    let eight_bit = !bytes.is_ascii();
    Ok(Rendered { bytes, eight_bit })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::{CampaignKind, CampaignState};

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
            tags: vec![],
            state: CampaignState::Active,
            created_at_ms: 0,
        }
    }

    #[test]
    fn renders_deterministically_with_escaping() {
        let rec = record();
        let c = compile(&rec).unwrap();
        let job = JobId {
            campaign: 3,
            index: 7,
        };
        let a = render(
            &rec,
            &c,
            job,
            1_700_000_000_000,
            "ann@example.org",
            r#"{"name":"<Ann>"}"#,
        )
        .unwrap();
        let b = render(
            &rec,
            &c,
            job,
            1_700_000_000_000,
            "ann@example.org",
            r#"{"name":"<Ann>"}"#,
        )
        .unwrap();
        assert_eq!(a.bytes, b.bytes, "a retry sends the same message");
        let text = String::from_utf8(a.bytes).unwrap();
        assert!(
            text.contains("Message-ID: <00000000000000000000000000000000.7@example.com>"),
            "{text}"
        );
        assert!(text.contains("Subject: Hi <Ann>"), "{text}");
        assert!(text.contains("&lt;Ann&gt;"), "HTML is escaped: {text}");
        assert!(text.contains("X-Campaign: spring"), "{text}");
        assert!(text.contains("\r\n"), "CRLF line endings");
        assert!(!text.replace("\r\n", "").contains('\n'), "no bare LF");
    }

    #[test]
    fn missing_variables_fail() {
        let rec = record();
        let c = compile(&rec).unwrap();
        let e = render(
            &rec,
            &c,
            JobId {
                campaign: 1,
                index: 1,
            },
            0,
            "a@example.org",
            "",
        )
        .unwrap_err();
        assert!(e.contains("subject"), "{e}");
        let crlf = render(
            &rec,
            &c,
            JobId {
                campaign: 1,
                index: 1,
            },
            0,
            "a@example.org",
            r#"{"name":"x\r\nBcc: y"}"#,
        );
        assert!(crlf.is_err());
    }
}
