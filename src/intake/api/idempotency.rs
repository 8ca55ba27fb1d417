//! `Idempotency-Key`: a request that carries one is answered once. The answer is stored in the
//! same synced batch as the data it reports, so a retried request replays it and can never add
//! recipients twice; a key in progress is refused (409) rather than run twice. A key belongs to
//! the API key that used it, and is bound to its request: the stored answer keeps the SHA-256 of
//! the request (its body, and the query of a raw message), and the same key with another request
//! is a 422 `idempotency_key_reused`, as Stripe and SES answer. Records expire after
//! `spool.idempotency_ttl` ([`expire`]). Spool reads go to the blocking pool.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, now_ms};
use crate::node::Node;
use crate::store::spool::{SpoolBatch, SpoolError};
use crate::store::tenants::Caller;

/// The SHA-256 of a request, as an idempotency record keeps it.
pub(super) type Fingerprint = [u8; 32];

/// Computes a request's [`Fingerprint`]: its query, a NUL, then its body as it comes.
pub(super) struct Fingerprinter(ring::digest::Context);

impl Fingerprinter {
    pub(super) fn new(query: &str) -> Fingerprinter {
        let mut c = ring::digest::Context::new(&ring::digest::SHA256);
        c.update(query.as_bytes());
        c.update(b"\0");
        Fingerprinter(c)
    }

    pub(super) fn update(&mut self, body: &[u8]) {
        self.0.update(body);
    }

    pub(super) fn finish(self) -> Fingerprint {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

/// The fingerprint of a request whose query is `query` and whose body is `body`.
pub(super) fn fingerprint(query: &str, body: &[u8]) -> Fingerprint {
    let mut f = Fingerprinter::new(query);
    f.update(body);
    f.finish()
}

/// A key held while its request is served: a second request with it meanwhile gets 409.
struct InFlight {
    key: Vec<u8>,
    node: Arc<Node>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(key) = std::str::from_utf8(&self.key)
            && let Ok(mut set) = self.node.idempotency_in_flight.lock()
        {
            set.remove(key);
        }
    }
}

/// A fresh `Idempotency-Key`, until its request is read: [`Pending::bind`] it to the request.
pub(super) struct Pending {
    held: InFlight,
    route: String,
}

impl Pending {
    pub(super) fn bind(self, request: Fingerprint) -> Idempotency {
        Idempotency {
            held: self.held,
            route: self.route,
            request,
        }
    }
}

/// An `Idempotency-Key` being served: stored with the response in the same commit.
pub(super) struct Idempotency {
    held: InFlight,
    route: String,
    request: Fingerprint,
}

/// The first byte of a stored answer that carries its request's fingerprint. Older records
/// begin with their creation time, whose first byte is 0 for centuries yet.
const WITH_FINGERPRINT: u8 = 1;

impl Idempotency {
    /// Encodes the stored answer: 1 | created_ms (u64) | status (u16) | the request's fingerprint
    /// (32 bytes) | route len (u8) | route | body.
    pub(super) fn put(&self, batch: &mut SpoolBatch, status: StatusCode, body: &[u8]) {
        let route = &self.route.as_bytes()[..self.route.len().min(255)];
        let mut v = Vec::with_capacity(44 + route.len() + body.len());
        v.push(WITH_FINGERPRINT);
        v.extend_from_slice(&now_ms().to_be_bytes());
        v.extend_from_slice(&status.as_u16().to_be_bytes());
        v.extend_from_slice(&self.request);
        v.push(route.len() as u8);
        v.extend_from_slice(route);
        v.extend_from_slice(body);
        batch.put_idempotency(&self.held.key, &v);
    }
}

/// A stored answer decoded.
#[derive(Debug, PartialEq)]
pub struct StoredAnswer<'a> {
    pub created_ms: u64,
    pub status: u16,
    /// The fingerprint of the request it answered (`None` in records written before requests
    /// were fingerprinted: those replay for any request).
    pub request: Option<Fingerprint>,
    pub route: &'a str,
    pub body: &'a [u8],
}

pub fn decode_idempotency(v: &[u8]) -> Option<StoredAnswer<'_>> {
    let (created, status, request, rest) = if v.first() == Some(&WITH_FINGERPRINT) {
        (
            v.get(1..9)?,
            v.get(9..11)?,
            Some(v.get(11..43)?),
            v.get(43..)?,
        )
    } else {
        (v.get(..8)?, v.get(8..10)?, None, v.get(10..)?)
    };
    let len = usize::from(*rest.first()?);
    Some(StoredAnswer {
        created_ms: u64::from_be_bytes(created.try_into().ok()?),
        status: u16::from_be_bytes(status.try_into().ok()?),
        request: match request {
            Some(f) => Some(Fingerprint::try_from(f).ok()?),
            None => None,
        },
        route: std::str::from_utf8(rest.get(1..1 + len)?).ok()?,
        body: rest.get(1 + len..)?,
    })
}

