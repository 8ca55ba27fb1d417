//! The OpenAPI 3.1 description of the API, `GET /v1/openapi.json` and `sluice openapi`.
//!
//! Each handler carries its `#[utoipa::path]` (method, path, parameters, bodies, its own
//! answers) and the router is built from those same annotations (utoipa-axum's `routes!`), so a
//! route cannot be served without being described, nor described without being served. What
//! every `/v1` route shares is added here, by rule, to the generated document: the bearer key,
//! and the answers the guard and the request plumbing give any route (401, 429, 503, 500; 403
//! on the operator's routes; 400 and 422 where the route reads a body or parameters; 408, 413
//! and 415 where it reads a body; 507 where it writes; 409 where it takes an
//! `Idempotency-Key`). A route's own answers, and its own wording of these, stay. Error
//! bodies are one schema whose `code` lists every [`CODES`] entry; a unit test keeps that list
//! complete against the codes the handlers use.

use std::sync::LazyLock;

use serde_json::{Value, json};

/// Every `code` an error body can carry: (code, status, what it means).
pub const CODES: &[(&str, u16, &str)] = &[
    (
        "malformed_json",
        400,
        "the body is not JSON, or not an object",
    ),
    ("body_read_error", 400, "the request body could not be read"),
    (
        "invalid_idempotency_key",
        400,
        "the Idempotency-Key header is empty, too long or not printable ASCII",
    ),
    (
        "invalid_path",
        400,
        "a path parameter is not valid percent-encoded UTF-8",
    ),
    ("unauthorized", 401, "no API key, or not a valid one"),
    (
        "operator_only",
        403,
        "the route takes the operator's keys, not a tenant's",
    ),
    ("not_found", 404, "no such API route"),
    (
        "campaign_not_found",
        404,
        "no such campaign (or another tenant's)",
    ),
    (
        "message_not_found",
        404,
        "no such message, or past retention",
    ),
    (
        "not_suppressed",
        404,
        "the address is not on that suppression list",
    ),
    ("sending_domain_not_found", 404, "no such sending domain"),
    ("inbound_not_found", 404, "no such kept inbound message"),
    ("shaping_action_not_found", 404, "no such shaping action"),
    ("tenant_not_found", 404, "no such tenant"),
    ("key_not_found", 404, "no such API key"),
    ("body_timeout", 408, "the client stopped sending the body"),
    (
        "idempotency_in_progress",
        409,
        "a request with this Idempotency-Key is still being processed",
    ),
    (
        "campaign_cancelled",
        409,
        "a cancelled campaign cannot be paused or resumed",
    ),
    (
        "campaign_archived",
        409,
        "an archived campaign cannot be changed",
    ),
    (
        "campaign_compacted",
        409,
        "retention removed the campaign's templates: it takes no more recipients",
    ),
    (
        "campaign_full",
        409,
        "the campaign has no room for more recipients",
    ),
    (
        "breaker_tripped",
        409,
        "a breaker paused the campaign and would trip again; resume with force",
    ),
    ("tenant_exists", 409, "a tenant of that name exists"),
    (
        "key_in_config",
        409,
        "the key is set in the config file, not through the API",
    ),
    (
        "body_too_large",
        413,
        "the body is over the route's size limit",
    ),
    (
        "too_many_recipients",
        413,
        "more recipients than one request may carry",
    ),
    ("too_many_rows", 413, "more rows than one import may carry"),
    (
        "unsupported_media_type",
        415,
        "the Content-Type is not one the route reads",
    ),
    (
        "invalid_field",
        422,
        "a field or parameter is wrong: `field` names it",
    ),
    (
        "idempotency_key_reused",
        422,
        "the Idempotency-Key was used with another request",
    ),
    (
        "recipient_suppressed",
        422,
        "the recipient is on a suppression list",
    ),
    (
        "not_a_report",
        422,
        "the message is not a DSN or feedback report",
    ),
    ("unparseable_report", 422, "the report does not parse"),
    (
        "rate_limited",
        429,
        "over the tenant's or the key's request rate: retry after Retry-After",
    ),
    (
        "max_queued",
        429,
        "the tenant has as many recipients queued as it may: retry later",
    ),
    (
        "daily_quota_exceeded",
        429,
        "over the tenant's daily quota: retry after Retry-After",
    ),
    ("internal", 500, "a task failed inside the server"),
    (
        "spool_error",
        500,
        "the spool could not write; nothing was accepted",
    ),
    (
        "shutting_down",
        503,
        "the server is shutting down: retry on another node or later",
    ),
    (
        "recovering",
        503,
        "the spool is being recovered at start-up: retry shortly",
    ),
    (
        "overloaded",
        503,
        "too many requests in progress: retry shortly",
    ),
    (
        "spool_full",
        507,
        "the spool's disk is nearly full: retry after Retry-After",
    ),
    ("campaigns_exhausted", 507, "no campaign numbers left"),
];

