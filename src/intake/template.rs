//! Campaign templates (minijinja): compiled at ingest to refuse broken ones with the line at
//! fault, and inspected for the variables that end up in headers.
//!
//! Pure CPU, no I/O. Rendering at delivery time builds on the same environment settings, so what
//! ingest accepts is what delivery can render: strict undefined, HTML auto-escaped.

use std::collections::BTreeSet;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};

/// A template part that failed to compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub message: String,
    pub line: Option<usize>,
}

/// The environment every campaign template is compiled and rendered in.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Parts are named `subject`, `text` and `html`; only HTML is escaped.
    env.set_auto_escape_callback(|name| {
        if name == "html" {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env.set_keep_trailing_newline(true);
    env
}

/// Compiles one part and returns the top-level variables it reads.
pub fn check(name: &str, source: &str) -> Result<BTreeSet<String>, TemplateError> {
    let env = environment();
    let tmpl = env.template_from_named_str(name, source).map_err(|e| {
        let line = e.line();
        let detail = e
            .detail()
            .map(str::to_owned)
            .unwrap_or_else(|| e.kind().to_string());
        let message = match line {
            Some(l) => format!("template syntax error on line {l}: {detail}"),
            None => format!("template syntax error: {detail}"),
        };
        TemplateError { message, line }
    })?;
    Ok(tmpl.undeclared_variables(false).into_iter().collect())
}

/// The variables of a template made only of text and bare `{{ name }}` expressions (no tags,
/// filters, attributes or literals), or `None` for anything else. Such a template renders with
/// given variables exactly when each of these names is present, whatever its type, which lets
/// ingest check a recipient without rendering. Conservative: anything unusual returns `None`
/// and gets a real render.
pub fn bare_variables(source: &str) -> Option<BTreeSet<String>> {
    if source.contains("{%") || source.contains("{#") {
        return None;
    }
    let mut names = BTreeSet::new();
    let mut rest = source;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let close = after.find("}}")?;
        let expr = after[..close]
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+'])
            .trim();
        let mut chars = expr.chars();
        let first = chars.next()?;
        if !(first.is_ascii_alphabetic() || first == '_')
            || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            || matches!(expr, "true" | "false" | "none" | "True" | "False" | "None")
        {
            return None;
        }
        names.insert(expr.to_owned());
        rest = &after[close + 2..];
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_variables_only_for_plain_substitution() {
        let v = bare_variables("Hi {{ first_name }}, {{-last_name-}}!{{x}}").unwrap();
        assert_eq!(
            v.into_iter().collect::<Vec<_>>(),
            vec!["first_name", "last_name", "x"]
        );
        assert_eq!(bare_variables("no variables").unwrap().len(), 0);
        for complex in [
            "{{ name|upper }}",
            "{{ user.name }}",
            "{{ items[0] }}",
            "{% if x %}{{ x }}{% endif %}",
            "{# note #}{{ x }}",
            "{{ 'lit' }}",
            "{{ none }}",
            "{{ a + b }}",
            "{{ f() }}",
            "{{ unclosed",
        ] {
            assert_eq!(bare_variables(complex), None, "{complex}");
        }
    }

    #[test]
    fn reports_variables() {
        let vars = check(
            "subject",
            "Hi {{ first_name }}, {% if vip %}{{ code }}{% endif %}",
        )
        .unwrap();
        assert_eq!(
            vars.into_iter().collect::<Vec<_>>(),
            vec!["code", "first_name", "vip"]
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = check("html", "<p>\n<p>{{ name }\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(
            e.message.starts_with("template syntax error on line 2: "),
            "{}",
            e.message
        );
        let e = check("text", "{% if x %}never closed").unwrap_err();
        assert!(e.message.contains("line 1"), "{}", e.message);
    }
}
