//! The admin API: tenants and their API keys. The router lets only the operator's keys
//! (`[auth] api_keys`) reach it.
//!
//! * `GET /v1/admin/tenants`, `GET /v1/admin/tenants/{name}`, `POST /v1/admin/tenants`
//! * `GET /v1/admin/keys[?tenant=]`, `POST /v1/admin/keys` (the key is in the answer, once),
//!   `DELETE /v1/admin/keys/{id}`
//!
//! Changes are synced to the spool and in force when the answer leaves
//! ([`crate::store::tenants`]).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::extract::{Path, Query};
use super::{
    ApiError, ApiResult, AppState, PageQuery, json_response, now_ms, page_of, parse_json,
    read_body, require_content_type,
};
use crate::config::TenantConfig;
use crate::store::tenants::{KeyRecord, Tenant, TenantError};

fn tenant_json(t: &Tenant) -> Value {
    let mut v = json!(t.spec);
    v["origin"] = json!(t.origin);
    v["used_today"] = json!(t.used_today(now_ms()));
    v
}

fn key_json(k: &KeyRecord) -> Value {
    let time = crate::effects::delivery_log::rfc3339;
    let mut v = json!({
        "id": k.id,
        "tenant": k.tenant,
        "name": k.name,
        "origin": k.origin,
    });
    if let Some(ms) = k.created_at_ms {
        v["created_at"] = json!(time(ms));
    }
    v["last_used_at"] = k.last_used_ms.map_or(Value::Null, |ms| json!(time(ms)));
    v
}

fn tenant_error(e: TenantError) -> ApiError {
    match e {
        TenantError::NoTenant(name) => ApiError::new(
            StatusCode::NOT_FOUND,
            "tenant_not_found",
            format!("no tenant is named {name:?}"),
        )
        .field("tenant"),
        TenantError::Exists(name) => ApiError::new(
            StatusCode::CONFLICT,
            "tenant_exists",
            format!("a tenant is already named {name:?}"),
        )
        .field("name"),
        TenantError::NoKey(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            "key_not_found",
            format!("no API key has id {id:?}"),
        )
        .field("id"),
        TenantError::ConfigKey(name) => ApiError::new(
            StatusCode::CONFLICT,
            "key_in_config",
            format!("key {name} is in the config file: remove it there and reload"),
        )
        .field("id"),
        TenantError::Random => ApiError::internal("making a key", e),
        TenantError::Spool(e) => e.into(),
    }
}

/// `GET /v1/admin/tenants`: every tenant with its settings, origin and usage today.
#[utoipa::path(
    get,
    path = "/admin/tenants",
    operation_id = "list_tenants",
    tag = "operator",
    summary = "Tenants, by name",
    params(("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"), ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "items per page (default 100)")),
    responses(
        (status = 200, description = "every tenant", body = super::schema::TenantList)
    )
)]
pub(super) async fn tenants(State(s): State<AppState>, Query(q): Query<PageQuery>) -> ApiResult {
    let all = s.node.tenants.all();
    let (page, next) = page_of(all, |t| t.spec.name.clone(), &q, 1000)?;
    let list: Vec<Value> = page.iter().map(|t| tenant_json(t)).collect();
    Ok(axum::Json(json!({ "tenants": list, "next_cursor": next })).into_response())
}

