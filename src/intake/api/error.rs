//! The API's error: a status, a stable machine code, a human message and the field at fault,
//! answered as `{"error": {"code", "message", "field"}}` (with `Retry-After` when it applies).
//! Every handler's failure is one of these; field errors have one constructor.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::intake::ingest::{FieldError, UploadError};
use crate::store::spool::SpoolError;

/// An API error: status, stable machine code, human message, and the field at fault.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
}

pub(super) type ApiResult = Result<Response, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> ApiError {
        let f = field.into();
        self.field = if f.is_empty() { None } else { Some(f) };
        self
    }

    /// 422 `invalid_field`: `field` is wrong, `message` says how (it is prefixed with the field).
    pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::invalid(FieldError::new(field, message))
    }

    /// [`ApiError::invalid_field`] of a validation error.
    pub(super) fn invalid(e: FieldError) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("{}: {}", e.field, e.message),
        )
        .field(e.field)
    }

    pub(super) fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// 500 for a task that did not finish (a blocking read that panicked).
    pub(super) fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what}: {e}"),
        )
    }
}

impl From<SpoolError> for ApiError {
    fn from(e: SpoolError) -> ApiError {
        match e {
            SpoolError::NoSpace(_) => ApiError {
                retry_after: Some(30),
                ..ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "spool_full",
                    format!("nothing was accepted: {e}"),
                )
            },
            SpoolError::Closed => ApiError::unavailable(
                "shutting_down",
                "the server is shutting down; nothing was accepted",
            ),
            other => {
                tracing::error!(error = %other, "spool write failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "spool_error",
                    format!("nothing was accepted: {other}"),
                )
            }
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> ApiError {
        match e {
            UploadError::Spool(s) => s.into(),
            UploadError::CampaignFull => ApiError::new(
                StatusCode::CONFLICT,
                "campaign_full",
                "the campaign has no room for more recipients; nothing was accepted",
            ),
            UploadError::Compacted => ApiError::new(
                StatusCode::CONFLICT,
                "campaign_compacted",
                "the campaign finished long enough ago that retention removed its templates \
                 (retention.campaigns); it takes no more recipients: create a new campaign",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(f) = self.field {
            error["field"] = Value::String(f);
        }
        let mut resp = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