/// The error body every failure answers.
#[derive(utoipa::ToSchema)]
#[schema(as = Error)]
#[allow(dead_code)] // describes the body `ApiError` writes; never built as such
pub(super) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(super) struct ErrorDetail {
    /// A stable machine code (see the list).
    code: String,
    /// What went wrong, for people.
    message: String,
    /// The field, parameter or header at fault.
    field: Option<String>,
}

/// `GET /v1/openapi.json`: this description (no key needed).
#[utoipa::path(get, path = "/v1/openapi.json", operation_id = "openapi", tag = "health",
    summary = "This description",
    responses((status = 200, description = "the OpenAPI 3.1 description", body = Object)))]
pub(super) async fn serve() -> axum::Json<&'static Value> {
    axum::Json(description())
}

/// Links from what a call makes to the calls that use it (OpenAPI links), for clients and for
/// stateful testing: (path, method, status, operation, parameter, where the value is).
const LINKS: &[(&str, &str, &str, &str, &str, &str)] = &[
    (
        "/v1/campaigns",
        "post",
        "202",
        "get_campaign",
        "id",
        "$response.body#/id",
    ),
    (
        "/v1/campaigns",
        "post",
        "202",
        "add_recipients",
        "id",
        "$response.body#/id",
    ),
    (
        "/v1/campaigns",
        "post",
        "202",
        "pause_campaign",
        "id",
        "$response.body#/id",
    ),
    (
        "/v1/campaigns",
        "post",
        "202",
        "resume_campaign",
        "id",
        "$response.body#/id",
    ),
    (
        "/v1/campaigns",
        "post",
        "202",
        "cancel_campaign",
        "id",
        "$response.body#/id",
    ),
    (
        "/v1/messages",
        "post",
        "202",
        "get_message",
        "id",
        "$response.body#/id",
    ),
    (
        "/v1/messages/raw",
        "post",
        "202",
        "get_message",
        "id",
        "$response.body#/id",
    ),
    (
        "/v1/suppressions/{address}",
        "put",
        "200",
        "get_suppression",
        "address",
        "$response.body#/address",
    ),
    (
        "/v1/suppressions/{address}",
        "put",
        "200",
        "delete_suppression",
        "address",
        "$response.body#/address",
    ),
    (
        "/v1/admin/tenants",
        "post",
        "201",
        "get_tenant",
        "name",
        "$response.body#/name",
    ),
    (
        "/v1/admin/tenants",
        "post",
        "201",
        "list_keys",
        "tenant",
        "$response.body#/name",
    ),
    (
        "/v1/admin/keys",
        "post",
        "201",
        "revoke_key",
        "id",
        "$response.body#/id",
    ),
];

fn add_links(doc: &mut Value) {
    for (path, method, status, op, param, from) in LINKS {
        let response = &mut doc["paths"][*path][*method]["responses"][*status];
        debug_assert!(response.is_object(), "{method} {path} {status}");
        response["links"][*op] = json!({"operationId": op, "parameters": {*param: from}});
    }
}

/// The description as JSON, built once.
pub fn description() -> &'static Value {
    static DOC: LazyLock<Value> = LazyLock::new(|| {
        let doc = super::routes().into_openapi();
        let mut v = serde_json::to_value(doc).expect("an OpenAPI document serialises");
        complete(&mut v);
        v
    });
    &DOC
}

