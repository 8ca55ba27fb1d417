//! The one classifier: every SMTP reply, transport error and DNS answer becomes an [`Outcome`]
//! here and nowhere else. Pure code, no I/O.
//!
//! The verdict (delivered, deferred, bounced) follows the reply class, then [`classify`] runs the
//! bounce rules ([`rules`], from `config/bounce-rules.toml`) over every failure: they name its
//! category, retry a 5xx whose category is soft, and say whether a hard bounce suppresses.

pub mod rules;

use serde::Serialize;

use crate::outbound::dns::DnsFailure;
use crate::outbound::smtp::client::SmtpError;
use crate::outbound::smtp::reply::{Command, EnhancedCode, Reply};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Delivered,
    /// Temporary failure: retried later.
    Deferred,
    /// Permanent failure.
    Bounced,
    /// Still undelivered when the maximum age was reached.
    Expired,
}

/// What happened to one recipient on one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The SMTP reply code, when a server answered.
    pub code: Option<u16>,
    /// RFC 3463 status: from the reply when it had one, else derived from the failure.
    pub status: EnhancedCode,
    /// Human-readable reason: the reply text or a description of the failure.
    pub text: String,
    /// The command (stage) at which it was decided.
    pub stage: Command,
    /// Set by [`classify`] on every failure.
    pub class: Option<rules::Classification>,
    /// A deferral's next attempt when something other than the retry schedule says when (an
    /// NXDOMAIN waiting for its confirming lookup), ms since the epoch.
    pub retry_at_ms: Option<u64>,
}

impl Outcome {
    /// One line for the spool's `last_response`: `550 5.1.1 no such user`.
    pub fn summary(&self) -> String {
        match self.code {
            Some(c) => format!("{c} {} {}", self.status, self.text),
            None => format!("{} {}", self.status, self.text),
        }
    }
}

/// The reply that decided a recipient's fate.
pub fn from_reply(reply: &Reply) -> Outcome {
    let class = (reply.code / 100) as u8;
    let verdict = match class {
        2 | 3 => Verdict::Delivered,
        4 => Verdict::Deferred,
        _ => Verdict::Bounced,
    };
    let status = reply.enhanced.unwrap_or(match class {
        2 | 3 => EnhancedCode(2, 0, 0),
        4 => EnhancedCode(4, 0, 0),
        _ => EnhancedCode(5, 0, 0),
    });
    Outcome {
        verdict,
        code: Some(reply.code),
        status,
        text: one_line(&reply.text),
        stage: reply.command,
        class: None,
        retry_at_ms: None,
    }
}

/// Longest reply text kept in an outcome (and so in the spool record and the log).
const MAX_TEXT: usize = 1000;

