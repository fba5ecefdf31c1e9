//! Serving the router on the bound port, over plain http or TLS, and the plain-http port of an
//! https server, which sends every request to the https address instead of serving a slow page
//! (a plain-http LAN page gets no WebGPU and no threads).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::serve::tls::Tls;

/// Serves `router` on `listener` until the process ends: http, or https with `tls`. Sessions see
/// the peer's address (the per-address connection limit).
pub fn spawn(listener: tokio::net::TcpListener, router: Router, tls: Option<Tls>) {
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        let result = match tls {
            None => axum::serve(listener, app).await.map_err(|e| e.to_string()),
            Some(tls) => serve_tls(listener, app, tls).await,
        };
        if let Err(e) = result {
            tracing::error!("server stopped: {e}");
        }
    });
}

async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::extract::connect_info::IntoMakeServiceWithConnectInfo<Router, SocketAddr>,
    tls: Tls,
) -> Result<(), String> {
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(tls.cert_pem, tls.key_pem)
        .await
        .map_err(|e| format!("the TLS certificate or key: {e}"))?;
    let std_listener = listener.into_std().map_err(|e| e.to_string())?;
    axum_server::from_tcp_rustls(std_listener, config)
        .map_err(|e| e.to_string())?
        .serve(app)
        .await
        .map_err(|e| e.to_string())
}

/// The https port requests on the plain-http port are sent to.
#[derive(Clone)]
struct Target {
    https_port: u16,
}

/// Binds `bind:port` for plain http and answers every request with a redirect to the same host
/// and path on `https_port`.
pub async fn spawn_redirect(bind: &str, port: u16, https_port: u16) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind((bind, port))
        .await
        .map_err(|e| format!("binding the http port {bind}:{port}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let router = Router::new()
        .fallback(redirect)
        .with_state(Arc::new(Target { https_port }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("http redirect stopped: {e}");
        }
    });
    Ok(addr)
}

async fn redirect(State(t): State<Arc<Target>>, req: Request) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| crate::serve::tls::url_host(&format!("http://{h}/")))
        .unwrap_or_default();
    if host.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            "no Host header: open this server's https address",
        )
            .into_response();
    }
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let to = format!("https://{host}:{}{path}", t.https_port);
    // A short page for anything that does not follow redirects (and for the curious).
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>Canopy: use https</title>\
         <p>This Canopy server runs over https, where your browser lets the page train on its \
         GPU and every core. Go to <a href=\"{to}\">{to}</a>.</p>"
    );
    (
        StatusCode::TEMPORARY_REDIRECT,
        [
            (header::LOCATION, to.as_str()),
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        ],
        body,
    )
        .into_response()
}
