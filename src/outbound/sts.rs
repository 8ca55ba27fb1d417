//! MTA-STS (RFC 8461), the pure part: the `_mta-sts` TXT record, the policy file, and whether
//! an MX host matches a policy. Fetching and caching live with delivery; nothing here does I/O.

use serde::{Deserialize, Serialize};

/// The largest policy file read; a longer response is refused (policies are a few hundred
/// bytes; RFC 8461 §3.3 lets senders limit it).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// RFC 8461 §3.2: `max_age` is at most 31557600 seconds (about a year).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    #[error("no TXT record starts with v=STSv1")]
    NoRecord,
    #[error("{0} TXT records start with v=STSv1; exactly one may")]
    SeveralRecords(usize),
    #[error("the TXT record has no valid id (1 to 32 letters and digits)")]
    BadId,
    #[error("the TXT record is malformed: {0}")]
    BadRecord(String),
    #[error("the policy is malformed: {0}")]
    BadPolicy(String),
}

/// What the `_mta-sts.<domain>` TXT record says: the current policy's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: String,
}

/// Reads the `_mta-sts` TXT answer: each record's strings already joined. Records that do not
/// start with `v=STSv1;` are ignored; more or fewer than one that does means no policy
/// (RFC 8461 §3.1).
pub fn parse_record<S: AsRef<str>>(records: &[S]) -> Result<Record, StsError> {
    let ours: Vec<&str> = records
        .iter()
        .map(AsRef::as_ref)
        .filter(|r| r.starts_with("v=STSv1;") || *r == "v=STSv1")
        .collect();
    let record = match ours.as_slice() {
        [] => return Err(StsError::NoRecord),
        [one] => *one,
        many => return Err(StsError::SeveralRecords(many.len())),
    };
    let mut id = None;
    for (i, field) in record.split(';').enumerate() {
        let field = field.trim_matches([' ', '\t']);
        if field.is_empty() {
            continue;
        }
        let Some((key, value)) = field.split_once('=') else {
            return Err(StsError::BadRecord(format!("{field:?} is not key=value")));
        };
        match (i, key) {
            (0, "v") => {}
            (_, "id") if id.is_none() => {
                if value.is_empty()
                    || value.len() > 32
                    || !value.bytes().all(|b| b.is_ascii_alphanumeric())
                {
                    return Err(StsError::BadId);
                }
                id = Some(value.to_owned());
            }
            // Extension fields are ignored (RFC 8461 §3.1), as long as they are well formed.
            (_, k)
                if !k.is_empty()
                    && k.len() <= 32
                    && k.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.'
                    }) => {}
            _ => {
                return Err(StsError::BadRecord(format!("{key:?} is not a field name")));
            }
        }
    }
    id.map(|id| Record { id }).ok_or(StsError::BadId)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only matching MX hosts, only over TLS with a valid certificate.
    Enforce,
    /// Deliver as without a policy, but report what enforcing would have refused.
    Testing,
    /// The domain withdrew its policy.
    None,
}

/// A policy file (RFC 8461 §3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub mode: Mode,
    /// MX patterns: a host name, or `*.` and a domain for any one label in front of it.
    pub mx: Vec<String>,
    /// How long the policy may be cached, in seconds.
    pub max_age: u64,
}

/// Parses a policy file (lines `key: value`, CRLF or LF). Unknown keys are ignored; `version`,
/// `mode` and `max_age` are required, and at least one `mx` unless the mode is `none`.
pub fn parse_policy(text: &[u8]) -> Result<Policy, StsError> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(StsError::BadPolicy(format!(
            "longer than {MAX_POLICY_BYTES} bytes"
        )));
    }
    let text =
        std::str::from_utf8(text).map_err(|_| StsError::BadPolicy("not UTF-8 text".into()))?;
    let bad = |m: String| Err(StsError::BadPolicy(m));
    let (mut version, mut mode, mut max_age) = (None, None, None);
    let mut mx = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return bad(format!("line {line:?} is not key: value"));
        };
        let value = value.trim_matches([' ', '\t']);
        match key {
            "version" if version.is_none() => version = Some(value),
            "mode" if mode.is_none() => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return bad(format!("mode {other:?} is not enforce, testing or none")),
                })
            }
            "max_age" if max_age.is_none() => {
                if value.is_empty()
                    || value.len() > 10
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return bad(format!("max_age {value:?} is not a number of seconds"));
                }
                let n: u64 = value
                    .parse()
                    .map_err(|_| StsError::BadPolicy(format!("max_age {value:?}")))?;
                max_age = Some(n.min(MAX_AGE_LIMIT));
            }
            "mx" => {
                if !valid_pattern(value) {
                    return bad(format!("mx {value:?} is not a host name or *.domain"));
                }
                mx.push(value.trim_end_matches('.').to_ascii_lowercase());
            }
            _ => {}
        }
    }
    match version {
        Some("STSv1") => {}
        Some(v) => return bad(format!("version {v:?} is not STSv1")),
        None => return bad("no version".into()),
    }
    let Some(mode) = mode else {
        return bad("no mode".into());
    };
    let Some(max_age) = max_age else {
        return bad("no max_age".into());
    };
    if mx.is_empty() && mode != Mode::None {
        return bad("no mx pattern".into());
    }
    Ok(Policy { mode, mx, max_age })
}

