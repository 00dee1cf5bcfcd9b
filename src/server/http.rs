//! The HTTP endpoint: `/health` for probes, `/metrics` for Prometheus, and
//! `POST /ingest/<source>` for sources with `connector = 'http'`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::{DefaultBodyLimit, Path};
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};

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
        .route("/ingest/{source}", post(ingest))
        .layer(DefaultBodyLimit::max(MAX_INGEST_BYTES))
        .with_state(HttpState { db, metrics })
}

async fn health() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], "{\"status\":\"ok\"}\n")
}

async fn metrics_text(State(state): State<HttpState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(&state.db))
}

/// The largest body `POST /ingest/<source>` takes.
const MAX_INGEST_BYTES: usize = 64 << 20;

/// Appends the records in the body to an http source: `200 {"rows": n}` once they are
/// durable, or `400` listing every record that does not decode (`"errors": [{"line",
/// "error"}]`, the first 100) with nothing appended. Bodies over 64 MiB get `413`.
async fn ingest(State(state): State<HttpState>, Path(source): Path<String>, body: Bytes) -> impl IntoResponse {
    let json = [(header::CONTENT_TYPE, "application/json")];
    match state.db.ingest(&source, &body).await {
        Ok(rows) => (StatusCode::OK, json, serde_json::json!({ "source": source, "rows": rows }).to_string()),
        Err(e) => {
            let status = match e.sqlstate() {
                "42P01" => StatusCode::NOT_FOUND,
                "42809" => StatusCode::CONFLICT,
                code if code.starts_with("22") || code == "0A000" => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let mut response =
                serde_json::json!({ "source": source, "error": e.to_string(), "sqlstate": e.sqlstate() });
            if e.sqlstate() == "22P02" {
                let errors: Vec<serde_json::Value> = state
                    .db
                    .bad_records(&source, &body)
                    .into_iter()
                    .map(|(line, error)| serde_json::json!({ "line": line, "error": error }))
                    .collect();
                response["errors"] = serde_json::Value::Array(errors);
            }
            (status, json, response.to_string())
        }
    }
}
