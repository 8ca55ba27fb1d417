//! Bounce classification rules: enhanced status code and reply-text patterns → category → what
//! the category does (hard or soft, suppress or not). The rules live in a TOML file; the default
//! one is `config/bounce-rules.toml`, compiled in. Pure code: loading reads the file, nothing else
//! does I/O.

use std::path::Path;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, ConfigErrors};
use crate::outbound::smtp::reply::EnhancedCode;

/// The rules shipped with Sluice, used when `[bounce] rules` is not set.
pub const BUILTIN: &str = include_str!("../../../config/bounce-rules.toml");

/// Bounce categories, as the industry (PowerMTA, KumoMTA) names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    BadMailbox,
    BadDomain,
    InactiveMailbox,
    QuotaIssues,
    PolicyRelated,
    SpamRelated,
    ContentRelated,
    RoutingErrors,
    BadConnection,
    NoAnswerFromHost,
    ProtocolErrors,
    MessageExpired,
    Other,
}

impl Category {
    pub const ALL: [Category; 13] = [
        Category::BadMailbox,
        Category::BadDomain,
        Category::InactiveMailbox,
        Category::QuotaIssues,
        Category::PolicyRelated,
        Category::SpamRelated,
        Category::ContentRelated,
        Category::RoutingErrors,
        Category::BadConnection,
        Category::NoAnswerFromHost,
        Category::ProtocolErrors,
        Category::MessageExpired,
        Category::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::BadMailbox => "bad-mailbox",
            Category::BadDomain => "bad-domain",
            Category::InactiveMailbox => "inactive-mailbox",
            Category::QuotaIssues => "quota-issues",
            Category::PolicyRelated => "policy-related",
            Category::SpamRelated => "spam-related",
            Category::ContentRelated => "content-related",
            Category::RoutingErrors => "routing-errors",
            Category::BadConnection => "bad-connection",
            Category::NoAnswerFromHost => "no-answer-from-host",
            Category::ProtocolErrors => "protocol-errors",
            Category::MessageExpired => "message-expired",
            Category::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a permanent failure of the category ends delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A 5xx bounces the recipient.
    Hard,
    /// Retried on the retry schedule even after a 5xx: the failure is about the sender, the
    /// content or the moment, and may clear.
    Soft,
}

/// The verdict of the rules on one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    pub category: Category,
    pub kind: Kind,
    /// A hard bounce of this category suppresses the address.
    pub suppress: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct Policy {
    kind: Kind,
    #[serde(default)]
    suppress: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    categories: std::collections::HashMap<String, Policy>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    category: String,
    /// Documentation only: whose replies the rule is for.
    #[serde(default)]
    #[allow(dead_code)]
    provider: Option<String>,
    #[serde(default)]
    status: Vec<String>,
    #[serde(default)]
    code: Vec<u16>,
    #[serde(default)]
    text: Vec<String>,
}

/// `5.1.1`, `*.1.1`, `5.7.*`, `*.4.*`: `None` matches anything in that position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatusPattern(Option<u8>, Option<u16>, Option<u16>);

impl StatusPattern {
    pub(crate) fn parse(s: &str) -> Option<StatusPattern> {
        let mut it = s.split('.');
        let (a, b, c) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() {
            return None;
        }
        let class = match a {
            "*" => None,
            "2" | "4" | "5" => Some(a.parse().ok()?),
            _ => return None,
        };
        let num = |p: &str| -> Option<Option<u16>> {
            if p == "*" {
                Some(None)
            } else if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) {
                Some(Some(p.parse().ok()?))
            } else {
                None
            }
        };
        Some(StatusPattern(class, num(b)?, num(c)?))
    }

    pub(crate) fn matches(&self, s: EnhancedCode) -> bool {
        self.0.is_none_or(|c| c == s.0)
            && self.1.is_none_or(|v| v == s.1)
            && self.2.is_none_or(|v| v == s.2)
    }
}

struct Rule {
    category: Category,
    status: Vec<StatusPattern>,
    code: Vec<u16>,
    /// The rule's `text` patterns joined into one alternation.
    text: Option<Regex>,
}

/// A loaded rules file.
pub struct Rules {
    rules: Vec<Rule>,
    policy: [Policy; Category::ALL.len()],
}

impl Rules {
    /// The compiled-in rules.
    pub fn builtin() -> Rules {
        Rules::parse("config/bounce-rules.toml", BUILTIN)
            .expect("the built-in rules are checked by a unit test")
    }

