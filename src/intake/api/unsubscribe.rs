//! One-click unsubscribe (RFC 8058): `GET /u/{token}` shows a page with a button, `POST
//! /u/{token}` unsubscribes. No API key: the HMAC token is the authority. The suppression itself
//! is [`crate::feedback`]'s, the same as an unsubscribe by mail.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::extract::Path;
use super::{ApiError, AppState};
use crate::node::Node;
use crate::outbound::tokens::{Owner, Purpose};
use crate::store::campaign::Campaign;

/// Why an unsubscribe link gets no page or no unsubscribe.
enum LinkRefused {
    /// The spool is still being recovered.
    Starting,
    /// The token does not verify, or its job or campaign is gone.
    NotFound,
}

impl IntoResponse for LinkRefused {
    fn into_response(self) -> Response {
        match self {
            LinkRefused::Starting => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                "Starting up; try again in a few seconds.\n",
            )
                .into_response(),
            LinkRefused::NotFound => (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "This unsubscribe link is not valid.\n",
            )
                .into_response(),
        }
    }
}

/// Whose job an unsubscribe token names, once the node is ready and the token verifies.
fn unsubscribe_token(node: &Node, token: &str) -> Result<Owner, LinkRefused> {
    if !node.is_ready() {
        return Err(LinkRefused::Starting);
    }
    node.assembler
        .tokens()
        .owner(Purpose::Unsubscribe, token)
        .ok_or(LinkRefused::NotFound)
}

/// The recipient and campaign an unsubscribe token names, if it authenticates and its job
/// still exists; `None` for another node's job (cluster mode), which this node cannot read.
async fn unsubscribe_target(
    node: &Arc<Node>,
    token: &str,
) -> Result<Option<(String, Arc<Campaign>)>, LinkRefused> {
    let Owner::Here(job) = unsubscribe_token(node, token)? else {
        return Ok(None);
    };
    let read = Arc::clone(node);
    let found = tokio::task::spawn_blocking(move || read.load_job(job))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    let Some((campaign, bytes)) = found else {
        return Err(LinkRefused::NotFound);
    };
    match crate::store::spool::JobRecord::decode(&bytes) {
        Ok(r) => Ok(Some((r.address.to_lowercase(), campaign))),
        Err(_) => Err(LinkRefused::NotFound),
    }
}

/// `GET /u/{token}`: a plain page with a button that POSTs, so link scanners that follow GETs
/// unsubscribe no one.
#[utoipa::path(
    get,
    path = "/u/{token}",
    operation_id = "unsubscribe_page",
    tag = "unsubscribe",
    summary = "The one-click unsubscribe page (no key: the token authenticates)",
    params(("token" = String, Path, description = "the token of the List-Unsubscribe link")),
    responses(
        (status = 200, description = "a page with a button", body = String, content_type = "text/html"),
        (status = 400, description = "the token is not valid percent-encoded UTF-8", body = super::openapi::ErrorBody),
        (status = 404, description = "not a valid link", body = String, content_type = "text/plain"),
        (status = 503, description = "starting up", body = String, content_type = "text/plain")
    )
)]
pub(super) async fn page(State(s): State<AppState>, Path(token): Path<String>) -> Response {
    let target = match unsubscribe_target(&s.node, &token).await {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let esc = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    // Another node's mail (cluster mode): its address is on that node.
    let question = match target {
        Some((address, campaign)) => format!(
            "Stop mail from {domain} to {address}?",
            domain = esc(crate::intake::address::domain_of(&campaign.record.from)),
            address = esc(&address),
        ),
        None => "Stop mail from this sender to you?".to_owned(),
    };
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Unsubscribe</title></head>\
         <body><p>{question}</p>\
         <form method=\"post\"><button type=\"submit\">Unsubscribe</button></form></body></html>\n",
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

/// `POST /u/{token}`: RFC 8058 one-click unsubscribe (the body, `List-Unsubscribe=One-Click` or
/// the page's empty form, is not needed). Suppresses the recipient for the campaign's From
/// domain; idempotent: a repeat changes nothing and answers the same.
#[utoipa::path(
    post,
    path = "/u/{token}",
    operation_id = "unsubscribe",
    tag = "unsubscribe",
    summary = "Unsubscribe (RFC 8058 one-click)",
    params(("token" = String, Path, description = "the token of the List-Unsubscribe link")),
    responses(
        (status = 200, description = "unsubscribed", body = String, content_type = "text/html"),
        (status = 400, description = "the token is not valid percent-encoded UTF-8", body = super::openapi::ErrorBody),
        (status = 404, description = "not a valid link", body = String, content_type = "text/plain"),
        (status = 503, description = "starting up", body = String, content_type = "text/plain")
    )
)]
pub(super) async fn post(State(s): State<AppState>, Path(token): Path<String>) -> Response {
    let node = &s.node;
    let job = match unsubscribe_token(node, &token) {
        Ok(Owner::Here(j)) => j,
        Ok(Owner::Node(tag)) => {
            // Another node's mail (cluster mode): handed to that node, durably, before the answer.
            return match crate::feedback::forward_unsubscribe(node, &tag, &token, "unsubscribe")
                .await
            {
                Ok(()) => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    "You are unsubscribed.\n",
                )
                    .into_response(),
                Err(e) => ApiError::from(e).into_response(),
            };
        }
        Err(r) => return r.into_response(),
    };
    match crate::feedback::unsubscribe_job(node, job, "unsubscribe").await {
        Ok(None) => LinkRefused::NotFound.into_response(),
        Ok(Some((address, scope))) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{address} is unsubscribed from {scope}.\n"),
        )
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
