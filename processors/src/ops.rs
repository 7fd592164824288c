//! The operations endpoints every paystream process serves: `/healthz` (alive), `/readyz`
//! (database and broker reachable, and for workers, partitions assigned) and `/metrics`
//! (Prometheus text format). The API serves them on its own port; workers serve them on
//! `metrics.listen`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::telemetry::METRICS;

#[derive(Clone)]
pub struct OpsState {
    pool: PgPool,
    /// A client used only to ask the broker for metadata.
    broker: Arc<BaseConsumer>,
    /// Processors (metric label) that must hold at least one partition to be ready.
    processors: Arc<Vec<&'static str>>,
}

impl OpsState {
    pub fn new(
        settings: &Settings,
        pool: PgPool,
        processors: Vec<&'static str>,
    ) -> anyhow::Result<Self> {
        let broker: BaseConsumer = crate::kafka::base_config(&settings.kafka).create()?;
        Ok(Self {
            pool,
            broker: Arc::new(broker),
            processors: Arc::new(processors),
        })
    }
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves the operations endpoints on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    state: OpsState,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "metrics and health endpoints listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await?;
    Ok(())
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let mut problems = Vec::new();
    let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool);
    if !matches!(
        tokio::time::timeout(Duration::from_secs(2), ping).await,
        Ok(Ok(_))
    ) {
        problems.push("the database is not reachable".to_owned());
    }
    let broker = state.broker.clone();
    let metadata = tokio::task::spawn_blocking(move || {
        broker.fetch_metadata(None, Duration::from_secs(2)).is_ok()
    })
    .await;
    if !matches!(metadata, Ok(true)) {
        problems.push("the broker is not reachable".to_owned());
    }
    for processor in state.processors.iter() {
        if METRICS
            .assigned_partitions
            .with_label_values(&[processor])
            .get()
            < 1
        {
            problems.push(format!("the {processor} processor holds no partition"));
        }
    }
    if problems.is_empty() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        let body = json!({ "code": "NOT_READY", "message": problems.join("; ") });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Sets the gauges that describe database state, at scrape time, from the tables' owners.
async fn refresh_database_gauges(pool: &PgPool) -> Result<(), sqlx::Error> {
    let (backlog, oldest, parked) = crate::outbox::backlog(pool).await?;
    METRICS.outbox_backlog.set(backlog);
    METRICS.outbox_parked.set(parked);
    METRICS
        .outbox_oldest_age
        .set(oldest.unwrap_or(0.0).max(0.0));
    let (pending, oldest) = crate::orders::store::pending(pool).await?;
    METRICS.orders_pending.set(pending);
    METRICS
        .oldest_pending_order_age
        .set(oldest.unwrap_or(0.0).max(0.0));
    Ok(())
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    // A database hiccup must not hide the other metrics; the gauges keep their last values.
    if let Err(e) = refresh_database_gauges(&state.pool).await {
        tracing::warn!(error = %e, "could not refresh database gauges for /metrics");
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        METRICS.render(),
    )
}
