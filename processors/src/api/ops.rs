//! Liveness, readiness, metrics and the API description.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::telemetry::METRICS;

/// The OpenAPI document, committed in the repository and served as is.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool);
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => Ok(Json(json!({ "status": "ready" }))),
        _ => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "NOT_READY", "the database is not reachable")),
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // A database hiccup must not hide the other metrics; the gauges keep their last values.
    if let Err(e) = METRICS.refresh_from_database(&state.pool).await {
        tracing::warn!(error = %e, "could not refresh database gauges for /metrics");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], METRICS.render())
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}