/// A host name of letters, digits, hyphens and dots, optionally led by `*.`.
fn valid_pattern(p: &str) -> bool {
    let name = p.strip_prefix("*.").unwrap_or(p).trim_end_matches('.');
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl Policy {
    /// Whether MX host `host` matches one of the patterns (RFC 8461 §4.1): equal, ignoring case
    /// and a trailing dot, or `*.d` with exactly one label in front of `d`.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(domain) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == domain),
            None => *p == host,
        })
    }

    /// The policy as lines of its file (TLS reports quote it).
    pub fn lines(&self) -> Vec<String> {
        let mode = match self.mode {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        };
        let mut lines = vec!["version: STSv1".to_owned(), format!("mode: {mode}")];
        lines.extend(self.mx.iter().map(|m| format!("mx: {m}")));
        lines.push(format!("max_age: {}", self.max_age));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_txt_record_gives_the_policy_id() {
        assert_eq!(
            parse_record(&["v=STSv1; id=20160831085700Z;"]),
            Ok(Record {
                id: "20160831085700Z".into()
            })
        );
        assert_eq!(
            parse_record(&["google-site-verification=x", "v=STSv1;id=abc ; ext_1=y"]).map(|r| r.id),
            Ok("abc".into())
        );
        assert_eq!(parse_record(&["v=spf1 -all"]), Err(StsError::NoRecord));
        assert_eq!(
            parse_record(&["v=STSv1; id=a", "v=STSv1; id=b"]),
            Err(StsError::SeveralRecords(2))
        );
        for bad_id in [
            "v=STSv1;",
            "v=STSv1; id=",
            "v=STSv1; id=has-dash",
            "v=STSv1; id=123456789012345678901234567890123",
        ] {
            assert_eq!(parse_record(&[bad_id]), Err(StsError::BadId), "{bad_id}");
        }
        assert!(matches!(
            parse_record(&["v=STSv1; id=a; novalue"]),
            Err(StsError::BadRecord(_))
        ));
        assert!(matches!(
            parse_record(&["v=STSv1; id=a; bad key=1"]),
            Err(StsError::BadRecord(_))
        ));
    }

    #[test]
    fn a_policy_file_is_read() {
        let p = parse_policy(
            b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET.\r\nmax_age: 604800\r\nextension: ignored\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, ["mail.example.com", "*.example.net"]);
        assert_eq!(p.max_age, 604_800);
        // LF only, no final line break, a `none` policy without mx.
        let p = parse_policy(b"version: STSv1\nmode: none\nmax_age: 99999999999").unwrap_err();
        assert!(matches!(p, StsError::BadPolicy(m) if m.contains("max_age")));
        let p = parse_policy(b"version: STSv1\nmode: none\nmax_age: 9999999999").unwrap();
        assert_eq!((p.mode, p.max_age), (Mode::None, MAX_AGE_LIMIT));
    }

    #[test]
    fn bad_policies_say_what_is_wrong() {
        for (text, what) in [
            (
                &b"mode: enforce\nmx: a.example\nmax_age: 1"[..],
                "no version",
            ),
            (
                b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1",
                "STSv1",
            ),
            (
                b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1",
                "mode",
            ),
            (b"version: STSv1\nmode: enforce\nmax_age: 1", "no mx"),
            (
                b"version: STSv1\nmode: testing\nmx: a.example",
                "no max_age",
            ),
            (
                b"version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1",
                "mx",
            ),
            (
                b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1",
                "max_age",
            ),
            (b"<html>not a policy</html>", "key: value"),
            (b"version: STSv1\xff", "UTF-8"),
        ] {
            match parse_policy(text) {
                Err(StsError::BadPolicy(m)) => assert!(m.contains(what), "{what}: {m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        let huge = vec![b'x'; MAX_POLICY_BYTES + 1];
        assert!(matches!(parse_policy(&huge), Err(StsError::BadPolicy(m)) if m.contains("longer")));
    }

    #[test]
    fn mx_hosts_match_names_and_one_label_wildcards() {
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec!["mail.example.com".into(), "*.example.net".into()],
            max_age: 1,
        };
        for yes in ["mail.example.com", "MAIL.example.com.", "mx1.example.net"] {
            assert!(p.matches(yes), "{yes}");
        }
        for no in [
            "example.net",
            "a.b.example.net",
            "mail.example.com.evil.test",
            "xmail.example.com",
            ".example.net",
        ] {
            assert!(!p.matches(no), "{no}");
        }
    }
}
