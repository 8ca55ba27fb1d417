//! Delivery status notifications to submitters (RFC 3461, RFC 3464): when a message taken over
//! SMTP with a return path bounces or expires, its submitter gets a DSN, unless the recipient
//! asked for none (`NOTIFY=NEVER`, or a NOTIFY without FAILURE). Campaigns and messages taken
//! over HTTP never get one: their senders read events and the delivery log, and a campaign's
//! return path is our own VERP address.
//!
//! A [`Transition`](crate::effects::transition::Transition) that fails such a job hands a
//! [`Notice`] to the node's [`Notices`] once it is applied; a task of the intake side
//! ([`crate::intake::raw::send_dsns`]) builds the report with [`build`] and queues it as a raw
//! message with a null return path (RFC 5321 §4.5.5: nothing bounces back from a DSN). The
//! notice travels in memory, after the failure is written: a crash in between loses the DSN,
//! never the failure itself.

use std::sync::{Arc, LazyLock, Mutex};

use prometheus::{IntCounterVec, register_int_counter_vec};

use crate::store::campaign::Ret;

pub(crate) static DSNS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_dsn_total",
        "Delivery status notifications to submitters of SMTP mail, by result: queued, dropped (the notice queue was full), failed (it could not be queued).",
        &["result"]
    )
    .expect("metric registers once")
});

/// Notices waiting to be built: more than this are dropped (and counted).
const QUEUE: usize = 10_000;

/// One failed recipient of a submitted message, as its DSN reports it.
#[derive(Debug, Clone)]
pub struct Notice {
    /// The submitter's envelope sender: where the DSN goes.
    pub to: String,
    pub envid: Option<String>,
    pub ret: Option<Ret>,
    pub recipient: String,
    /// RFC 3461 ORCPT as given (`rfc822;someone@example.com`).
    pub orcpt: Option<String>,
    /// `failed` (a bounce) or `failed` after expiry; RFC 3464 Action.
    pub action: &'static str,
    /// RFC 3463 status, e.g. `5.1.1`.
    pub status: String,
    /// The reply or the reason, as the delivery log has it.
    pub diagnostic: String,
    /// Whether the diagnostic is a remote server's SMTP reply.
    pub smtp_reply: bool,
    pub remote_mta: Option<String>,
    pub arrival_ms: u64,
    /// The message's bytes, when at hand (they may be gone after a late remote bounce).
    pub original: Option<Arc<[u8]>>,
    /// The failed job, which names the DSN (its Message-ID).
    pub job: String,
}

/// The node's queue of notices (a bounded channel; its receiver is taken once, by the task that
/// sends them).
pub struct Notices {
    tx: tokio::sync::mpsc::Sender<Notice>,
    rx: Mutex<Option<tokio::sync::mpsc::Receiver<Notice>>>,
}

impl Default for Notices {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        Notices {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Notices {
    pub fn send(&self, notice: Notice) {
        if self.tx.try_send(notice).is_err() {
            DSNS.with_label_values(&["dropped"]).inc();
            tracing::warn!("the DSN queue is full; a delivery status notification was dropped");
        }
    }

    /// The receiving end, the first time it is asked for.
    pub fn receiver(&self) -> Option<tokio::sync::mpsc::Receiver<Notice>> {
        self.rx.lock().expect("dsn receiver lock").take()
    }
}

/// The DSN request a recipient's job keeps (its `vars`): NOTIFY and ORCPT.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Request {
    #[serde(default)]
    pub notify: Option<String>,
    #[serde(default)]
    pub orcpt: Option<String>,
}

impl Request {
    pub fn parse(vars: &str) -> Request {
        if vars.is_empty() {
            return Request::default();
        }
        serde_json::from_str(vars).unwrap_or_default()
    }

