//! `paystream api`: the HTTP API of SPEC §5 (axum).
//!
//! Every mutating call takes an `Idempotency-Key` and runs in one transaction that claims the
//! key, writes the business rows and their outbox rows, and stores the response
//! (`idempotency`). Reads only ever return the caller's own rows; someone else's id is a 404.

mod accounts;
pub mod auth;
mod body;
pub mod error;
pub mod idempotency;
mod ops;
mod orders;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::auth::RateLimiter;
use self::error::ApiError;
use self::idempotency::IdempotentRequest;
use crate::db::release;
use crate::ops::OpsState;
use crate::settings::Settings;
use crate::telemetry::METRICS;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    pub rate_limiter: Arc<RateLimiter>,
    /// `/healthz`, `/readyz`, `/metrics`; `up` adds its processors to readiness.
    pub ops: OpsState,
}

impl AppState {
    pub fn new(settings: Settings, pool: PgPool, ops: OpsState) -> Self {
        let rate_limiter = Arc::new(RateLimiter::new(
            settings.api.rate_limit_per_s,
            settings.api.rate_limit_burst,
        ));
        Self {
            pool,
            settings: Arc::new(settings),
            rate_limiter,
            ops,
        }
    }
}

/// Every route, with its limits and observability. Separate from `serve` so that tests can
/// drive the router without a socket.
pub fn app(state: AppState) -> Router {
    let max_body = state.settings.api.max_body_bytes;
    Router::new()
        .route("/v1/accounts", post(accounts::open))
        .route("/v1/accounts/{id}", get(accounts::get))
        .route("/v1/accounts/{id}/entries", get(accounts::entries))
        .route("/v1/accounts/{id}/deposits", post(accounts::deposit))
        .route("/v1/orders", post(orders::create).get(orders::list))
        .route("/v1/orders/{id}", get(orders::get))
        .route("/v1/orders/{id}/cancel", post(orders::cancel))
        .route("/openapi.json", get(ops::openapi))
        .with_state(state.clone())
        .merge(crate::ops::router(state.ops.clone()))
        .fallback(|| async { ApiError::not_found("NOT_FOUND", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "this route does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(state, observe))
        .layer(DefaultBodyLimit::max(max_body))
}

/// Serves `app` on `listener` until `cancel` fires, then finishes in-flight requests.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await?;
    Ok(())
}

/// The request timeout, and the HTTP metrics (labelled by route template, never by id).
async fn observe(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let timeout = Duration::from_millis(state.settings.api.request_timeout_ms);
    let response = match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        // Dropping the handler rolls back its transaction: nothing is half-applied.
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "REQUEST_TIMEOUT",
            "the request took too long and was abandoned; retry with the same Idempotency-Key",
        )
        .into_response(),
    };
    METRICS
        .http_requests
        .with_label_values(&[&method, &route, response.status().as_str()])
        .inc();
    METRICS
        .http_duration
        .with_label_values(&[&method, &route])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// A mutating call after its key was claimed: either a stored response to replay, or an open
/// transaction that holds the key. Refusals roll back with `db::release` before the response
/// goes out: a dropped transaction would keep the key's advisory lock until its connection is
/// next used, and a client retrying at once would be told the key is still in use.
enum Begun {
    Replay(Response),
    Fresh(Transaction<'static, Postgres>),
}

async fn begin(state: &AppState, request: &IdempotentRequest) -> Result<Begun, ApiError> {
    let mut tx = state.pool.begin().await?;
    match request.claim(&mut tx).await {
        Ok(None) => Ok(Begun::Fresh(tx)),
        Ok(Some(replay)) => {
            release(tx).await;
            Ok(Begun::Replay(replay))
        }
        Err(refused) => {
            release(tx).await;
            Err(refused)
        }
    }
}

/// Commits the work together with its key and the stored response, or, when the work was
/// refused, rolls both back before the caller sees the refusal.
async fn finish(
    state: &AppState,
    request: &IdempotentRequest,
    mut tx: Transaction<'static, Postgres>,
    done: Result<(StatusCode, serde_json::Value), ApiError>,
) -> Result<Response, ApiError> {
    let (status, body) = match done {
        Ok(done) => done,
        Err(refused) => {
            release(tx).await;
            return Err(refused);
        }
    };
    if let Err(failed) = request
        .complete(
            &mut tx,
            status,
            &body,
            state.settings.api.idempotency_retention_hours,
        )
        .await
    {
        release(tx).await;
        return Err(failed);
    }
    tx.commit().await?;
    Ok((status, axum::Json(body)).into_response())
}

/// A path id: anything that is not a positive integer names nothing, so it is a 404.
fn path_id(raw: &str, code: &'static str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::not_found(code, "not found"))
}

/// Cursor pagination: `limit` (1..=page_max, default 20) and `cursor` (an opaque id from the
/// previous page's `nextCursor`).
#[derive(Debug, Clone, Copy)]
struct Page {
    limit: i64,
    before: Option<i64>,
}

impl Page {
    fn parse(
        query: &std::collections::HashMap<String, String>,
        page_max: i64,
    ) -> Result<Self, ApiError> {
        let limit = match query.get("limit") {
            None => 20.min(page_max),
            Some(l) => l
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=page_max).contains(l))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "INVALID_QUERY",
                        format!("limit must be an integer from 1 to {page_max}"),
                    )
                })?,
        };
        let before = match query.get("cursor") {
            None => None,
            Some(c) => Some(c.parse::<i64>().ok().filter(|c| *c > 0).ok_or_else(|| {
                ApiError::bad_request(
                    "INVALID_QUERY",
                    "cursor must be a nextCursor value from a previous page",
                )
            })?),
        };
        Ok(Self { limit, before })
    }

    /// The `{items, nextCursor}` body of a page fetched with `limit + 1` rows.
    fn body<T: serde::Serialize>(
        self,
        mut rows: Vec<T>,
        id: impl Fn(&T) -> i64,
    ) -> serde_json::Value {
        let more = rows.len() as i64 > self.limit;
        rows.truncate(self.limit as usize);
        let next = if more {
            rows.last().map(|r| id(r).to_string())
        } else {
            None
        };
        serde_json::json!({ "items": rows, "nextCursor": next })
    }
}

fn only_query_params(
    query: &std::collections::HashMap<String, String>,
    allowed: &[&str],
) -> Result<(), ApiError> {
    match query.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_request(
            "INVALID_QUERY",
            format!(
                "unknown query parameter {k:?}; allowed: {}",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}
