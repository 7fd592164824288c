//! Idempotency keys, Stripe's model, claimed in the same transaction as the work.
//!
//! - Keys are scoped per user: the same key from two users are two unrelated requests.
//! - The first *successful* response (status and body) is stored with the key when the work
//!   commits, and replayed for the same key with the same request (method, route, body).
//! - The same key with a different request is refused (422 `IDEMPOTENCY_KEY_REUSED`).
//! - While a request holds the key (its transaction is open), another one gets 409
//!   `IDEMPOTENCY_KEY_IN_USE` at once instead of waiting: the holder takes a transaction-level
//!   advisory lock on the key before anything else.
//! - A request that fails (4xx or 5xx) stores nothing: its transaction rolls back with the
//!   work, so retrying with the same key runs it again.
//! - Keys expire after `api.idempotency_retention_hours`; `run_expiry` deletes expired ones
//!   (every order worker runs it, see `startup`).

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use crate::db::{run_pruning, Pruning};
use crate::settings::Settings;
use crate::telemetry::METRICS;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// A validated key and the fingerprint of the request it came with.
#[derive(Debug, Clone)]
pub struct IdempotentRequest {
    pub user_id: i64,
    pub key: String,
    pub fingerprint: [u8; 32],
}

impl IdempotentRequest {
    /// Reads the `Idempotency-Key` header (required on every mutating call).
    pub fn new(
        headers: &HeaderMap,
        user_id: i64,
        method: &str,
        route: &str,
        body: &Map<String, Value>,
    ) -> Result<Self, ApiError> {
        let key = headers
            .get(HEADER)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "IDEMPOTENCY_KEY_REQUIRED",
                    "an Idempotency-Key header is required on this call",
                )
            })?
            .to_str()
            .ok()
            .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "IDEMPOTENCY_KEY_INVALID",
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                )
            })?
            .to_owned();
        // serde_json's Map is ordered by key, so equal JSON bodies hash equally whatever the
        // field order or whitespace of the request.
        let mut hasher = Sha256::new();
        hasher.update(method.as_bytes());
        hasher.update([0]);
        hasher.update(route.as_bytes());
        hasher.update([0]);
        hasher.update(serde_json::to_vec(body).unwrap_or_default());
        Ok(Self {
            user_id,
            key,
            fingerprint: hasher.finalize().into(),
        })
    }

    fn lock_id(&self) -> i64 {
        let mut hasher = Sha256::new();
        hasher.update(self.user_id.to_be_bytes());
        hasher.update(self.key.as_bytes());
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(first)
    }

    /// Claims the key inside `conn`'s transaction. `Ok(Some(response))` is a stored response
    /// to replay (the caller returns it and does no work); `Ok(None)` means go ahead.
    pub async fn claim(&self, conn: &mut PgConnection) -> Result<Option<Response>, ApiError> {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(self.lock_id())
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            METRICS.idempotency.with_label_values(&["in_flight"]).inc();
            return Err(ApiError::conflict(
                "IDEMPOTENCY_KEY_IN_USE",
                "a request with this Idempotency-Key is still in progress; retry later",
            ));
        }
        let stored: Option<(Vec<u8>, i16, Value, bool)> = sqlx::query_as(
            r#"
            SELECT request_hash, response_status, response_body, expires_at < now()
            FROM idempotency_keys WHERE user_id = $1 AND key = $2
            "#,
        )
        .bind(self.user_id)
        .bind(&self.key)
        .fetch_optional(&mut *conn)
        .await?;
        match stored {
            None => Ok(None),
            Some((_, _, _, true)) => {
                sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2")
                    .bind(self.user_id)
                    .bind(&self.key)
                    .execute(&mut *conn)
                    .await?;
                Ok(None)
            }
            Some((hash, _, _, false)) if hash != self.fingerprint => {
                METRICS
                    .idempotency
                    .with_label_values(&["reused_with_other_request"])
                    .inc();
                Err(ApiError::invalid(
                    "IDEMPOTENCY_KEY_REUSED",
                    "this Idempotency-Key was already used with a different request",
                ))
            }
            Some((_, status, body, false)) => {
                METRICS.idempotency.with_label_values(&["replayed"]).inc();
                let status = u16::try_from(status)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::OK);
                let mut response = (status, Json(body)).into_response();
                response
                    .headers_mut()
                    .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
                Ok(Some(response))
            }
        }
    }

    /// Stores the response with the key, in the transaction that did the work.
    pub async fn complete(
        &self,
        conn: &mut PgConnection,
        status: StatusCode,
        body: &Value,
        retention_hours: u64,
    ) -> Result<(), ApiError> {
        sqlx::query(
            r#"
            INSERT INTO idempotency_keys (user_id, key, request_hash, response_status, response_body, expires_at)
            VALUES ($1, $2, $3, $4, $5, now() + make_interval(hours => $6))
            "#,
        )
        .bind(self.user_id)
        .bind(&self.key)
        .bind(self.fingerprint.as_slice())
        .bind(status.as_u16() as i16)
        .bind(body)
        .bind(i32::try_from(retention_hours).unwrap_or(i32::MAX))
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// How often expired idempotency keys are deleted (at start, then this often). A key is
/// useless once expired whether or not it is deleted yet; each pass deletes every expired one.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes idempotency keys past their `expires_at`, a chunk at a time until a chunk comes
/// back short (`db::Pruning`), so expiry keeps up with any request rate. Chunks take their
/// rows `FOR UPDATE SKIP LOCKED` (several workers split them; a request that is replacing its
/// own expired key keeps it) through `idempotency_keys_by_expiry`, and delete them by `ctid`.
/// A key found expired before it is deleted is treated as absent by the API.
const EXPIRY_SQL: &str = r#"
    DELETE FROM idempotency_keys
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM idempotency_keys
        WHERE expires_at < now() - make_interval(hours => $1)
        ORDER BY expires_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ))
"#;

/// Expires idempotency keys until `cancel` fires.
pub async fn run_expiry(
    _settings: Settings,
    pool: PgPool,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let expiry = Pruning {
        what: "expired idempotency keys",
        sql: EXPIRY_SQL,
        // Each key carries its own `expires_at` (`api.idempotency_retention_hours` after it
        // was stored): nothing is kept past it.
        retention_hours: 0,
        group: None,
        interval: EXPIRY_INTERVAL,
        counter: METRICS.idempotency_keys_expired.clone(),
    };
    run_pruning(pool, expiry, cancel).await;
    Ok(())
}
