//! The query and path extractors of every handler: axum's, with their refusals answered in the
//! API's error shape (`{"error": …}` naming the parameter) instead of axum's plain-text 400.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::ApiError;

/// A query string: 422 `invalid_field` naming the parameter that does not parse (or is not
/// one the route takes).
pub(super) struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse_query(parts.uri.query().unwrap_or("")).map(Query)
    }
}

/// Parses a query string, naming the parameter at fault.
fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let text = e.into_inner().to_string();
        let named = text
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next());
        let field = match named {
            Some(name) => name.to_owned(),
            None if path == "." || path.is_empty() => "query".to_owned(),
            None => path,
        };
        let message = match named {
            Some(_) => "not a parameter of this route".to_owned(),
            None => text,
        };
        ApiError::invalid_field(field, message)
    })
}

/// Path parameters: 400 `invalid_path` (naming the parameter) when one is not valid
/// percent-encoded UTF-8.
pub(super) struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => {
                // axum names the parameter in backquotes ("Invalid UTF-8 in `id`").
                let text = e.body_text();
                let field = text.split('`').nth(1).unwrap_or_default().to_owned();
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_path",
                    format!("the path does not parse: {text}"),
                )
                .field(field))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Q {
        limit: Option<usize>,
        #[serde(default)]
        force: bool,
    }

    #[test]
    fn a_query_parameter_that_does_not_parse_is_named() {
        let e = parse_query::<Q>("limit=ten").unwrap_err();
        assert_eq!(
            (e.status, e.code, e.field.as_deref()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                Some("limit")
            )
        );
        let e = parse_query::<Q>("force=maybe").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("force"));
        let e = parse_query::<Q>("limit=1&colour=red").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("colour"));
        assert!(e.message.contains("not a parameter"), "{}", e.message);
        let q = parse_query::<Q>("limit=5&force=true").unwrap();
        assert_eq!((q.limit, q.force), (Some(5), true));
        assert_eq!(parse_query::<Q>("").unwrap().limit, None);
    }
}
