//! `POST /v1/feedback`: a raw DSN or ARF report over HTTP, handled exactly as one that came to
//! the bounce listener ([`crate::feedback`]).

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::{ApiError, ApiResult, AppState, read_body};

/// `POST /v1/feedback`: one raw DSN or ARF message (`message/rfc822` or any type), processed
/// as if it had come to the bounce listener. Answers what it found and did.
#[utoipa::path(
    post,
    path = "/feedback",
    operation_id = "post_feedback",
    tag = "operator",
    summary = "Process a DSN or feedback report",
    request_body(content = String, content_type = "message/rfc822"),
    responses(
        (status = 200, description = "what it was and what was done", body = super::schema::FeedbackResult),
        (status = 413, description = "over bounce.max_message_bytes", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn post(State(s): State<AppState>, body: Body) -> ApiResult {
    let node = &s.node;
    let limit = node.config.bounce.max_message_bytes;
    let raw = read_body(body, limit, node.config.http.body_read_timeout)
        .await
        .map_err(|e| {
            if e.code == "body_too_large" {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the message is larger than bounce.max_message_bytes ({limit} bytes)"),
                )
            } else {
                e
            }
        })?;
    match crate::feedback::process(node, &raw, &[], "http").await {
        Ok(p) if p.kind == "ignored" => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_a_report",
            format!(
                "not a delivery status notification or feedback report ({})",
                p.detail.unwrap_or_default()
            ),
        )
        .field("body")),
        Ok(p) => Ok(axum::Json(p).into_response()),
        Err(crate::feedback::FeedbackError::Parse(e)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unparseable_report",
            e.to_string(),
        )
        .field("body")),
        Err(crate::feedback::FeedbackError::Spool(e)) => Err(e.into()),
    }
}