/// Which `/v1` operations an answer [`complete`] adds applies to.
enum Given {
    Any,
    /// Those with parameters or a body.
    Input,
    /// Those with a body.
    Body,
    /// Those that change something (not GET).
    Writes,
    /// Those that take an `Idempotency-Key`.
    Idempotent,
    /// The operator's routes.
    Operator,
}

/// Adds what every route shares (see the module docs) to the generated document.
fn complete(doc: &mut Value) {
    doc["info"] = json!({
        "title": "Sluice",
        "version": env!("CARGO_PKG_VERSION"),
        "description": "The HTTP API of Sluice, a bulk outbound mail engine: campaigns, \
            messages, suppressions, sending domains (a tenant's keys) and the fleet's \
            destinations, sources, reports and tenants (the operator's keys). Every error \
            answers `{\"error\": {\"code\", \"message\", \"field\"}}`; 429, 503 and 507 mean \
            the same request later (same Idempotency-Key), after Retry-After.",
        "license": {
            "name": env!("CARGO_PKG_LICENSE"),
            "identifier": env!("CARGO_PKG_LICENSE"),
        },
    });
    let codes: Vec<&str> = CODES.iter().map(|c| c.0).collect();
    let table: String = CODES
        .iter()
        .map(|(c, s, m)| format!("\n- `{c}` ({s}): {m}"))
        .collect();
    let components = &mut doc["components"];
    components["securitySchemes"] = json!({
        "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key: `Authorization: Bearer <key>`"}
    });
    components["schemas"]["ErrorDetail"]["properties"]["code"] = json!({
        "type": "string",
        "enum": codes,
        "description": format!("A stable machine code:{table}"),
    });
    let retry = json!({"description": "seconds to wait before the same request", "schema": {"type": "integer"}});
    let error = |description: &str, retry_after: bool| {
        let mut r = json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        });
        if retry_after {
            r["headers"] = json!({"Retry-After": retry.clone()});
        }
        r
    };
    // (status, answer, which operations can give it)
    let shared = [
        (
            "400",
            error("the request is malformed (path, JSON syntax)", false),
            Given::Input,
        ),
        (
            "401",
            error("no API key, or not a valid one", false),
            Given::Any,
        ),
        (
            "403",
            error("the route takes the operator's keys, not a tenant's", false),
            Given::Operator,
        ),
        (
            "408",
            error("the client stopped sending the body", false),
            Given::Body,
        ),
        (
            "409",
            error(
                "the Idempotency-Key's first request is still in progress",
                false,
            ),
            Given::Idempotent,
        ),
        (
            "413",
            error("the body is over the route's size limit", false),
            Given::Body,
        ),
        (
            "415",
            error("not a Content-Type the route reads", false),
            Given::Body,
        ),
        (
            "422",
            error(
                "a field, parameter or header is wrong: `field` names it",
                false,
            ),
            Given::Input,
        ),
        (
            "429",
            error(
                "over a rate or quota: the same request after Retry-After",
                true,
            ),
            Given::Any,
        ),
        (
            "500",
            error("the server failed; nothing was changed", false),
            Given::Any,
        ),
        (
            "503",
            error(
                "shutting down, recovering or overloaded: the same request after Retry-After",
                true,
            ),
            Given::Any,
        ),
        (
            "507",
            error(
                "the spool's disk is nearly full: nothing was changed; the same request after Retry-After",
                true,
            ),
            Given::Writes,
        ),
    ];
    add_links(doc);
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        if !path.starts_with("/v1/") || path == "/v1/openapi.json" {
            continue;
        }
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in ops.iter_mut() {
            op["security"] = json!([{"apiKey": []}]);
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let body = op.get("requestBody").is_some();
            let applies = |given: &Given| match given {
                Given::Any => true,
                Given::Input => body || !params.is_empty(),
                Given::Body => body,
                Given::Writes => method != "get",
                Given::Idempotent => params.iter().any(|p| p["name"] == "Idempotency-Key"),
                Given::Operator => op["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t == "operator")),
            };
            let wanted: Vec<(&str, &Value)> = shared
                .iter()
                .filter(|(_, _, given)| applies(given))
                .map(|(status, r, _)| (*status, r))
                .collect();
            let responses = &mut op["responses"];
            for (status, r) in wanted {
                if responses.get(status).is_none() {
                    responses[status] = r.clone();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code a handler passes to `ApiError::new`, `unavailable` or `too_many` is listed,
    /// with the status it is used with.
    #[test]
    fn every_error_code_is_listed_with_its_status() {
        let sources = [
            include_str!("admin.rs"),
            include_str!("campaigns.rs"),
            include_str!("cluster.rs"),
            include_str!("domains.rs"),
            include_str!("error.rs"),
            include_str!("extract.rs"),
            include_str!("feedback.rs"),
            include_str!("idempotency.rs"),
            include_str!("inbound.rs"),
            include_str!("lines.rs"),
            include_str!("messages.rs"),
            include_str!("mod.rs"),
            include_str!("sending_domains.rs"),
            include_str!("shaping.rs"),
            include_str!("suppressions.rs"),
            include_str!("tls_reports.rs"),
        ]
        .join("\n");
        let flat: String = sources.split_whitespace().collect::<Vec<_>>().join(" ");
        let re = regex::Regex::new(
            r#"(?:ApiError::new\( ?StatusCode::([A-Z_]+), ?|unavailable\( ?|too_many\( ?caller, ?|too_many\( ?&caller, ?)"([a-z_]+)""#,
        )
        .unwrap();
        let mut seen = 0;
        for cap in re.captures_iter(&flat) {
            let code = &cap[2];
            let listed = CODES.iter().find(|c| c.0 == code);
            let Some((_, status, _)) = listed else {
                panic!("error code {code:?} is not in CODES");
            };
            if let Some(name) = cap.get(1) {
                let want = match name.as_str() {
                    "BAD_REQUEST" => 400,
                    "UNAUTHORIZED" => 401,
                    "FORBIDDEN" => 403,
                    "NOT_FOUND" => 404,
                    "REQUEST_TIMEOUT" => 408,
                    "CONFLICT" => 409,
                    "PAYLOAD_TOO_LARGE" => 413,
                    "UNSUPPORTED_MEDIA_TYPE" => 415,
                    "UNPROCESSABLE_ENTITY" => 422,
                    "TOO_MANY_REQUESTS" => 429,
                    "INTERNAL_SERVER_ERROR" => 500,
                    "SERVICE_UNAVAILABLE" => 503,
                    "INSUFFICIENT_STORAGE" => 507,
                    other => panic!("status {other} of {code:?} is not mapped here"),
                };
                assert_eq!(*status, want, "{code}");
            }
            seen += 1;
        }
        assert!(
            seen > 40,
            "only {seen} codes found: the pattern no longer matches"
        );
    }

    #[test]
    fn the_description_lists_every_route_with_the_shared_answers() {
        let doc = description();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/campaigns",
            "/v1/campaigns/{id}/recipients",
            "/v1/messages",
            "/v1/suppressions",
            "/v1/admin/keys/{id}",
            "/healthz",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        let list = &doc["paths"]["/v1/campaigns"]["get"];
        assert_eq!(list["security"][0]["apiKey"], json!([]));
        for status in ["200", "401", "422", "429", "503"] {
            assert!(list["responses"].get(status).is_some(), "{status}");
        }
        // Every link names an operation that exists.
        let ops: Vec<&Value> = paths
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .map(|op| &op["operationId"])
            .collect();
        for (path, method, status, op, _, _) in LINKS {
            let r = &doc["paths"][*path][*method]["responses"][*status];
            assert!(r["links"][*op].is_object(), "{method} {path} {status}");
            assert!(ops.contains(&&json!(op)), "{op}");
        }
        let admin = &doc["paths"]["/v1/admin/tenants"]["get"];
        assert!(admin["responses"].get("403").is_some());
        let code = &doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"];
        assert_eq!(code["enum"].as_array().unwrap().len(), CODES.len());
    }
}
