//! The wasm bundles (`web/pkg/` with WebGPU, the threaded `web/pkg-mt/` and the CPU-only `web/pkg-cpu/`), served pre-compressed: scripts/build-wasm.sh writes `.br`
//! (brotli), `.zst` (zstd) and `.gz` (gzip) beside each file, and a browser gets the smallest
//! one its `Accept-Encoding` allows, else the file itself. tower-http's `ServeDir` prefers zstd
//! over brotli whatever the sizes; on this bundle brotli is ~8% smaller, so the choice is made
//! here by size.

use std::path::Path;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use crate::App;

/// Encodings the build writes, as (Content-Encoding token, file suffix).
pub const ENCODINGS: [(&str, &str); 3] = [("br", ".br"), ("zstd", ".zst"), ("gzip", ".gz")];

/// The encodings `Accept-Encoding` allows (q > 0), lower-cased. `*` allows every one not named.
pub fn accepted(headers: &HeaderMap) -> Vec<String> {
    let mut named = Vec::new();
    let mut wildcard = false;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        for item in value.to_str().unwrap_or("").split(',') {
            let mut parts = item.split(';');
            let token = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .or_else(|| p.trim().strip_prefix("Q="))
                })
                .filter_map(|q| q.trim().parse::<f32>().ok())
                .next()
                .unwrap_or(1.0);
            if token.is_empty() {
                continue;
            }
            if token == "*" {
                wildcard = q > 0.0;
            } else {
                named.push((token, q));
            }
        }
    }
    let mut out: Vec<String> = named
        .iter()
        .filter(|(_, q)| *q > 0.0)
        .map(|(t, _)| t.clone())
        .collect();
    if wildcard {
        for (token, _) in ENCODINGS {
            if !named.iter().any(|(t, _)| t == token) {
                out.push(token.to_string());
            }
        }
    }
    out
}

/// The smallest pre-compressed sibling of `file` that the client accepts: (token, its path).
pub fn choose(file: &Path, accepted: &[String]) -> Option<(&'static str, std::path::PathBuf)> {
    ENCODINGS
        .iter()
        .filter(|(token, _)| accepted.iter().any(|a| a == token))
        .filter_map(|(token, suffix)| {
            let mut p = file.as_os_str().to_owned();
            p.push(suffix);
            let p = std::path::PathBuf::from(p);
            std::fs::metadata(&p)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| (m.len(), *token, p))
        })
        .min_by_key(|(len, _, _)| *len)
        .map(|(_, token, p)| (token, p))
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("wasm") => "application/wasm",
        Some("js") => "text/javascript",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

/// `GET /pkg/{file}`: the single-threaded bundle with WebGPU.
pub async fn pkg_file(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    serve(&app, "pkg", &name, &headers).await
}

/// `GET /pkg-mt/{file}`: the threaded bundle (its thread pool's worker script, under
/// `snippets/`, is a small file the plain file service sends).
pub async fn pkg_mt_file(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    serve(&app, "pkg-mt", &name, &headers).await
}

/// `GET /pkg-cpu/{file}`: the single-threaded CPU-only bundle (a plain-http LAN tab's).
pub async fn pkg_cpu_file(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    serve(&app, "pkg-cpu", &name, &headers).await
}

/// A plain file name only (no folders, no dot files) from `dir` under the web folder.
async fn serve(app: &App, dir: &str, name: &str, headers: &HeaderMap) -> Response {
    if name.starts_with('.') || name.contains(['/', '\\']) {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    let file = app.web_dir.join(dir).join(name);
    let (encoding, path) = match choose(&file, &accepted(headers)) {
        Some((token, p)) => (Some(token), p),
        None => (None, file),
    };
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(_) => return (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    let mut res = Response::new(Body::from(bytes));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(name)),
    );
    // Caches must key on Accept-Encoding, whichever variant this response is.
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    // A rebuilt bundle keeps its name: browsers revalidate instead of running an old one.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(token) = encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(token));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn parses_accept_encoding() {
        assert_eq!(
            accepted(&headers("gzip, deflate, br, zstd")),
            ["gzip", "deflate", "br", "zstd"]
        );
        assert_eq!(accepted(&headers("gzip;q=0.5, br;q=0")), ["gzip"]);
        assert_eq!(accepted(&headers("identity")), ["identity"]);
        assert_eq!(accepted(&headers("br;q=0, *")), ["zstd", "gzip"]);
        assert!(accepted(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn picks_the_smallest_accepted_variant() {
        let dir = std::env::temp_dir().join(format!("canopy-precompressed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("x.wasm");
        std::fs::write(&file, vec![0u8; 1000]).unwrap();
        std::fs::write(dir.join("x.wasm.br"), vec![0u8; 100]).unwrap();
        std::fs::write(dir.join("x.wasm.zst"), vec![0u8; 120]).unwrap();
        std::fs::write(dir.join("x.wasm.gz"), vec![0u8; 200]).unwrap();
        let all = accepted(&headers("gzip, deflate, br, zstd"));
        assert_eq!(choose(&file, &all).unwrap().0, "br");
        assert_eq!(
            choose(&file, &accepted(&headers("gzip, zstd"))).unwrap().0,
            "zstd"
        );
        assert_eq!(
            choose(&file, &accepted(&headers("gzip, deflate")))
                .unwrap()
                .0,
            "gzip"
        );
        assert!(choose(&file, &accepted(&headers("identity"))).is_none());
        // A missing variant is skipped, not served empty.
        std::fs::remove_file(dir.join("x.wasm.br")).unwrap();
        assert_eq!(choose(&file, &all).unwrap().0, "zstd");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