    /// `path`'s rules, or the built-in ones when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Rules, ConfigErrors> {
        let Some(path) = path else {
            return Ok(Rules::builtin());
        };
        let (file, text) = crate::config::read_file(path)?;
        Rules::parse(&file, &text)
    }

    /// Parses and checks rules text; `file` labels errors, which name the key at fault.
    pub fn parse(file: &str, text: &str) -> Result<Rules, ConfigErrors> {
        let err = |key: String, reason: String| ConfigError {
            file: file.to_owned(),
            key,
            reason,
        };
        let parsed: RulesFile = parse_toml(file, text)?;
        let mut errors = Vec::new();
        let mut policy = [Policy {
            kind: Kind::Hard,
            suppress: false,
        }; Category::ALL.len()];
        for (name, p) in &parsed.categories {
            match Category::parse(name) {
                Some(c) => policy[c as usize] = *p,
                None => errors.push(err(
                    format!("categories.{name}"),
                    format!("unknown category; known: {}", known_categories()),
                )),
            }
        }
        for c in Category::ALL {
            if !parsed.categories.contains_key(c.as_str()) {
                errors.push(err(
                    format!("categories.{c}"),
                    "missing: every category needs a kind".into(),
                ));
            }
        }
        let mut rules = Vec::with_capacity(parsed.rules.len());
        for (i, r) in parsed.rules.iter().enumerate() {
            let Some(category) = Category::parse(&r.category) else {
                errors.push(err(
                    format!("rule[{i}].category"),
                    format!(
                        "unknown category {:?}; known: {}",
                        r.category,
                        known_categories()
                    ),
                ));
                continue;
            };
            let key = format!("rule[{i}]");
            let status = status_patterns(&r.status, file, &key, &mut errors);
            for (j, c) in r.code.iter().enumerate() {
                if !(200..600).contains(c) {
                    errors.push(err(
                        format!("rule[{i}].code[{j}]"),
                        format!("{c} is not an SMTP reply code"),
                    ));
                }
            }
            let text = text_patterns(&r.text, file, &key, &mut errors);
            if r.status.is_empty() && r.code.is_empty() && r.text.is_empty() {
                errors.push(err(
                    key,
                    "a rule needs at least one of status, code or text".into(),
                ));
            }
            rules.push(Rule {
                category,
                status,
                code: r.code.clone(),
                text,
            });
        }
        if errors.is_empty() {
            Ok(Rules { rules, policy })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The category of a failure and what it does.
    pub fn classify(&self, status: EnhancedCode, code: Option<u16>, text: &str) -> Classification {
        let category = self
            .rules
            .iter()
            .find(|r| {
                (r.status.is_empty() || r.status.iter().any(|p| p.matches(status)))
                    && (r.code.is_empty() || code.is_some_and(|c| r.code.contains(&c)))
                    && r.text.as_ref().is_none_or(|t| t.is_match(text))
            })
            .map_or(Category::Other, |r| r.category);
        self.of(category)
    }

    /// What `category` does under these rules.
    pub fn of(&self, category: Category) -> Classification {
        let p = self.policy[category as usize];
        Classification {
            category,
            kind: p.kind,
            suppress: p.suppress,
        }
    }
}

/// Reads a rules file's TOML into `T`; an error names `file` and the key at fault.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
) -> Result<T, ConfigErrors> {
    let err = |key: String, reason: String| {
        ConfigErrors(vec![ConfigError {
            file: file.to_owned(),
            key,
            reason,
        }])
    };
    let de = toml::Deserializer::parse(text).map_err(|e| err("(syntax)".into(), e.to_string()))?;
    serde_path_to_error::deserialize(de)
        .map_err(|e| err(e.path().to_string(), e.into_inner().to_string()))
}

