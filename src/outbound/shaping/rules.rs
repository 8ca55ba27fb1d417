//! The shaping rules file: provider groups, the replies that suspend or throttle a (source,
//! site), and the AIMD settings for throttling replies no rule names. The default file is
//! `config/shaping.toml`, compiled in; `delivery.shaping_rules` replaces it. Pure code: loading
//! reads the file, nothing else does I/O.

use std::path::Path;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use crate::config::{ConfigError, ConfigErrors, Rate};
use crate::outbound::outcome::rules::{StatusPattern, parse_toml, status_patterns, text_patterns};
use crate::outbound::smtp::reply::EnhancedCode;

/// The rules shipped with Sluice, used when `delivery.shaping_rules` is not set.
pub const BUILTIN: &str = include_str!("../../../config/shaping.toml");

/// What a matching reply does to the (source, site) that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing is sent from the source to the site until the action expires; the source's
    /// share goes to the other sources of its pools.
    Suspend,
    /// The source sends to the site no faster than `message_rate` and over at most
    /// `max_connections` connections until the action expires.
    Throttle {
        message_rate: Option<Rate>,
        max_connections: Option<u32>,
    },
    /// Nothing, not even AIMD: for a temporary failure that is not a throttle.
    Ignore,
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Suspend => "suspend",
            Action::Throttle { .. } => "throttle",
            Action::Ignore => "ignore",
        }
    }
}

/// A rule: the replies it matches and what it does, for how long.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    /// Only replies from sites of this provider group; `None`: any site.
    pub provider: Option<String>,
    status: Vec<StatusPattern>,
    code: Vec<u16>,
    text: Option<Regex>,
    pub action: Action,
    pub duration: Duration,
}

impl Rule {
    fn matches(&self, code: Option<u16>, status: EnhancedCode, text: &str) -> bool {
        (self.status.is_empty() || self.status.iter().any(|p| p.matches(status)))
            && (self.code.is_empty() || code.is_some_and(|c| self.code.contains(&c)))
            && self.text.as_ref().is_none_or(|t| t.is_match(text))
    }
}

/// Additive increase, multiplicative decrease of a (source, site)'s message rate and
/// connections when a provider answers with a throttling reply that no rule names.
#[derive(Debug)]
pub struct Aimd {
    pub enabled: bool,
    /// The factor a throttling reply applies to the rate and the connection count.
    pub decrease: f64,
    /// A stretch this long without a throttling reply adds one step.
    pub interval: Duration,
    /// A step: this fraction of the rate set by the last decrease.
    pub step: f64,
    /// The rate never goes below this (messages per second).
    pub min_rate: f64,
    code: Vec<u16>,
    text: Option<Regex>,
}

impl Aimd {
    /// Whether a reply is a throttling one: a temporary failure with one of the configured
    /// codes, or whose text matches a configured pattern and that is not about one recipient
    /// (`per_recipient`: a reply to RCPT, which a mailbox's own limits or greylisting give).
    pub fn is_throttling(
        &self,
        code: Option<u16>,
        status: EnhancedCode,
        text: &str,
        per_recipient: bool,
    ) -> bool {
        let temporary = code.map_or(status.0 == 4, |c| c / 100 == 4);
        self.enabled
            && temporary
            && (code.is_some_and(|c| self.code.contains(&c))
                || (!per_recipient && self.text.as_ref().is_some_and(|t| t.is_match(text))))
    }
}

/// A provider group: the names (domains or MX hosts) of its sites.
#[derive(Debug)]
struct Provider {
    name: String,
    patterns: Vec<String>,
}

/// A loaded shaping rules file.
#[derive(Debug)]
pub struct ShapingRules {
    providers: Vec<Provider>,
    rules: Vec<Rule>,
    pub aimd: Aimd,
}

