//! HTTP routes: the client page, the dashboard, the metrics API (polled or live over
//! Server-Sent Events), Prometheus' `/metrics` (`prometheus.rs`), the model's downloads, the
//! admin controls and the WebSocket.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json};
use axum::routing::{get, post};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;
use tower_http::services::{ServeDir, ServeFile};

use crate::App;

pub fn router(app: Arc<App>) -> Router {
    let web = app.web_dir.clone();
    let files = ServeDir::new(&web);
    Router::new()
        .route("/ws", get(crate::serve::ws::handler))
        .route("/api/metrics", get(metrics))
        .route("/api/events", get(events))
        .route("/api/metrics.csv", get(metrics_csv))
        .route("/api/model.bin", get(model))
        .route("/api/model.safetensors", get(model_safetensors))
        .route("/api/join", get(join))
        .route("/metrics", get(crate::serve::prometheus::handler))
        .route("/api/qr.svg", get(qr))
        .route("/api/admin/check", post(crate::serve::admin::check))
        .route("/api/admin/start", post(crate::serve::admin::start))
        .route("/api/admin/pause", post(crate::serve::admin::pause))
        .route("/api/admin/stop", post(crate::serve::admin::stop))
        .route("/api/admin/settings", post(crate::serve::admin::settings))
        .route("/api/admin/ban", post(crate::serve::admin::ban))
        // The wasm bundle, pre-compressed (brotli, zstd or gzip, whichever is smallest and accepted).
        .route("/pkg/{file}", get(crate::serve::precompressed::pkg_file))
        .route(
            "/pkg-mt/{file}",
            get(crate::serve::precompressed::pkg_mt_file),
        )
        .route(
            "/pkg-cpu/{file}",
            get(crate::serve::precompressed::pkg_cpu_file),
        )
        .route_service("/dashboard", ServeFile::new(web.join("dashboard.html")))
        .fallback_service(files)
        .layer(axum::middleware::map_response(cross_origin_isolation))
        .with_state(app)
}

/// Every response says `Cross-Origin-Opener-Policy: same-origin` and
/// `Cross-Origin-Embedder-Policy: require-corp`, so the client page, its worker and the threaded
/// bundle's pool workers are cross-origin isolated and get `SharedArrayBuffer` (wasm threads).
/// Browsers honour these on secure origins only (https, localhost); on a plain-http LAN they are
/// ignored and the tab runs the single-threaded bundle. Every page here loads only same-origin
/// resources, which `require-corp` allows without a `Cross-Origin-Resource-Policy` header.
async fn cross_origin_isolation(mut res: axum::response::Response) -> axum::response::Response {
    let h = res.headers_mut();
    h.insert(
        header::HeaderName::from_static("cross-origin-opener-policy"),
        header::HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::HeaderName::from_static("cross-origin-embedder-policy"),
        header::HeaderValue::from_static("require-corp"),
    );
    res
}

fn current_json(app: &App) -> serde_json::Value {
    // The model lock is taken and released before the hub's, never both at once.
    let arch = app.global.lock().unwrap().arch.clone();
    crate::hub::snapshot::snapshot(&app.hub.lock().unwrap(), &app.config_json, &arch)
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    Json(current_json(&app))
}

/// The same JSON as `/api/metrics`, pushed once a second; the browser's EventSource reconnects
/// by itself when the stream drops.
async fn events(State(app): State<Arc<App>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let ticks =
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(Duration::from_secs(1)));
    let stream = futures_util::StreamExt::map(ticks, move |_| {
        Ok(Event::default().data(current_json(&app).to_string()))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn metrics_csv(State(app): State<Arc<App>>) -> impl IntoResponse {
    let csv = crate::round::record::to_csv(app.hub.lock().unwrap().rounds());
    (
        [
            (header::CONTENT_TYPE, "text/csv"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"metrics.csv\"",
            ),
        ],
        csv,
    )
}

/// The current global model (postcard-encoded `ModelState`).
async fn model(State(app): State<Arc<App>>) -> impl IntoResponse {
    let bytes = postcard::to_allocvec(&*app.global.lock().unwrap()).unwrap_or_default();
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"model.bin\"",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        bytes,
    )
}

#[derive(Deserialize)]
struct ExportQuery {
    /// `?mask=1`: add each tensor's pruning mask as `<name>_mask`.
    #[serde(default)]
    mask: u8,
}

/// The current global model as safetensors (PyTorch layout, the architecture in its metadata;
/// see `canopy_core::model::export`).
async fn model_safetensors(
    State(app): State<Arc<App>>,
    Query(q): Query<ExportQuery>,
) -> impl IntoResponse {
    // Copied under the lock and encoded after it, so the round loop never waits on an export.
    let model = app.global.lock().unwrap().clone();
    match canopy_core::model::export::to_safetensors(&model, q.mask != 0) {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"model.safetensors\"",
                ),
                (header::CACHE_CONTROL, "no-store"),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// Where students can join: every usable address of this server.
async fn join(State(app): State<Arc<App>>) -> impl IntoResponse {
    // A root takes no tabs: its edges' pages are where to join.
    let edges = app.hub.lock().unwrap().edge_urls();
    Json(json!({
        "urls": if edges.is_empty() { app.join_urls.clone() } else { edges },
        // The certificate a student is asked to accept, to compare with what the browser shows.
        "fingerprint": app.tls_fingerprint,
    }))
}

#[derive(Deserialize)]
struct QrQuery {
    url: Option<String>,
}

/// A QR code for `?url=` (the dashboard passes the join URL it shows), else the best join URL.
async fn qr(State(app): State<Arc<App>>, Query(q): Query<QrQuery>) -> impl IntoResponse {
    let edges = app.hub.lock().unwrap().edge_urls();
    let url = q
        .url
        .or_else(|| edges.first().or(app.join_urls.first()).cloned())
        .unwrap_or_default();
    if url.len() > 300 {
        return (StatusCode::BAD_REQUEST, "url too long").into_response();
    }
    match crate::serve::lan::qr_svg(&url) {
        Some(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        None => (StatusCode::BAD_REQUEST, "cannot encode that url").into_response(),
    }
}
