//! Recipient and sender address validation (RFC 5321 `Mailbox`, RFC 6531 UTF-8 local parts).
//!
//! Owns the one definition of "a deliverable address" used at ingest. Pure functions: no I/O, no
//! allocation on the fast path beyond the normalised result. Domains are lower-cased and IDNs are
//! converted to their A-label (punycode) form, because that is what MX lookups and throttles key on.
//! Address literals (`user@[192.0.2.1]`) are refused: a bulk sender routes by domain only.

use std::fmt;

/// RFC 5321 §4.5.3.1.1: local part at most 64 octets.
pub const MAX_LOCAL_LEN: usize = 64;
/// RFC 5321 §4.5.3.1.2: domain at most 255 octets.
pub const MAX_DOMAIN_LEN: usize = 255;
/// RFC 5321 §4.5.3.1.3: a path (`<local@domain>`) is at most 256 octets, so the address is 254.
pub const MAX_ADDRESS_LEN: usize = 254;

/// Why an address was refused. The `Display` text is what API users read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address is empty")]
    Empty,
    #[error("address is longer than {MAX_ADDRESS_LEN} octets")]
    TooLong,
    #[error("address has no '@'")]
    MissingAt,
    #[error("local part is empty")]
    EmptyLocal,
    #[error("local part is longer than {MAX_LOCAL_LEN} octets")]
    LocalTooLong,
    #[error("local part has an invalid character or dot placement")]
    InvalidLocal,
    #[error("domain is empty")]
    EmptyDomain,
    #[error("address literals are not accepted; use a domain")]
    AddressLiteral,
    #[error("domain is not a valid host name: {0}")]
    InvalidDomain(&'static str),
    #[error("domain is not a valid internationalised name")]
    InvalidIdn,
}

/// A validated address: local part as given, domain normalised (lower-case A-labels).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    text: String,
    at: usize,
}

impl Address {
    /// Parses and normalises `input`. Surrounding whitespace is not trimmed: it is an error.
    pub fn parse(input: &str) -> Result<Address, AddressError> {
        if input.is_empty() {
            return Err(AddressError::Empty);
        }
        let at = input.rfind('@').ok_or(AddressError::MissingAt)?;
        let (local, domain) = (&input[..at], &input[at + 1..]);
        validate_local(local)?;
        let domain = normalise_domain(domain)?;
        let mut text = String::with_capacity(local.len() + 1 + domain.len());
        text.push_str(local);
        text.push('@');
        text.push_str(&domain);
        if text.len() > MAX_ADDRESS_LEN {
            return Err(AddressError::TooLong);
        }
        Ok(Address { text, at })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn local(&self) -> &str {
        &self.text[..self.at]
    }

    /// The normalised domain (lower-case, A-labels).
    pub fn domain(&self) -> &str {
        &self.text[self.at + 1..]
    }

    /// True when the local part has non-ASCII characters, so delivery needs SMTPUTF8.
    pub fn needs_smtputf8(&self) -> bool {
        !self.local().is_ascii()
    }

    pub fn into_string(self) -> String {
        self.text
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The domain part of an already validated address string (everything after the last `@`).
pub fn domain_of(address: &str) -> &str {
    address.rfind('@').map_or("", |at| &address[at + 1..])
}

/// Splits an RFC 5322 mailbox given as `Name <address>`, `"Name, Inc." <address>` or
/// `<address>` into its display name (unquoted; `None` when empty) and its address; anything
/// else is taken as an address alone.
pub fn split_mailbox(s: &str) -> (Option<String>, &str) {
    let s = s.trim();
    let Some((name, address)) = s.strip_suffix('>').and_then(|inner| {
        inner
            .rfind('<')
            .map(|open| (&inner[..open], &inner[open + 1..]))
    }) else {
        return (None, s);
    };
    let name = name.trim();
    let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => {
            let mut out = String::with_capacity(quoted.len());
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                out.push(if c == '\\' {
                    chars.next().unwrap_or(c)
                } else {
                    c
                });
            }
            out
        }
        None => name.to_owned(),
    };
    ((!name.is_empty()).then_some(name), address.trim())
}

/// RFC 5322 `atext`, extended by RFC 6531 with any non-ASCII UTF-8 character.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn validate_local(local: &str) -> Result<(), AddressError> {
    if local.is_empty() {
        return Err(AddressError::EmptyLocal);
    }
    if local.len() > MAX_LOCAL_LEN {
        return Err(AddressError::LocalTooLong);
    }
    if let Some(inner) = local.strip_prefix('"') {
        // Quoted-string: qtextSMTP or quoted-pairSMTP (backslash + printable ASCII).
        let inner = inner.strip_suffix('"').ok_or(AddressError::InvalidLocal)?;
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(' '..='~') => {}
                    _ => return Err(AddressError::InvalidLocal),
                },
                '"' => return Err(AddressError::InvalidLocal),
                ' '..='~' => {}
                c if !c.is_ascii() => {}
                _ => return Err(AddressError::InvalidLocal),
            }
        }
        return Ok(());
    }
    // Dot-string: atoms separated by single dots, no leading or trailing dot.
    for atom in local.split('.') {
        if atom.is_empty() || !atom.chars().all(is_atext) {
            return Err(AddressError::InvalidLocal);
        }
    }
    Ok(())
}

