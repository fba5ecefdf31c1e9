//! The dashboard's controls over real HTTP: the admin token is required, a held run waits for
//! Start, native clients run the rounds the dashboard set, and Stop ends a run with Bye.

use std::path::PathBuf;
use std::time::Duration;

use canopy_core::data::partition::Partition;
use canopy_server::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "controls-test-token";

fn config(name: &str, rounds: u32) -> Config {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut c = Config::default();
    c.data.path = Some(root.join(canopy_server::datasets::DIGITS_DIR));
    c.data.partition = Partition::Iid;
    c.data.shards = 2;
    c.data.max_train = 1000;
    c.data.max_test = 500;
    c.run.rounds = rounds;
    c.run.min_clients = 2;
    c.run.linger = false;
    c.run.hold = true;
    c.run.name = Some(name.into());
    c.run.out_dir = std::env::temp_dir().join(format!("canopy-controls-{}", std::process::id()));
    c.server.port = 0;
    c.server.admin_token = Some(TOKEN.into());
    c
}

/// A bare HTTP/1.1 POST; returns the status code and body.
async fn post(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn held_run_needs_the_token_then_runs_the_rounds_set_on_the_dashboard() {
    runtime().block_on(async {
        let running = canopy_server::start(config("held", 5)).await.unwrap();
        let (addr, app) = (running.addr, running.app.clone());
        let url = format!("ws://{addr}/ws");
        let sims = tokio::task::spawn_blocking(move || {
            canopy_server::lab::sim::run_many(&url, 2, "c", Duration::from_secs(10))
        });

        let (code, body) = post(addr, "/api/admin/start", None, "").await;
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("token missing"), "{body}");
        let (code, body) = post(addr, "/api/admin/start", Some("guess"), "").await;
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("wrong admin token"), "{body}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            app.hub.lock().unwrap().rounds().is_empty(),
            "a held run waits for Start"
        );

        let (code, body) = post(
            addr,
            "/api/admin/settings",
            Some(TOKEN),
            r#"{"rounds": 2, "next_strategy": "fedavgm"}"#,
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let (code, body) = post(
            addr,
            "/api/admin/settings",
            Some(TOKEN),
            r#"{"next_strategy": "nope"}"#,
        )
        .await;
        assert_eq!(code, 400, "{body}");
        let (code, _) = post(addr, "/api/admin/start", Some(TOKEN), "").await;
        assert_eq!(code, 200);
        tokio::time::timeout(Duration::from_secs(120), running.rounds)
            .await
            .expect("run finished")
            .unwrap();
        assert!(
            sims.await
                .unwrap()
                .iter()
                .all(|r| r.finished && r.tasks == 2)
        );
        let hub = app.hub.lock().unwrap();
        assert_eq!(hub.rounds().len(), 2);
        assert_eq!(hub.phase(), canopy_server::hub::Phase::Done);
        let next = std::fs::read_to_string(running.run_dir.join("next-run.toml")).unwrap();
        assert!(next.contains("name = \"fedavgm\""), "{next}");
    });
}

#[test]
fn stop_ends_a_waiting_run_with_bye() {
    runtime().block_on(async {
        let mut cfg = config("stopped", 3);
        cfg.run.hold = false;
        cfg.run.min_clients = 5; // never reached: the run waits for clients until stopped
        let running = canopy_server::start(cfg).await.unwrap();
        let (addr, app) = (running.addr, running.app.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (code, body) = post(addr, "/api/admin/stop", Some(TOKEN), "").await;
        assert_eq!(code, 200, "{body}");
        tokio::time::timeout(Duration::from_secs(10), running.rounds)
            .await
            .expect("stopped in time")
            .unwrap();
        assert_eq!(
            app.hub.lock().unwrap().phase(),
            canopy_server::hub::Phase::Stopped
        );
        let (code, body) = post(addr, "/api/admin/start", Some(TOKEN), "").await;
        assert_eq!(code, 409, "a finished run does not restart: {body}");
    });
}