/// A multi-line reply's text on one line (providers spread one sentence over several), capped.
fn one_line(text: &str) -> String {
    let mut out = text
        .split('\n')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if out.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// Runs the bounce rules over a failure: sets its class, and retries a 5xx of a soft category.
/// Delivered outcomes pass unchanged; expired ones are `message-expired`.
pub fn classify(mut o: Outcome, rules: &rules::Rules) -> Outcome {
    match o.verdict {
        Verdict::Delivered => {}
        Verdict::Expired => o.class = Some(rules.of(rules::Category::MessageExpired)),
        Verdict::Deferred | Verdict::Bounced => {
            let c = rules.classify(o.status, o.code, &o.text);
            if o.verdict == Verdict::Bounced && c.kind == rules::Kind::Soft {
                o.verdict = Verdict::Deferred;
            }
            o.class = Some(c);
        }
    }
    o
}

/// A connection-level failure. The recipient is never bounced for it: the next attempt may go
/// through (another MX, a later time), except when the server refused us permanently at EHLO
/// or a policy makes the destination unusable.
pub fn from_error(e: &SmtpError) -> Outcome {
    let stage = e.stage();
    let (status, code) = match e {
        SmtpError::Rejected { reply } => {
            return Outcome {
                // A 5xx greeting or EHLO refusal is about us, not the recipient: retry later.
                verdict: Verdict::Deferred,
                code: Some(reply.code),
                status: reply
                    .enhanced
                    .map(|c| EnhancedCode(4, c.1, c.2))
                    .unwrap_or(EnhancedCode(4, 0, 0)),
                text: format!(
                    "{} refused: {}",
                    reply.command,
                    reply.text.split('\n').next().unwrap_or("")
                ),
                stage,
                class: None,
                retry_at_ms: None,
            };
        }
        SmtpError::Io { .. } | SmtpError::Closed { .. } => (EnhancedCode(4, 4, 2), None),
        SmtpError::Timeout {
            stage: Command::Connect,
            ..
        } => (EnhancedCode(4, 4, 1), None),
        SmtpError::Timeout { .. } => (EnhancedCode(4, 4, 2), None),
        SmtpError::Protocol { .. } => (EnhancedCode(4, 5, 0), None),
        SmtpError::Tls(_) | SmtpError::TlsNotOffered => (EnhancedCode(4, 7, 10), None),
        SmtpError::Certificate { .. } => (EnhancedCode(4, 7, 5), None),
    };
    Outcome {
        verdict: Verdict::Deferred,
        code,
        status,
        text: e.to_string(),
        stage,
        class: None,
        retry_at_ms: None,
    }
}

/// A DNS answer that stopped delivery before any connection.
pub fn from_dns(f: &DnsFailure) -> Outcome {
    let (verdict, status) = match f {
        DnsFailure::NxDomain => (Verdict::Bounced, EnhancedCode(5, 1, 2)),
        DnsFailure::NullMx => (Verdict::Bounced, EnhancedCode(5, 1, 10)),
        DnsFailure::NoAddress(_) => (Verdict::Deferred, EnhancedCode(4, 4, 4)),
        DnsFailure::Temporary(_) => (Verdict::Deferred, EnhancedCode(4, 4, 3)),
        DnsFailure::Bogus(_) => (Verdict::Deferred, EnhancedCode(4, 7, 5)),
    };
    Outcome {
        verdict,
        code: None,
        status,
        text: f.to_string(),
        stage: Command::Connect,
        class: None,
        retry_at_ms: None,
    }
}

/// A message Sluice itself cannot send (template failure, size, SMTPUTF8 not offered).
pub fn local_failure(status: EnhancedCode, text: impl Into<String>, stage: Command) -> Outcome {
    let verdict = if status.0 == 5 {
        Verdict::Bounced
    } else {
        Verdict::Deferred
    };
    Outcome {
        verdict,
        code: None,
        status,
        text: text.into(),
        stage,
        class: None,
        retry_at_ms: None,
    }
}

/// A recipient that ran out of time: the last failure, made final.
pub fn expired(last: &str) -> Outcome {
    Outcome {
        verdict: Verdict::Expired,
        code: None,
        status: EnhancedCode(5, 4, 7),
        text: if last.is_empty() {
            "delivery time expired".into()
        } else {
            format!("delivery time expired; last: {last}")
        },
        stage: Command::Connect,
        class: None,
        retry_at_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, enhanced: Option<EnhancedCode>, text: &str, command: Command) -> Reply {
        Reply {
            code,
            enhanced,
            text: text.into(),
            command,
        }
    }

    #[test]
    fn replies_classify_by_class() {
        let o = from_reply(&reply(
            250,
            Some(EnhancedCode(2, 0, 0)),
            "queued as X",
            Command::Dot,
        ));
        assert_eq!((o.verdict, o.code), (Verdict::Delivered, Some(250)));
        let o = from_reply(&reply(450, None, "try later", Command::Rcpt));
        assert_eq!(
            (o.verdict, o.status),
            (Verdict::Deferred, EnhancedCode(4, 0, 0))
        );
        let o = from_reply(&reply(
            550,
            Some(EnhancedCode(5, 1, 1)),
            "no such user\nmore",
            Command::Rcpt,
        ));
        assert_eq!(
            (o.verdict, o.status, o.text.as_str()),
            (Verdict::Bounced, EnhancedCode(5, 1, 1), "no such user more")
        );
        assert_eq!(o.summary(), "550 5.1.1 no such user more");
        let o = from_reply(&reply(
            421,
            Some(EnhancedCode(4, 7, 0)),
            "too many connections",
            Command::Mail,
        ));
        assert_eq!(o.verdict, Verdict::Deferred);
    }

    #[test]
    fn connection_trouble_defers_and_dns_decides() {
        let e = SmtpError::Closed {
            stage: Command::Dot,
        };
        assert_eq!(from_error(&e).verdict, Verdict::Deferred);
        assert_eq!(from_error(&e).status, EnhancedCode(4, 4, 2));
        let e = SmtpError::Rejected {
            reply: reply(
                554,
                Some(EnhancedCode(5, 7, 1)),
                "go away",
                Command::Connect,
            ),
        };
        assert_eq!(from_error(&e).verdict, Verdict::Deferred);
        assert_eq!(from_dns(&DnsFailure::NullMx).status, EnhancedCode(5, 1, 10));
        assert_eq!(from_dns(&DnsFailure::NxDomain).verdict, Verdict::Bounced);
        assert_eq!(
            from_dns(&DnsFailure::Temporary("SERVFAIL".into())).verdict,
            Verdict::Deferred
        );
        assert_eq!(expired("451 4.7.1 later").verdict, Verdict::Expired);
    }

    #[test]
    fn rules_refine_the_verdict() {
        let rules = rules::Rules::builtin();
        let o = classify(
            from_reply(&reply(
                550,
                Some(EnhancedCode(5, 1, 1)),
                "no such user",
                Command::Rcpt,
            )),
            &rules,
        );
        let c = o.class.unwrap();
        assert_eq!(
            (o.verdict, c.category, c.suppress),
            (Verdict::Bounced, rules::Category::BadMailbox, true)
        );
        // A full mailbox is retried even when the server says 552.
        let o = classify(
            from_reply(&reply(
                552,
                Some(EnhancedCode(5, 2, 2)),
                "mailbox full",
                Command::Rcpt,
            )),
            &rules,
        );
        assert_eq!(o.verdict, Verdict::Deferred);
        assert_eq!(o.class.unwrap().category, rules::Category::QuotaIssues);
        // 4xx stays deferred whatever the text says.
        let o = classify(
            from_reply(&reply(450, None, "user unknown", Command::Rcpt)),
            &rules,
        );
        assert_eq!(
            (o.verdict, o.class.unwrap().category),
            (Verdict::Deferred, rules::Category::BadMailbox)
        );
        let o = classify(from_dns(&DnsFailure::NxDomain), &rules);
        assert_eq!(
            (o.verdict, o.class.unwrap().category),
            (Verdict::Bounced, rules::Category::BadDomain)
        );
        let o = classify(expired(""), &rules);
        assert_eq!(o.class.unwrap().category, rules::Category::MessageExpired);
        assert!(
            classify(from_reply(&reply(250, None, "ok", Command::Dot)), &rules)
                .class
                .is_none()
        );
    }
}
