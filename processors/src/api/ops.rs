//! The API description. Health, readiness and metrics come from `crate::ops`.

use axum::http::header;
use axum::response::IntoResponse;

/// The OpenAPI document, committed in the repository and served as is.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}