/// What the rules say about one reply.
#[derive(Debug, Clone, Copy)]
pub enum Reaction<'r> {
    Rule(&'r Rule),
    Aimd,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    aimd: Option<AimdEntry>,
    #[serde(default, rename = "provider")]
    providers: Vec<ProviderEntry>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AimdEntry {
    #[serde(default = "yes")]
    enabled: bool,
    decrease: f64,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    step: f64,
    min_rate: Rate,
    #[serde(default)]
    code: Vec<u16>,
    #[serde(default)]
    text: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderEntry {
    name: String,
    #[serde(rename = "match")]
    patterns: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    name: String,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    status: Vec<String>,
    #[serde(default)]
    code: Vec<u16>,
    #[serde(default)]
    text: Vec<String>,
    action: String,
    #[serde(default, with = "humantime_serde")]
    duration: Option<Duration>,
    #[serde(default)]
    message_rate: Option<Rate>,
    #[serde(default)]
    max_connections: Option<u32>,
}

/// Longest action a rule may set.
const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);

impl ShapingRules {
    /// The compiled-in rules.
    pub fn builtin() -> ShapingRules {
        ShapingRules::parse("config/shaping.toml", BUILTIN)
            .expect("the built-in shaping rules are checked by a unit test")
    }

    /// `path`'s rules, or the built-in ones when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<ShapingRules, ConfigErrors> {
        let Some(path) = path else {
            return Ok(ShapingRules::builtin());
        };
        let (file, text) = crate::config::read_file(path)?;
        ShapingRules::parse(&file, &text)
    }

    /// Parses and checks rules text; `file` labels errors, which name the rule and field.
    pub fn parse(file: &str, text: &str) -> Result<ShapingRules, ConfigErrors> {
        let err = |key: String, reason: String| ConfigError {
            file: file.to_owned(),
            key,
            reason,
        };
        let parsed: File = parse_toml(file, text)?;
        let mut errors = Vec::new();
        let mut providers = Vec::new();
        for (i, p) in parsed.providers.iter().enumerate() {
            if providers.iter().any(|q: &Provider| q.name == p.name) {
                errors.push(err(
                    format!("provider[{i}].name"),
                    format!("{:?} is named twice", p.name),
                ));
            }
            for (j, pat) in p.patterns.iter().enumerate() {
                let bare = pat.strip_prefix("*.").unwrap_or(pat);
                if bare.is_empty() || bare.contains('*') || bare.contains(char::is_whitespace) {
                    errors.push(err(
                        format!("provider[{i}].match[{j}]"),
                        format!("{pat:?} is not a name like \"gmail.com\" or \"*.google.com\""),
                    ));
                }
            }
            providers.push(Provider {
                name: p.name.clone(),
                patterns: p.patterns.clone(),
            });
        }
        let mut rules = Vec::new();
        for (i, r) in parsed.rules.iter().enumerate() {
            let key = format!("rule[{i}]");
            if let Some(p) = &r.provider
                && !providers.iter().any(|q| &q.name == p)
            {
                errors.push(err(
                    format!("{key}.provider"),
                    format!("no [[provider]] is named {p:?}"),
                ));
            }
            let status = status_patterns(&r.status, file, &key, &mut errors);
            for (j, c) in r.code.iter().enumerate() {
                if !(400..600).contains(c) {
                    errors.push(err(
                        format!("{key}.code[{j}]"),
                        format!("{c} is not a failure reply code (400–599)"),
                    ));
                }
            }
            let text = text_patterns(&r.text, file, &key, &mut errors);
            if r.status.is_empty() && r.code.is_empty() && r.text.is_empty() {
                errors.push(err(
                    key.clone(),
                    "a rule needs at least one of status, code or text".into(),
                ));
            }
            let duration = r.duration.unwrap_or_default();
            match (r.action.as_str(), r.duration) {
                ("ignore", Some(_)) => errors.push(err(
                    format!("{key}.duration"),
                    "ignore takes no duration".into(),
                )),
                ("ignore", None) => {}
                (_, None) => errors.push(err(
                    format!("{key}.duration"),
                    "missing: how long the action lasts, e.g. \"1h\"".into(),
                )),
                (_, Some(d)) if d.is_zero() || d > MAX_DURATION => errors.push(err(
                    format!("{key}.duration"),
                    "must be more than 0 and at most 7 days".into(),
                )),
                _ => {}
            }
            let action = match r.action.as_str() {
                "ignore" => Action::Ignore,
                "suspend" => {
                    if r.message_rate.is_some() || r.max_connections.is_some() {
                        errors.push(err(
                            format!("{key}.action"),
                            "suspend takes no message_rate or max_connections".into(),
                        ));
                    }
                    Action::Suspend
                }
                "throttle" => {
                    if r.message_rate.is_none() && r.max_connections.is_none() {
                        errors.push(err(
                            format!("{key}.action"),
                            "throttle needs message_rate, max_connections or both".into(),
                        ));
                    }
                    if r.max_connections == Some(0) {
                        errors.push(err(
                            format!("{key}.max_connections"),
                            "must be at least 1 (suspend stops sending)".into(),
                        ));
                    }
                    Action::Throttle {
                        message_rate: r.message_rate,
                        max_connections: r.max_connections,
                    }
                }
                other => {
                    errors.push(err(
                        format!("{key}.action"),
                        format!("{other:?} is not an action; known: suspend, throttle, ignore"),
                    ));
                    Action::Suspend
                }
            };
            if rules.iter().any(|q: &Rule| q.name == r.name) {
                errors.push(err(
                    format!("{key}.name"),
                    format!("{:?} is named twice", r.name),
                ));
            }
            rules.push(Rule {
                name: r.name.clone(),
                provider: r.provider.clone(),
                status,
                code: r.code.clone(),
                text,
                action,
                duration,
            });
        }
        let aimd = match &parsed.aimd {
            None => Aimd {
                enabled: false,
                decrease: 0.5,
                interval: Duration::from_secs(30),
                step: 0.1,
                min_rate: 1.0 / 60.0,
                code: Vec::new(),
                text: None,
            },
            Some(a) => {
                if !(a.decrease > 0.0 && a.decrease < 1.0) {
                    errors.push(err(
                        "aimd.decrease".into(),
                        "must be between 0 and 1 (exclusive)".into(),
                    ));
                }
                if !(a.step > 0.0 && a.step <= 1.0) {
                    errors.push(err(
                        "aimd.step".into(),
                        "must be more than 0 and at most 1".into(),
                    ));
                }
                if a.interval < Duration::from_millis(100) {
                    errors.push(err("aimd.interval".into(), "must be at least 100ms".into()));
                }
                for (j, c) in a.code.iter().enumerate() {
                    if !(400..500).contains(c) {
                        errors.push(err(
                            format!("aimd.code[{j}]"),
                            format!("{c} is not a temporary failure code (400–499)"),
                        ));
                    }
                }
                Aimd {
                    enabled: a.enabled,
                    decrease: a.decrease,
                    interval: a.interval,
                    step: a.step,
                    min_rate: a.min_rate.per_second(),
                    code: a.code.clone(),
                    text: text_patterns(&a.text, file, "aimd", &mut errors),
                }
            }
        };
        if errors.is_empty() {
            Ok(ShapingRules {
                providers,
                rules,
                aimd,
            })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The provider group of a site whose names (its domain, its MX hosts) are `names`: the
    /// first provider with a pattern matching one of them.
    pub fn provider_of<'a>(&self, names: impl Iterator<Item = &'a str> + Clone) -> Option<&str> {
        self.providers
            .iter()
            .find(|p| {
                names.clone().any(|n| {
                    p.patterns
                        .iter()
                        .any(|pat| crate::config::name_matches(pat, n))
                })
            })
            .map(|p| p.name.as_str())
    }

    /// What a failure reply from a site of `provider` does: the first rule (of the provider, or
    /// of any provider) matching it, else AIMD if it is a throttling reply, else nothing.
    /// `per_recipient`: the reply answered RCPT.
    pub fn reaction(
        &self,
        provider: Option<&str>,
        code: Option<u16>,
        status: EnhancedCode,
        text: &str,
        per_recipient: bool,
    ) -> Option<Reaction<'_>> {
        if let Some(rule) = self.rules.iter().find(|r| {
            r.provider.as_deref().is_none_or(|p| Some(p) == provider)
                && r.matches(code, status, text)
        }) {
            return Some(Reaction::Rule(rule));
        }
        self.aimd
            .is_throttling(code, status, text, per_recipient)
            .then_some(Reaction::Aimd)
    }

    /// Provider group names, in file order.
    pub fn provider_names(&self) -> impl Iterator<Item = &str> {
        self.providers.iter().map(|p| p.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Sample {
        provider: String,
        reply: String,
        #[serde(default)]
        shaping: Option<String>,
    }

    #[derive(Deserialize)]
    struct Samples {
        sample: Vec<Sample>,
    }

    /// `421 4.7.0 text` (or multi-line) into code, status and text, as the reply parser does.
    fn split(reply: &str) -> (u16, EnhancedCode, String) {
        let mut code = 0;
        let mut enhanced = None;
        let mut lines = Vec::new();
        for line in reply.lines() {
            code = line[..3].parse().unwrap();
            let rest = line[4..].trim_start();
            match EnhancedCode::parse_prefix(rest) {
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

    /// The provider group names of the samples file, as the shipped rules name them.
    fn group(sample_provider: &str) -> &str {
        match sample_provider {
            "outlook" => "microsoft",
            "web.de" => "gmx",
            p => p,
        }
    }

    #[test]
    fn provider_replies_get_their_shaping_action() {
        let rules = ShapingRules::builtin();
        let samples: Samples =
            toml::from_str(include_str!("../../../tests/data/provider-replies.toml")).unwrap();
        let mut wrong = Vec::new();
        for s in &samples.sample {
            let (code, st, text) = split(&s.reply);
            let got = match rules.reaction(Some(group(&s.provider)), Some(code), st, &text, false) {
                Some(Reaction::Rule(r)) if r.action == Action::Ignore => None,
                Some(Reaction::Rule(r)) => Some(r.action.kind().to_owned()),
                Some(Reaction::Aimd) => Some("aimd".to_owned()),
                None => None,
            };
            if got != s.shaping {
                wrong.push(format!(
                    "{}: {:?} → {got:?}, expected {:?}",
                    s.provider, s.reply, s.shaping
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        for p in [
            "gmail",
            "yahoo",
            "microsoft",
            "icloud",
            "gmx",
            "mail.ru",
            "yandex",
            "comcast",
        ] {
            assert!(
                rules.provider_names().any(|n| n == p),
                "no [[provider]] {p} in config/shaping.toml"
            );
            assert!(
                samples
                    .sample
                    .iter()
                    .any(|s| group(&s.provider) == p && s.shaping.is_some()),
                "no sample reply with a shaping action for {p}"
            );
        }
    }

    #[test]
    fn providers_are_found_by_domain_or_mx_host() {
        let rules = ShapingRules::builtin();
        let of = |names: &[&str]| rules.provider_of(names.iter().copied()).map(str::to_owned);
        assert_eq!(
            of(&["gmail-smtp-in.l.google.com"]).as_deref(),
            Some("gmail")
        );
        assert_eq!(of(&["mta5.am0.yahoodns.net"]).as_deref(), Some("yahoo"));
        assert_eq!(
            of(&["hotmail-com.olc.protection.outlook.com"]).as_deref(),
            Some("microsoft")
        );
        assert_eq!(of(&["mx01.mail.icloud.com"]).as_deref(), Some("icloud"));
        assert_eq!(of(&["mx00.emig.gmx.net"]).as_deref(), Some("gmx"));
        assert_eq!(of(&["mx-ha03.web.de"]).as_deref(), Some("gmx"));
        assert_eq!(of(&["example.org", "mx.example.org"]), None);
    }

    #[test]
    fn a_rule_only_applies_to_its_provider() {
        let rules = ShapingRules::builtin();
        let (code, st, text) = split(
            "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
        );
        assert!(matches!(
            rules.reaction(Some("yahoo"), Some(code), st, &text, false),
            Some(Reaction::Rule(r)) if r.action == Action::Suspend
        ));
        // Elsewhere the same 421 is just a throttling reply.
        assert!(matches!(
            rules.reaction(None, Some(code), st, &text, false),
            Some(Reaction::Aimd)
        ));
        let (code, st, text) = split("250 2.0.0 OK");
        assert!(rules.reaction(None, Some(code), st, &text, false).is_none());
        // A recipient's own limit is not the sender's: no AIMD for a matching text at RCPT,
        // while a 421 (the server closing the session) always counts.
        let (code, st, text) = split("450 4.2.1 Too many messages for this mailbox, slow down");
        assert!(matches!(
            rules.reaction(None, Some(code), st, &text, false),
            Some(Reaction::Aimd)
        ));
        assert!(rules.reaction(None, Some(code), st, &text, true).is_none());
        let (code, st, text) = split("421 4.7.0 Try again later, closing connection.");
        assert!(matches!(
            rules.reaction(None, Some(code), st, &text, true),
            Some(Reaction::Aimd)
        ));
        // Greylisting is not a throttle.
        let (code, st, text) = split("451 4.7.1 Greylisted, try again later");
        assert!(rules.reaction(None, Some(code), st, &text, false).is_none());
    }

    #[test]
    fn bad_rules_are_named_by_rule_and_field() {
        let text = r#"
[[provider]]
name = "p"
match = ["p.example"]

[[rule]]
name = "a"
provider = "nobody"
text = ["(unclosed"]
action = "suspend"
duration = "1h"

[[rule]]
name = "b"
code = [250]
action = "throttle"
duration = "1h"

[[rule]]
name = "c"
status = ["4.x.1"]
action = "explode"
duration = "30d"
"#;
        let e = ShapingRules::parse("s.toml", text).unwrap_err().to_string();
        for needle in [
            "s.toml: rule[0].provider: no [[provider]] is named \"nobody\"",
            "s.toml: rule[0].text[0]:",
            "s.toml: rule[1].code[0]: 250 is not a failure reply code",
            "s.toml: rule[1].action: throttle needs",
            "s.toml: rule[2].status[0]:",
            "s.toml: rule[2].action: \"explode\" is not an action",
            "s.toml: rule[2].duration: must be more than 0 and at most 7 days",
        ] {
            assert!(e.contains(needle), "{needle:?} missing from:\n{e}");
        }
        let e = ShapingRules::parse(
            "s.toml",
            "[[rule]]\nname = \"a\"\ncode = [421]\naction = \"suspend\"\nduration = \"soon\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("s.toml: rule[0].duration:"), "{e}");
    }
}