/// What the `Idempotency-Key` of a request says to do.
pub(super) enum IdempotencyCheck {
    /// The request carries none.
    None,
    /// A key not seen (or expired): serve the request and store the answer with it.
    Fresh(Pending),
    /// A key that answered a request of this route: replay the answer if this request is the
    /// same ([`Stored::replay`]).
    Stored(Stored),
}

/// A live stored answer for a request's key.
pub(super) struct Stored {
    request: Option<Fingerprint>,
    status: StatusCode,
    body: Vec<u8>,
}

impl Stored {
    /// The stored answer, marked `Idempotent-Replayed`, if `request` is the request it answered;
    /// else 422 `idempotency_key_reused`.
    pub(super) fn replay(self, request: &Fingerprint) -> Result<Response, ApiError> {
        if self.request.is_some_and(|f| f != *request) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request: use a new key for a new request",
            )
            .field("Idempotency-Key"));
        }
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body,
        )
            .into_response();
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        Ok(resp)
    }
}

/// Checks the request's `Idempotency-Key`, which is the caller's API key's own: two keys (of
/// one tenant or of two) may use the same one.
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
    // Stored behind `#`, the API key's id and a NUL (no tenant name has a `#`, no key a NUL).
    // Records written when keys were per tenant (the default tenant's bare, another's behind
    // its name) are still found there until they expire, so a retry across an upgrade replays.
    let tenant_key = if caller.tenant.is_default() {
        key.clone()
    } else {
        format!("{}\0{key}", caller.tenant.name())
    };
    let key = format!("#{}\0{key}", caller.key.record.id);
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
    let guard = Pending {
        held: InFlight {
            key: key.into_bytes(),
            node: Arc::clone(node),
        },
        route,
    };
    let lookup_node = Arc::clone(node);
    let lookup_key = guard.held.key.clone();
    let stored = tokio::task::spawn_blocking(move || {
        match lookup_node.spool.get_idempotency(&lookup_key)? {
            Some(v) => Ok(Some(v)),
            None => lookup_node
                .spool
                .get_idempotency(tenant_key.as_bytes())
                .map(|v| v.filter(|v| v.first() != Some(&WITH_FINGERPRINT))),
        }
    })
    .await
    .map_err(|e| ApiError::internal("reading the idempotency record", e))??;
    let Some(answer) = stored.as_deref().and_then(decode_idempotency) else {
        return Ok(IdempotencyCheck::Fresh(guard));
    };
    let ttl = node.config.spool.idempotency_ttl.as_millis() as u64;
    if now_ms().saturating_sub(answer.created_ms) >= ttl {
        return Ok(IdempotencyCheck::Fresh(guard));
    }
    if answer.route != guard.route {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            format!("this Idempotency-Key was used for {}", answer.route),
        )
        .field("Idempotency-Key"));
    }
    Ok(IdempotencyCheck::Stored(Stored {
        request: answer.request,
        status: StatusCode::from_u16(answer.status).unwrap_or(StatusCode::ACCEPTED),
        body: answer.body.to_vec(),
    }))
}

/// Deletes idempotency records older than the configured TTL.
pub async fn expire(node: Arc<Node>) -> Result<usize, SpoolError> {
    let ttl = node.config.spool.idempotency_ttl.as_millis() as u64;
    let scan_node = Arc::clone(&node);
    let expired = tokio::task::spawn_blocking(move || {
        let now = crate::now_ms();
        let mut expired = Vec::new();
        scan_node.spool.scan_idempotency(|k, v| {
            let created = decode_idempotency(v).map_or(0, |a| a.created_ms);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_answers_decode_with_and_without_a_fingerprint() {
        let f = fingerprint("to=a%40example.com", b"body");
        assert_ne!(f, fingerprint("to=b%40example.com", b"body"));
        assert_ne!(f, fingerprint("", b"to=a%40example.combody"));
        let mut v = vec![WITH_FINGERPRINT];
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&202u16.to_be_bytes());
        v.extend_from_slice(&f);
        v.push(5);
        v.extend_from_slice(b"POST /{\"a\":1}");
        let want = StoredAnswer {
            created_ms: 7,
            status: 202,
            request: Some(f),
            route: "POST ",
            body: b"/{\"a\":1}",
        };
        assert_eq!(decode_idempotency(&v), Some(want));
        // A record from before fingerprints: its creation time first.
        let mut old = 7u64.to_be_bytes().to_vec();
        old.extend_from_slice(&202u16.to_be_bytes());
        old.push(4);
        old.extend_from_slice(b"POST{}");
        let got = decode_idempotency(&old).unwrap();
        assert_eq!(
            (got.request, got.route, got.body),
            (None, "POST", &b"{}"[..])
        );
        // Cut short anywhere: nothing, never a panic.
        for n in 0..v.len() - 9 {
            assert_eq!(decode_idempotency(&v[..n]), None, "{n}");
        }
    }
}
