//! HTTP routes: the client page, the dashboard, the metrics API and the WebSocket.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::json;
use tower_http::services::{ServeDir, ServeFile};

use crate::App;
use crate::hub::Hub;

pub fn router(app: Arc<App>) -> Router {
    let web = app.web_dir.clone();
    // The wasm bundle is served pre-compressed (`.br`/`.gz` beside it) when the browser accepts it.
    let files = ServeDir::new(&web).precompressed_br().precompressed_gzip();
    Router::new()
        .route("/ws", get(crate::ws::handler))
        .route("/api/metrics", get(metrics))
        .route("/api/metrics.csv", get(metrics_csv))
        .route("/api/model.bin", get(model))
        .route_service("/dashboard", ServeFile::new(web.join("dashboard.html")))
        .fallback_service(files)
        .with_state(app)
}

/// Everything the dashboard shows, and what `metrics.json` holds.
pub fn metrics_json(hub: &Hub, config: &serde_json::Value) -> serde_json::Value {
    json!({
        "run": hub.info,
        "config": config,
        "phase": hub.phase,
        "round": hub.round,
        "elapsed_seconds": hub.started.elapsed().as_secs_f64(),
        "connected": hub.connected(),
        "clients": hub.clients.values().collect::<Vec<_>>(),
        "rounds": hub.rounds,
    })
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    Json(metrics_json(&app.hub.lock().unwrap(), &app.config_json))
}

async fn metrics_csv(State(app): State<Arc<App>>) -> impl IntoResponse {
    let csv = crate::metrics::to_csv(&app.hub.lock().unwrap().rounds);
    ([(header::CONTENT_TYPE, "text/csv")], csv)
}

/// The current global model (postcard-encoded `ModelState`).
async fn model(State(app): State<Arc<App>>) -> impl IntoResponse {
    let bytes = postcard::to_allocvec(&*app.global.lock().unwrap()).unwrap_or_default();
    (
        [(header::CONTENT_TYPE, "application/octet-stream"), (header::CONTENT_DISPOSITION, "attachment; filename=\"model.bin\"")],
        bytes,
    )
}
