//! The dashboard's controls: start, pause, stop, run settings. Every request carries the admin
//! token printed at server start as `Authorization: Bearer <token>`; anything else gets a 401
//! (the [`Admin`] extractor checks it once for every handler).
//! The round loop applies what is asked at round boundaries (see `round/run.rs`, `proceed`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use canopy_core::strategy;
use serde::Deserialize;
use serde_json::json;

use crate::App;
use crate::config::Config;

/// A fresh random token (16 hex digits) for when none is configured.
pub fn random_token() -> String {
    use rand::RngExt;
    format!("{:016x}", rand::rng().random::<u64>())
}

/// Compares in constant time, so response timing does not reveal how much of a guess matched.
pub fn token_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len()
        && !expected.is_empty()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Ok when the request carries the right token; otherwise the 401 to send back.
// The error is the response itself, returned straight from the handler.
#[allow(clippy::result_large_err)]
pub fn authorize(headers: &HeaderMap, expected: &str) -> Result<(), Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if token_matches(t.trim(), expected) => Ok(()),
        Some(_) => Err(error(
            StatusCode::UNAUTHORIZED,
            "wrong admin token: use the one the server printed when it started",
        )),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "admin token missing: send 'Authorization: Bearer <token>' (printed when the server started)",
        )),
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn ok(app: &App, message: &str) -> Response {
    let control = app.hub.lock().unwrap().control().clone();
    Json(json!({ "ok": true, "message": message, "control": control })).into_response()
}

/// Proof that a request carries the admin token: a handler that takes an `Admin` argument is
/// only reached by requests that do; every other request gets the 401 from [`authorize`].
pub struct Admin;

impl FromRequestParts<Arc<App>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        authorize(&parts.headers, &app.admin_token).map(|_| Admin)
    }
}

/// Lets the dashboard check a token before showing the controls as unlocked.
pub async fn check(_: Admin, State(app): State<Arc<App>>) -> Response {
    ok(&app, "token accepted")
}

/// Starts a held run or resumes a paused one.
pub async fn start(_: Admin, State(app): State<Arc<App>>) -> Response {
    if let Err(e) = app.hub.lock().unwrap().start() {
        return error(StatusCode::CONFLICT, &e);
    }
    tracing::info!("dashboard: start");
    ok(&app, "started")
}

/// Holds the run at the next round boundary.
pub async fn pause(_: Admin, State(app): State<Arc<App>>) -> Response {
    app.hub.lock().unwrap().pause();
    tracing::info!("dashboard: pause");
    ok(&app, "pausing after the round in progress")
}

/// Ends the run after the round in progress; the tabs get Bye.
pub async fn stop(_: Admin, State(app): State<Arc<App>>) -> Response {
    app.hub.lock().unwrap().stop();
    tracing::info!("dashboard: stop");
    ok(&app, "stopping after the round in progress")
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub rounds: Option<u32>,
    /// 0 removes the cap.
    pub clients_per_round: Option<usize>,
    pub next_strategy: Option<String>,
}

pub async fn settings(_: Admin, State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let s: Settings = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("settings: {e}")),
    };
    if let Some(name) = &s.next_strategy
        && strategy::lookup(name).is_none()
    {
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "unknown strategy '{name}' (known: {})",
                strategy::names().join(", ")
            ),
        );
    }
    {
        let mut hub = app.hub.lock().unwrap();
        if let Some(r) = s.rounds
            && let Err(e) = hub.set_planned_rounds(r)
        {
            let code = if hub.phase().is_over() {
                StatusCode::CONFLICT
            } else {
                StatusCode::BAD_REQUEST
            };
            return error(code, &e);
        }
        if let Some(n) = s.clients_per_round {
            hub.set_clients_per_round((n > 0).then_some(n));
        }
    }
    if let Some(name) = s.next_strategy {
        if let Err(e) = write_next_run(&app, &name) {
            return error(StatusCode::INTERNAL_SERVER_ERROR, &e);
        }
        app.hub.lock().unwrap().set_next_strategy(name);
    }
    tracing::info!("dashboard: settings changed");
    ok(&app, "settings applied")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ban {
    pub client: u64,
    /// Shown to the banned tab.
    #[serde(default)]
    pub reason: Option<String>,
    /// Also ban the address it connected from, for this many minutes: no new ids from there
    /// meanwhile, and every client connected from it is banned too.
    #[serde(default)]
    pub address_minutes: Option<u64>,
}

/// Bans a client: the tab is told why and disconnected, and may not rejoin with its id (nor,
/// with `address_minutes`, from its address for that long).
pub async fn ban(_: Admin, State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    let b: Ban = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("ban: {e}")),
    };
    let reason: String = b
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .unwrap_or("banned by the admin")
        .chars()
        .take(200)
        .collect();
    let banned = match b.address_minutes {
        Some(0) => {
            return error(
                StatusCode::BAD_REQUEST,
                "ban: address_minutes must be positive",
            );
        }
        Some(m) => app
            .hub
            .lock()
            .unwrap()
            .ban_with_address(b.client, &reason, m),
        None => app
            .hub
            .lock()
            .unwrap()
            .ban(b.client, &reason)
            .map(|n| vec![n]),
    };
    match banned {
        Ok(names) => {
            let names = names.join(", ");
            tracing::warn!(client = b.client, %names, %reason, minutes = ?b.address_minutes, "dashboard: banned");
            let address = b
                .address_minutes
                .map(|m| format!(" and its address for {m} min"))
                .unwrap_or_default();
            ok(
                &app,
                &format!("banned {names} (client {}{address}): {reason}", b.client),
            )
        }
        Err(e) => error(StatusCode::NOT_FOUND, &e),
    }
}

/// "Strategy for the next run" is a stored setting: this run's config with that strategy, in
/// `next-run.toml` beside the metrics, for `canopy serve --config <that file>`.
fn write_next_run(app: &App, strategy: &str) -> Result<(), String> {
    let mut config: Config =
        serde_json::from_value(app.config_json.clone()).map_err(|e| e.to_string())?;
    config.strategy.name = strategy.to_string();
    config.run.name = None;
    let text = toml::to_string_pretty(&config).map_err(|e| e.to_string())?;
    let path = app.run_dir.join("next-run.toml");
    std::fs::write(
        &path,
        format!(
            "# Written by the dashboard: canopy serve --config {}\n{text}",
            path.display()
        ),
    )
    .map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn only_the_right_token_passes() {
        assert!(token_matches("abc123", "abc123"));
        assert!(!token_matches("abc124", "abc123"));
        assert!(!token_matches("abc12", "abc123"));
        assert!(
            !token_matches("", ""),
            "an empty token never unlocks anything"
        );
        let mut h = HeaderMap::new();
        assert_eq!(
            authorize(&h, "abc123").unwrap_err().status(),
            StatusCode::UNAUTHORIZED
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer nope"),
        );
        assert_eq!(
            authorize(&h, "abc123").unwrap_err().status(),
            StatusCode::UNAUTHORIZED
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc123"),
        );
        assert!(authorize(&h, "abc123").is_ok());
        assert_eq!(random_token().len(), 16);
        assert_ne!(random_token(), random_token());
    }
}