    /// Whether a failure is to be reported: RFC 3461 §4.1, the default is failures (and delays,
    /// which Sluice does not report).
    pub fn wants_failure(&self) -> bool {
        self.notify
            .as_deref()
            .is_none_or(|n| n.split(',').any(|i| i.eq_ignore_ascii_case("FAILURE")))
    }
}

impl Request {
    /// The RCPT parameters that pass the request on to the next server (RFC 3461 §5.2).
    pub fn rcpt_params(&self) -> String {
        let mut out = String::new();
        if let Some(n) = &self.notify {
            out.push_str("NOTIFY=");
            out.push_str(n);
        }
        if let Some(o) = &self.orcpt {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str("ORCPT=");
            out.push_str(&xtext(o));
        }
        out
    }
}

/// The MAIL parameters that pass a submission's RET and ENVID on.
pub fn mail_params(raw: &crate::store::campaign::RawMeta) -> String {
    let mut out = String::new();
    if let Some(ret) = raw.ret {
        out.push_str(match ret {
            Ret::Full => "RET=FULL",
            Ret::Hdrs => "RET=HDRS",
        });
    }
    if let Some(id) = &raw.envid {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("ENVID=");
        out.push_str(&xtext(id));
    }
    out
}

/// RFC 3461 §4 xtext: `+`, `=`, controls, space and non-ASCII as `+XX`.
fn xtext(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Returned whole by default up to this size; beyond it, only the header.
const RETURN_FULL_MAX: usize = 100 * 1024;

/// The DSN for `n`, from `MAILER-DAEMON@host`: a `multipart/report` (RFC 6522) with a sentence
/// for people, the `message/delivery-status` fields, and the original message (RET=FULL, or
/// unset and small) or its header (RET=HDRS).
pub fn build(n: &Notice, host: &str, now_ms: u64) -> Vec<u8> {
    let boundary = format!("=_dsn.{}", n.job);
    let date = mail_builder::headers::date::Date::new((now_ms / 1000) as i64).to_rfc822();
    let arrival = mail_builder::headers::date::Date::new((n.arrival_ms / 1000) as i64).to_rfc822();
    let mut m = String::with_capacity(2048);
    let line = |m: &mut String, s: &str| {
        m.push_str(s);
        m.push_str("\r\n");
    };
    line(
        &mut m,
        &format!("From: Mail Delivery System <MAILER-DAEMON@{host}>"),
    );
    line(&mut m, &format!("To: <{}>", n.to));
    line(&mut m, "Subject: Undelivered Mail Returned to Sender");
    line(&mut m, &format!("Date: {date}"));
    line(&mut m, &format!("Message-ID: <dsn.{}@{host}>", n.job));
    line(&mut m, "Auto-Submitted: auto-replied");
    line(&mut m, "MIME-Version: 1.0");
    line(
        &mut m,
        &format!(
            "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""
        ),
    );
    line(&mut m, "");
    line(&mut m, "This is a MIME-encapsulated message.");
    line(&mut m, "");
    line(&mut m, &format!("--{boundary}"));
    line(&mut m, "Content-Type: text/plain; charset=utf-8");
    line(&mut m, "");
    line(&mut m, &format!("This is the mail system at host {host}."));
    line(&mut m, "");
    line(
        &mut m,
        &format!("Your message could not be delivered to <{}>.", n.recipient),
    );
    for chunk in wrap(&n.diagnostic, 76) {
        line(&mut m, &chunk);
    }
    line(&mut m, "");
    line(&mut m, &format!("--{boundary}"));
    line(&mut m, "Content-Type: message/delivery-status");
    line(&mut m, "");
    line(&mut m, &format!("Reporting-MTA: dns; {host}"));
    if let Some(id) = &n.envid {
        line(&mut m, &format!("Original-Envelope-Id: {}", one_line(id)));
    }
    line(&mut m, &format!("Arrival-Date: {arrival}"));
    line(&mut m, "");
    if let Some(o) = &n.orcpt {
        line(&mut m, &format!("Original-Recipient: {}", one_line(o)));
    }
    line(&mut m, &format!("Final-Recipient: rfc822; {}", n.recipient));
    line(&mut m, &format!("Action: {}", n.action));
    line(&mut m, &format!("Status: {}", n.status));
    if let Some(mta) = &n.remote_mta {
        line(&mut m, &format!("Remote-MTA: dns; {}", one_line(mta)));
    }
    let kind = if n.smtp_reply { "smtp" } else { "x-sluice" };
    let diag = format!("Diagnostic-Code: {kind}; {}", one_line(&n.diagnostic));
    // Folded so no line passes 998 octets (RFC 5322 §2.1.1).
    for (i, chunk) in wrap(&diag, 900).into_iter().enumerate() {
        if i == 0 {
            line(&mut m, &chunk);
        } else {
            line(&mut m, &format!("\t{chunk}"));
        }
    }
    line(&mut m, &format!("Last-Attempt-Date: {date}"));
    line(&mut m, "");
    let mut out = m.into_bytes();
    if let Some(original) = &n.original {
        let full = match n.ret {
            Some(Ret::Full) => true,
            Some(Ret::Hdrs) => false,
            None => original.len() <= RETURN_FULL_MAX,
        };
        let head = format!(
            "--{boundary}\r\nContent-Type: {}\r\n\r\n",
            if full {
                "message/rfc822"
            } else {
                "text/rfc822-headers"
            }
        );
        out.extend_from_slice(head.as_bytes());
        let part: &[u8] = if full {
            original
        } else {
            // The header section, up to and including the empty line.
            match memchr::memmem::find(original, b"\r\n\r\n") {
                Some(i) => &original[..i + 4],
                None => original,
            }
        };
        out.extend_from_slice(part);
        if !part.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// `text` without line breaks or control characters, for a header field.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `text` on one line cut into pieces of at most `width` bytes (at character boundaries).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let text = one_line(text);
    let mut out = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if current.len() + c.len_utf8() > width {
            out.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    if !current.is_empty() || out.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(ret: Option<Ret>) -> Notice {
        Notice {
            to: "app@example.com".into(),
            envid: Some("order-42".into()),
            ret,
            recipient: "nobody@example.org".into(),
            orcpt: Some("rfc822;nobody@example.org".into()),
            action: "failed",
            status: "5.1.1".into(),
            diagnostic: format!("550 5.1.1 no such user {}", "x".repeat(2000)),
            smtp_reply: true,
            remote_mta: Some("mx.example.org".into()),
            arrival_ms: 1_700_000_000_000,
            original: Some(Arc::from(
                &b"From: app@example.com\r\nSubject: hi\r\n\r\nbody line\r\n"[..],
            )),
            job: "7.3".into(),
        }
    }

    #[test]
    fn a_dsn_is_a_report_a_parser_reads() {
        use mail_parser::MimeHeaders;
        let bytes = build(&notice(None), "mta.example.com", 1_700_000_100_000);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.lines().all(|l| l.len() <= 998), "{text}");
        let msg = mail_parser::MessageParser::default().parse(&bytes).unwrap();
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        let ct = msg.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert!(text.contains("\r\nOriginal-Envelope-Id: order-42\r\n"));
        assert!(text.contains("\r\nFinal-Recipient: rfc822; nobody@example.org\r\n"));
        assert!(text.contains("\r\nOriginal-Recipient: rfc822;nobody@example.org\r\n"));
        assert!(text.contains("\r\nStatus: 5.1.1\r\n"));
        assert!(text.contains("\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user"));
        assert!(text.contains("Content-Type: message/rfc822\r\n\r\nFrom: app@example.com"));
        assert!(
            text.contains("body line"),
            "small and RET unset: returned whole"
        );
        let headers =
            String::from_utf8(build(&notice(Some(Ret::Hdrs)), "mta.example.com", 0)).unwrap();
        assert!(headers.contains("Content-Type: text/rfc822-headers\r\n\r\nFrom: app@example.com"));
        assert!(!headers.contains("body line"), "RET=HDRS: the header only");
        // The whole report passes the checks every raw message passes.
        crate::intake::raw::check(&bytes).expect("a DSN is a valid message");
    }

    #[test]
    fn requests_pass_on_as_parameters() {
        let r = Request::parse(r#"{"notify":"FAILURE,DELAY","orcpt":"rfc822;a+b=c@d.test"}"#);
        assert_eq!(
            r.rcpt_params(),
            "NOTIFY=FAILURE,DELAY ORCPT=rfc822;a+2Bb+3Dc@d.test"
        );
        assert_eq!(Request::parse("").rcpt_params(), "");
        let raw = crate::store::campaign::RawMeta {
            body: 0,
            recipients: 1,
            via: "smtp".into(),
            mail_from: "a@b.test".into(),
            ret: Some(Ret::Hdrs),
            envid: Some("id 1".into()),
        };
        assert_eq!(mail_params(&raw), "RET=HDRS ENVID=id+201");
    }

    #[test]
    fn notify_decides() {
        assert!(Request::parse("").wants_failure());
        assert!(Request::parse(r#"{"notify":"FAILURE,DELAY","orcpt":null}"#).wants_failure());
        assert!(!Request::parse(r#"{"notify":"NEVER"}"#).wants_failure());
        assert!(!Request::parse(r#"{"notify":"SUCCESS"}"#).wants_failure());
        assert_eq!(
            Request::parse(r#"{"notify":null,"orcpt":"rfc822;a@b.test"}"#)
                .orcpt
                .as_deref(),
            Some("rfc822;a@b.test")
        );
    }
}