/// `GET /v1/admin/tenants/{name}`: one tenant and its keys.
#[utoipa::path(
    get,
    path = "/admin/tenants/{name}",
    operation_id = "get_tenant",
    tag = "operator",
    summary = "A tenant and its keys",
    params(("name" = String, Path, description = "the tenant")),
    responses(
        (status = 200, description = "the tenant", body = super::schema::Tenant),
        (status = 404, description = "no such tenant", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn tenant(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let t = s
        .node
        .tenants
        .get(&name)
        .ok_or_else(|| tenant_error(TenantError::NoTenant(name.clone())))?;
    let mut v = tenant_json(&t);
    v["keys"] = s
        .node
        .tenants
        .keys(Some(&name))
        .iter()
        .map(key_json)
        .collect();
    Ok(axum::Json(v).into_response())
}

/// `POST /v1/admin/tenants`: a new tenant (`[[tenant]]`'s fields, without keys), 201.
#[utoipa::path(
    post,
    path = "/admin/tenants",
    operation_id = "add_tenant",
    tag = "operator",
    summary = "Add a tenant",
    request_body(content = super::schema::NewTenant, content_type = "application/json"),
    responses(
        (status = 201, description = "added", body = super::schema::Tenant),
        (status = 409, description = "a tenant of that name exists", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn add_tenant(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let body = read_json(&s, &headers, body).await?;
    let spec: TenantConfig = parse_json(&body)?;
    if !spec.api_keys.is_empty() || !spec.api_key_hashes.is_empty() {
        let field = if spec.api_keys.is_empty() {
            "api_key_hashes"
        } else {
            "api_keys"
        };
        return Err(ApiError::invalid_field(
            field,
            "keys are made with POST /v1/admin/keys, which answers the key once",
        ));
    }
    if let Some((field, reason)) = spec.problems(&s.node.config).into_iter().next() {
        return Err(ApiError::invalid_field(field, reason));
    }
    let t = s
        .node
        .tenants
        .add_tenant(&s.node.spool, spec)
        .await
        .map_err(tenant_error)?;
    tracing::info!(tenant = %t.name(), "tenant added");
    Ok(json_response(
        StatusCode::CREATED,
        serde_json::to_vec(&tenant_json(&t)).expect("JSON serialises"),
    ))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeysQuery {
    tenant: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/admin/keys[?tenant=]`: keys (never the keys themselves: id, tenant, name, origin,
/// created and last used).
#[utoipa::path(
    get,
    path = "/admin/keys",
    operation_id = "list_keys",
    tag = "operator",
    summary = "API keys (never the keys themselves)",
    params(("tenant" = Option<String>, Query, description = "only this tenant's"), ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"), ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "items per page (default 100)")),
    responses(
        (status = 200, description = "the keys", body = super::schema::ApiKeyList),
        (status = 404, description = "no such tenant", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn keys(State(s): State<AppState>, Query(q): Query<KeysQuery>) -> ApiResult {
    if let Some(t) = &q.tenant
        && s.node.tenants.get(t).is_none()
    {
        return Err(tenant_error(TenantError::NoTenant(t.clone())));
    }
    let all = s.node.tenants.keys(q.tenant.as_deref());
    let order = |k: &KeyRecord| format!("{}\0{}\0{}", k.tenant, k.name, k.id);
    let q = PageQuery {
        cursor: q.cursor,
        limit: q.limit,
    };
    let (page, next) = page_of(all, order, &q, 1000)?;
    let list: Vec<Value> = page.iter().map(key_json).collect();
    Ok(axum::Json(json!({ "keys": list, "next_cursor": next })).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    tenant: String,
    #[serde(default)]
    name: Option<String>,
}

/// `POST /v1/admin/keys` `{"tenant", "name"}`: a new key for the tenant, 201 with the key
/// (shown this once; stored only as its SHA-256).
#[utoipa::path(
    post,
    path = "/admin/keys",
    operation_id = "add_key",
    tag = "operator",
    summary = "Make an API key (shown once)",
    request_body(content = super::schema::NewKey, content_type = "application/json"),
    responses(
        (status = 201, description = "the key, shown this once", body = super::schema::ApiKey),
        (status = 404, description = "no such tenant", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn add_key(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let body = read_json(&s, &headers, body).await?;
    let req: NewKey = parse_json(&body)?;
    let name = req.name.unwrap_or_default();
    if name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid_field(
            "name",
            "a key's name is up to 128 characters, none of them control characters",
        ));
    }
    let (key, record) = s
        .node
        .tenants
        .add_key(&s.node.spool, &req.tenant, &name)
        .await
        .map_err(tenant_error)?;
    tracing::info!(tenant = %record.tenant, key = %record.id, "API key added");
    let mut v = key_json(&record);
    v["key"] = json!(key);
    Ok(json_response(
        StatusCode::CREATED,
        serde_json::to_vec(&v).expect("JSON serialises"),
    ))
}

/// `DELETE /v1/admin/keys/{id}`: the key is refused from when this answers.
#[utoipa::path(
    delete,
    path = "/admin/keys/{id}",
    operation_id = "revoke_key",
    tag = "operator",
    summary = "Revoke an API key",
    params(("id" = String, Path, description = "the key's id")),
    responses(
        (status = 200, description = "revoked", body = super::schema::ApiKey),
        (status = 404, description = "no such key", body = super::openapi::ErrorBody),
        (status = 409, description = "set in the config file", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn revoke_key(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let record = s
        .node
        .tenants
        .revoke_key(&s.node.spool, &id)
        .await
        .map_err(tenant_error)?;
    tracing::info!(tenant = %record.tenant, key = %record.id, "API key revoked");
    let mut v = key_json(&record);
    v["revoked"] = json!(true);
    Ok(axum::Json(v).into_response())
}

/// A JSON body of at most 1 MiB.
async fn read_json(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, ApiError> {
    require_content_type(headers, &["application/json"])?;
    read_body(body, 1 << 20, s.node.config.http.body_read_timeout).await
}
