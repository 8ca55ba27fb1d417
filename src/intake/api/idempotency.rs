//! `Idempotency-Key`: a request that carries one is answered once. The answer is stored in the
//! same synced batch as the data it reports, so a retried request replays it and can never add
//! recipients twice; a key in progress is refused (409) rather than run twice. Records expire
//! after `spool.idempotency_ttl` ([`expire`]). Spool reads go to the blocking pool.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, now_ms};
use crate::node::Node;
use crate::store::spool::{SpoolBatch, SpoolError};
use crate::store::tenants::Caller;

/// An `Idempotency-Key` being served: stored with the response in the same commit.
pub(super) struct Idempotency {
    key: Vec<u8>,
    route: String,
    node: Arc<Node>,
}

impl Idempotency {
    /// Encodes the stored answer: created_ms (u64) | status (u16) | route len (u8) | route | body.
    pub(super) fn put(&self, batch: &mut SpoolBatch, status: StatusCode, body: &[u8]) {
        let mut v = Vec::with_capacity(11 + self.route.len() + body.len());
        v.extend_from_slice(&now_ms().to_be_bytes());
        v.extend_from_slice(&status.as_u16().to_be_bytes());
        v.push(self.route.len().min(255) as u8);
        v.extend_from_slice(&self.route.as_bytes()[..self.route.len().min(255)]);
        v.extend_from_slice(body);
        batch.put_idempotency(&self.key, &v);
    }
}

impl Drop for Idempotency {
    fn drop(&mut self) {
        if let Ok(key) = std::str::from_utf8(&self.key)
            && let Ok(mut set) = self.node.idempotency_in_flight.lock()
        {
            set.remove(key);
        }
    }
}

/// A stored answer decoded: (created_ms, status, route, body).
pub fn decode_idempotency(v: &[u8]) -> Option<(u64, u16, &str, &[u8])> {
    let created = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let status = u16::from_be_bytes(v.get(8..10)?.try_into().ok()?);
    let len = usize::from(*v.get(10)?);
    let route = std::str::from_utf8(v.get(11..11 + len)?).ok()?;
    Some((created, status, route, v.get(11 + len..)?))
}

pub(super) enum IdempotencyCheck {
    None,
    Fresh(Idempotency),
    Replay(Response),
}

/// Checks the request's `Idempotency-Key`, which is the caller's tenant's own: two tenants may
/// use the same key.
pub(super) async fn check(
    node: &Arc<Node>,
    headers: &HeaderMap,
    caller: &Caller,
    route: String,
) -> Result<IdempotencyCheck, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(IdempotencyCheck::None);
    };
    let bad = |m: &str| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_idempotency_key", m)
            .field("Idempotency-Key")
    };
    let key = value
        .to_str()
        .map_err(|_| bad("must be printable ASCII"))?
        .to_owned();
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "must be 1 to 255 printable ASCII characters without spaces",
        ));
    }
    // The default tenant's keys are stored as they were before tenants; a tenant's behind its
    // name and a NUL, which no key holds.
    let key = if caller.tenant.is_default() {
        key
    } else {
        format!("{}\0{key}", caller.tenant.name())
    };
    {
        let mut set = node.idempotency_in_flight.lock().expect("idempotency lock");
        if !set.insert(key.clone()) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_in_progress",
                "a request with this Idempotency-Key is still in progress",
            )
            .field("Idempotency-Key"));
        }
    }
    let guard = Idempotency {
        key: key.into_bytes(),
        route,
        node: Arc::clone(node),
    };
    let lookup_node = Arc::clone(node);
    let lookup_key = guard.key.clone();
    let stored =
        tokio::task::spawn_blocking(move || lookup_node.spool.get_idempotency(&lookup_key))
            .await
            .map_err(|e| ApiError::internal("reading the idempotency record", e))??;
    if let Some(stored) = stored
        && let Some((created, status, route, body)) = decode_idempotency(&stored)
    {
        let ttl = node.config.spool.idempotency_ttl.as_millis() as u64;
        if now_ms().saturating_sub(created) < ttl {
            if route != guard.route {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    format!("this Idempotency-Key was used for {route}"),
                )
                .field("Idempotency-Key"));
            }
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED);
            let mut resp = (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_vec(),
            )
                .into_response();
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(IdempotencyCheck::Replay(resp));
        }
    }
    Ok(IdempotencyCheck::Fresh(guard))
}

/// Deletes idempotency records older than the configured TTL.
pub async fn expire(node: Arc<Node>) -> Result<usize, SpoolError> {
    let ttl = node.config.spool.idempotency_ttl.as_millis() as u64;
    let scan_node = Arc::clone(&node);
    let expired = tokio::task::spawn_blocking(move || {
        let now = crate::now_ms();
        let mut expired = Vec::new();
        scan_node.spool.scan_idempotency(|k, v| {
            let created = decode_idempotency(v).map_or(0, |(c, ..)| c);
            if now.saturating_sub(created) >= ttl {
                expired.push(k.to_vec());
            }
        })?;
        Ok::<_, SpoolError>(expired)
    })
    .await
    .map_err(|e| SpoolError::Rocks(format!("idempotency expiry task failed: {e}")))??;
    if expired.is_empty() {
        return Ok(0);
    }
    let mut batch = node.spool.batch();
    for k in &expired {
        batch.delete_idempotency(k);
    }
    node.spool
        .write(batch, crate::store::spool::Durability::Buffered)
        .await?;
    Ok(expired.len())
}