/// A rule's `status` patterns; one that does not parse is an error at `{key}.status[j]`.
pub(crate) fn status_patterns(
    list: &[String],
    file: &str,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<StatusPattern> {
    let mut out = Vec::with_capacity(list.len());
    for (j, s) in list.iter().enumerate() {
        match StatusPattern::parse(s) {
            Some(p) => out.push(p),
            None => errors.push(ConfigError {
                file: file.to_owned(),
                key: format!("{key}.status[{j}]"),
                reason: format!(
                    "{s:?} is not a status pattern like \"5.1.1\", \"*.1.1\" or \"4.7.*\""
                ),
            }),
        }
    }
    out
}

/// A rule's `text` patterns as one case-insensitive alternation (`None` without any); one that
/// does not compile is an error at `{key}.text[j]`.
pub(crate) fn text_patterns(
    texts: &[String],
    file: &str,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Regex> {
    for (j, t) in texts.iter().enumerate() {
        if let Err(e) = Regex::new(t) {
            errors.push(ConfigError {
                file: file.to_owned(),
                key: format!("{key}.text[{j}]"),
                reason: e.to_string(),
            });
        }
    }
    if texts.is_empty() {
        return None;
    }
    let joined = texts
        .iter()
        .map(|t| format!("(?:{t})"))
        .collect::<Vec<_>>()
        .join("|");
    RegexBuilder::new(&joined)
        .case_insensitive(true)
        .build()
        .ok()
}

fn known_categories() -> String {
    Category::ALL.map(Category::as_str).join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: &str) -> EnhancedCode {
        let mut it = s.split('.').map(|p| p.parse::<u16>().unwrap());
        EnhancedCode(
            it.next().unwrap() as u8,
            it.next().unwrap(),
            it.next().unwrap(),
        )
    }

    #[derive(Deserialize)]
    struct Sample {
        provider: String,
        reply: String,
        category: String,
    }

    #[derive(Deserialize)]
    struct Samples {
        sample: Vec<Sample>,
    }

    /// Splits `550 5.1.1 text` (or `550-5.1.1 text` lines) into code, status and text, as the
    /// SMTP client's reply parser does.
    fn split(reply: &str) -> (u16, EnhancedCode, String) {
        let mut code = 0;
        let mut enhanced = None;
        let mut lines = Vec::new();
        for line in reply.lines() {
            code = line[..3].parse().unwrap();
            let rest = line[4..].trim_start();
            match crate::outbound::smtp::reply::EnhancedCode::parse_prefix(rest) {
                Some((e, t)) => {
                    enhanced.get_or_insert(e);
                    lines.push(t.to_owned());
                }
                None => lines.push(rest.to_owned()),
            }
        }
        let class = (code / 100) as u8;
        (
            code,
            enhanced.unwrap_or(EnhancedCode(class, 0, 0)),
            lines.join(" "),
        )
    }

    #[test]
    fn provider_replies_get_their_category() {
        let rules = Rules::builtin();
        let samples: Samples =
            toml::from_str(include_str!("../../../tests/data/provider-replies.toml")).unwrap();
        let mut wrong = Vec::new();
        for s in &samples.sample {
            let (code, st, text) = split(&s.reply);
            let got = rules.classify(st, Some(code), &text).category;
            if got.as_str() != s.category {
                wrong.push(format!(
                    "{}: {:?} → {got}, expected {}",
                    s.provider, s.reply, s.category
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        for p in [
            "gmail", "yahoo", "outlook", "icloud", "gmx", "web.de", "mail.ru", "yandex",
        ] {
            assert!(
                samples.sample.iter().any(|s| s.provider == p),
                "no sample for {p}"
            );
        }
    }

    #[test]
    fn categories_decide_hard_soft_and_suppression() {
        let r = Rules::builtin();
        let c = r.classify(status("5.1.1"), Some(550), "");
        assert_eq!(
            (c.category, c.kind, c.suppress),
            (Category::BadMailbox, Kind::Hard, true)
        );
        let c = r.classify(status("5.2.2"), Some(552), "");
        assert_eq!((c.category, c.kind), (Category::QuotaIssues, Kind::Soft));
        let c = r.classify(status("5.7.1"), Some(550), "go away");
        assert_eq!((c.category, c.kind), (Category::PolicyRelated, Kind::Soft));
        let c = r.classify(status("5.0.0"), Some(554), "transaction failed");
        assert_eq!(
            (c.category, c.kind, c.suppress),
            (Category::Other, Kind::Hard, false)
        );
        assert_eq!(
            r.classify(status("4.4.1"), None, "").category,
            Category::NoAnswerFromHost
        );
    }

    #[test]
    fn bad_rules_files_name_the_key() {
        let base = BUILTIN.split("[[rule]]").next().unwrap();
        let e = Rules::parse(
            "r.toml",
            &format!(
                "{base}[[rule]]\ncategory = \"nope\"\ntext = [\"x\"]\n\
                 [[rule]]\ncategory = \"other\"\nstatus = [\"5.x.1\"]\ntext = [\"(\"]\n\
                 [[rule]]\ncategory = \"other\"\n"
            ),
        )
        .err()
        .unwrap()
        .to_string();
        for key in [
            "r.toml: rule[0].category",
            "rule[1].status[0]",
            "rule[1].text[0]",
            "rule[2]",
        ] {
            assert!(e.contains(key), "{key} missing in {e}");
        }
        let e = Rules::parse(
            "r.toml",
            "[categories]\nbad-mailbox = { kind = \"hard\" }\n",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("categories.other"), "{e}");
        assert!(
            Rules::parse("r.toml", "[categories]\nx = { kind = \"maybe\" }\n").is_err(),
            "unknown kind"
        );
    }
}
