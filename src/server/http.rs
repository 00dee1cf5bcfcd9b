//! The HTTP endpoint: `/health` for probes and `/metrics` for Prometheus.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::metrics::Metrics;
use crate::catalog::Database;

#[derive(Clone)]
struct HttpState {
    db: Database,
    metrics: Arc<Metrics>,
}

/// The router for the HTTP listener.
pub fn router(db: Database, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .with_state(HttpState { db, metrics })
}

async fn health() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], "{\"status\":\"ok\"}\n")
}

async fn metrics_text(State(state): State<HttpState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(&state.db))
}