fn normalise_domain(domain: &str) -> Result<String, AddressError> {
    if domain.is_empty() {
        return Err(AddressError::EmptyDomain);
    }
    if domain.starts_with('[') {
        return Err(AddressError::AddressLiteral);
    }
    let ascii = if domain.is_ascii() {
        domain.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii_strict(domain).map_err(|_| AddressError::InvalidIdn)?
    };
    check_host_name(&ascii)?;
    Ok(ascii)
}

/// RFC 1035/5321 host name in A-label form: LDH labels of 1–63 octets, at least two labels.
pub fn check_host_name(name: &str) -> Result<(), AddressError> {
    if name.len() > MAX_DOMAIN_LEN {
        return Err(AddressError::InvalidDomain("longer than 255 octets"));
    }
    let mut labels = 0;
    for label in name.split('.') {
        labels += 1;
        if label.is_empty() {
            return Err(AddressError::InvalidDomain("empty label"));
        }
        if label.len() > 63 {
            return Err(AddressError::InvalidDomain("label longer than 63 octets"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(AddressError::InvalidDomain(
                "label has a character other than letters, digits and '-'",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(AddressError::InvalidDomain("label starts or ends with '-'"));
        }
    }
    if labels < 2 {
        return Err(AddressError::InvalidDomain("needs at least two labels"));
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(AddressError::InvalidDomain("top-level label is numeric"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mailbox_splits_into_display_name_and_address() {
        let cases = [
            ("news@example.com", None, "news@example.com"),
            (
                " News <news@example.com> ",
                Some("News"),
                "news@example.com",
            ),
            ("<news@example.com>", None, "news@example.com"),
            (
                r#""Acme, Inc. \"News\"" <news@example.com>"#,
                Some(r#"Acme, Inc. "News""#),
                "news@example.com",
            ),
            (
                "Zoë Ünder <z@example.com>",
                Some("Zoë Ünder"),
                "z@example.com",
            ),
            ("\"john doe\"@example.com", None, "\"john doe\"@example.com"),
            ("news@example.com>", None, "news@example.com>"),
        ];
        for (input, name, address) in cases {
            let (n, a) = split_mailbox(input);
            assert_eq!((n.as_deref(), a), (name, address), "{input}");
        }
    }

    #[test]
    fn accepts_and_normalises() {
        let a = Address::parse("John.Doe+tag@Example.COM").unwrap();
        assert_eq!(a.as_str(), "John.Doe+tag@example.com");
        assert_eq!(a.local(), "John.Doe+tag");
        assert_eq!(a.domain(), "example.com");
        assert!(!a.needs_smtputf8());
        assert_eq!(
            Address::parse("\"john doe\"@example.com").unwrap().local(),
            "\"john doe\""
        );
        assert_eq!(
            Address::parse("\"a\\\"b\"@example.com").unwrap().local(),
            "\"a\\\"b\""
        );
    }

    #[test]
    fn idn_domains_become_punycode() {
        let a = Address::parse("user@Bücher.example").unwrap();
        assert_eq!(a.domain(), "xn--bcher-kva.example");
        let u = Address::parse("jörg@example.com").unwrap();
        assert!(u.needs_smtputf8());
    }

    #[test]
    fn refuses_bad_addresses() {
        let cases = [
            ("", AddressError::Empty),
            ("no-at.example.com", AddressError::MissingAt),
            ("@example.com", AddressError::EmptyLocal),
            ("a..b@example.com", AddressError::InvalidLocal),
            (".a@example.com", AddressError::InvalidLocal),
            ("a.@example.com", AddressError::InvalidLocal),
            ("a b@example.com", AddressError::InvalidLocal),
            ("a\r\n@example.com", AddressError::InvalidLocal),
            ("\"unterminated@example.com", AddressError::InvalidLocal),
            ("user@", AddressError::EmptyDomain),
            ("user@[192.0.2.1]", AddressError::AddressLiteral),
            (
                "user@localhost",
                AddressError::InvalidDomain("needs at least two labels"),
            ),
            (
                "user@-bad.example",
                AddressError::InvalidDomain("label starts or ends with '-'"),
            ),
            (
                "user@a..example",
                AddressError::InvalidDomain("empty label"),
            ),
            (
                "user@exa_mple.com",
                AddressError::InvalidDomain(
                    "label has a character other than letters, digits and '-'",
                ),
            ),
            (
                "user@1.2.3.4",
                AddressError::InvalidDomain("top-level label is numeric"),
            ),
            (
                "user@example.com\n",
                AddressError::InvalidDomain(
                    "label has a character other than letters, digits and '-'",
                ),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Address::parse(input), Err(want), "{input:?}");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert_eq!(Address::parse(&long_local), Err(AddressError::LocalTooLong));
        let long = format!("a@{}.com", vec!["b".repeat(63); 4].join("."));
        assert!(matches!(
            Address::parse(&long),
            Err(AddressError::InvalidDomain(_) | AddressError::TooLong)
        ));
        let label = format!("a@{}.com", "b".repeat(64));
        assert_eq!(
            Address::parse(&label),
            Err(AddressError::InvalidDomain("label longer than 63 octets"))
        );
    }

    #[test]
    fn domain_of_takes_last_at() {
        assert_eq!(domain_of("\"a@b\"@example.com"), "example.com");
        assert_eq!(domain_of("nodomain"), "");
    }
}
