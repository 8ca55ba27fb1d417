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

#[cfg(test)]
mod tests {
    use super::*;

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
