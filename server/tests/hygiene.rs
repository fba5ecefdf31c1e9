//! Open to anyone, safe from anyone: poisoned updates are bounded and shown as suspicious, an
//! admin can ban a client, connection limits answer with clear errors, stragglers stay busy
//! until their result comes, and every client gets Bye before a server that exits when done.

use std::time::{Duration, Instant};

use canopy_core::aggregate::robust::RobustConfig;
use canopy_core::protocol::{
    Backend, Blob, ClientMetrics, ClientMsg, DeviceInfo, ErrorCode, Hello, PROTOCOL_VERSION,
    Params, ServerMsg, Task, TaskResult, Update, encode,
};
use canopy_server::config::{Config, LateResults};
use canopy_server::lab::poison::Attack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tungstenite::Message;

mod common;
use common::{Ws, read, runtime};

const TOKEN: &str = "hygiene-test-token";

fn config(name: &str, rounds: u32, shards: usize) -> Config {
    let mut c = common::config(name, rounds, shards, "canopy-hygiene");
    c.data.max_train = 2000;
    c.data.max_test = 500;
    c.server.admin_token = Some(TOKEN.into());
    c
}

fn connect(url: &str) -> Ws {
    tungstenite::connect(url).unwrap().0
}

fn hello(name: &str, resume: Option<u64>) -> Message {
    Message::binary(encode(&ClientMsg::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        name: name.into(),
        device: DeviceInfo::new(Backend::Native, "test", "test"),
        resume,
        mask_version: None,
    })))
}

fn expect_error(ws: &mut Ws, code: ErrorCode, needle: &str) {
    match read(ws) {
        Some(ServerMsg::Error { code: c, message }) => {
            assert_eq!(c, code, "{message}");
            assert!(
                message.contains(needle),
                "'{message}' should mention '{needle}'"
            );
        }
        other => panic!("expected an error mentioning '{needle}', got {other:?}"),
    }
}

/// The unchanged model as a weights result: always valid.
fn unchanged(task: &Task, samples: u64) -> Message {
    let Params::Values(params) = &task.model.params else {
        panic!("a weights task")
    };
    let values = params.to_f32().unwrap();
    Message::binary(encode(&ClientMsg::Result(TaskResult {
        round: task.round,
        samples,
        update: Update::Weights(Blob::from_f32(&values)),
        metrics: ClientMetrics::default(),
        mask_version: None,
    })))
}

async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    (
        out.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

/// Runs `cfg` to its end with native clients attacking by `plan` (one client per entry, named
/// sim-0, sim-1, ...); every client must finish.
async fn run_attacked(cfg: Config, plan: Vec<Attack>) -> std::sync::Arc<canopy_server::App> {
    let running = canopy_server::start(cfg).await.unwrap();
    let url = format!("ws://{}/ws", running.addr);
    let sims = tokio::task::spawn_blocking(move || {
        canopy_server::lab::sim::run_many_attacking(&url, &plan, "sim", Duration::from_secs(10))
    });
    let app = running.app.clone();
    tokio::time::timeout(Duration::from_secs(120), running.rounds)
        .await
        .expect("run finished")
        .unwrap();
    assert!(sims.await.unwrap().iter().all(|r| r.finished));
    app
}

#[test]
fn a_poisoned_update_is_bounded_and_its_client_shows_as_suspicious() {
    runtime().block_on(async {
        let mut cfg = config("poison", 2, 5);
        cfg.aggregation = RobustConfig::norm_bound();
        let plan = vec![
            Attack::Constant(1e6),
            Attack::None,
            Attack::None,
            Attack::None,
            Attack::None,
        ];
        let app = run_attacked(cfg, plan).await;
        let hub = app.hub.lock().unwrap();
        let rounds = hub.rounds();
        assert!(
            rounds
                .iter()
                .all(|r| r.results == 5 && r.extra["robust.clipped"] == 1.0),
            "{rounds:?}"
        );
        // Undefended, every value of the model would be about 2e5 and accuracy at chance (0.1).
        assert!(
            rounds[1].test_accuracy > 0.35,
            "the bound kept the model: {}",
            rounds[1].test_accuracy
        );
        let attacker = hub.clients().find(|c| c.name == "sim-0").unwrap();
        assert_eq!(
            (attacker.suspicion.judged, attacker.suspicion.clipped),
            (2, 2)
        );
        assert!(
            attacker.suspicion.max_norm_ratio > 1e3,
            "{:?}",
            attacker.suspicion
        );
        assert!(
            hub.clients()
                .filter(|c| c.name != "sim-0")
                .all(|c| c.suspicion.clipped == 0 && c.suspicion.judged == 2)
        );
        // The metrics carry it for the dashboard's client table.
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(app.run_dir.join("metrics.json")).unwrap())
                .unwrap();
        let row = json["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "sim-0")
            .unwrap();
        assert_eq!(row["suspicion"]["clipped"], 2);
    });
}

#[test]
fn with_no_config_a_sign_flipped_update_is_dropped_whole_and_honest_ones_are_kept() {
    // The default defence on one sign flipper (×−10) of 4 on non-IID shards, where the trimmed
    // mean this replaced cost 7 points: the flipped update lies far from where the run is
    // heading, so it is dropped from every round, and no honest update ever is.
    runtime().block_on(async {
        let mut cfg = config("drop-farthest", 3, 4);
        cfg.data.partition = canopy_core::data::partition::Partition::Dirichlet { alpha: 0.5 };
        assert_eq!(cfg.aggregation, RobustConfig::default());
        let plan = vec![
            Attack::SignFlip(10.0),
            Attack::None,
            Attack::None,
            Attack::None,
        ];
        let app = run_attacked(cfg, plan).await;
        let hub = app.hub.lock().unwrap();
        let rounds = hub.rounds();
        assert!(
            rounds
                .iter()
                .all(|r| r.results == 3 && r.extra["robust.rejected"] == 1.0),
            "{rounds:?}"
        );
        let attacker = hub.clients().find(|c| c.name == "sim-0").unwrap();
        assert_eq!(
            (attacker.suspicion.judged, attacker.suspicion.rejected),
            (3, 3)
        );
        assert!(
            hub.clients()
                .filter(|c| c.name != "sim-0")
                .all(|c| c.suspicion.rejected == 0 && c.suspicion.judged == 3)
        );
        let last = rounds.last().unwrap().test_accuracy;
        // Chance is 0.1; 3 rounds on 2,000 non-IID digits reach about 0.35.
        assert!(last > 0.25, "the honest three train the model: {last}");
    });
}

#[test]
fn a_banned_client_is_told_why_and_cannot_rejoin_with_its_id() {
    runtime().block_on(async {
        let mut cfg = config("ban", 5, 2);
        cfg.run.hold = true;
        let running = canopy_server::start(cfg).await.unwrap();
        let (addr, url) = (running.addr, format!("ws://{}/ws", running.addr));
        let (tx, rx) = std::sync::mpsc::channel();
        let u = url.clone();
        let tab = tokio::task::spawn_blocking(move || {
            let mut ws = connect(&u);
            ws.send(hello("troll", None)).unwrap();
            let Some(ServerMsg::Welcome(w)) = read(&mut ws) else { panic!("no welcome") };
            tx.send(w.client_id).unwrap();
            expect_error(&mut ws, ErrorCode::Banned, "banned: spamming the class");
            assert!(matches!(read(&mut ws), Some(ServerMsg::Bye { reason }) if reason.contains("spamming")));
            assert!(read(&mut ws).is_none(), "the server closed the connection");
            // Back with the same id: refused with the reason.
            let mut ws = connect(&u);
            ws.send(hello("troll", Some(w.client_id))).unwrap();
            expect_error(&mut ws, ErrorCode::Banned, "spamming");
            assert!(matches!(read(&mut ws), Some(ServerMsg::Bye { .. })));
            assert!(read(&mut ws).is_none());
        });
        let id = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)).unwrap()).await.unwrap();
        assert_eq!(post(addr, "/api/admin/ban", "{\"client\": 999}").await.0, 404);
        let (code, body) = post(addr, "/api/admin/ban", &format!("{{\"client\": {id}, \"reason\": \"spamming the class\"}}")).await;
        assert_eq!(code, 200, "{body}");
        tab.await.unwrap();
        let hub = running.app.hub.lock().unwrap();
        let c = hub.client(id).unwrap();
        assert!(c.banned && !c.connected());
    });
}

#[test]
fn an_address_ban_keeps_a_reloaded_tab_out_and_new_ids_are_rationed() {
    runtime().block_on(async {
        let mut cfg = config("ban-address", 5, 2);
        cfg.run.hold = true;
        cfg.limits.max_new_ids_per_minute = 2;
        let running = canopy_server::start(cfg).await.unwrap();
        let (addr, url) = (running.addr, format!("ws://{}/ws", running.addr));
        let (tx, rx) = std::sync::mpsc::channel();
        let u = url.clone();
        let tab = tokio::task::spawn_blocking(move || {
            let mut ws = connect(&u);
            ws.send(hello("troll", None)).unwrap();
            let Some(ServerMsg::Welcome(w)) = read(&mut ws) else {
                panic!("no welcome")
            };
            tx.send(w.client_id).unwrap();
            expect_error(&mut ws, ErrorCode::Banned, "banned: reloading to poison");
            // Reloaded: a new tab, no id to resume. Refused by its address, with how long.
            let mut ws = connect(&u);
            ws.send(hello("troll again", None)).unwrap();
            expect_error(
                &mut ws,
                ErrorCode::Banned,
                "(this address, for 5 more minutes)",
            );
            assert!(matches!(read(&mut ws), Some(ServerMsg::Bye { .. })));
        });
        let id =
            tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)).unwrap())
                .await
                .unwrap();
        let (code, body) = post(
            addr,
            "/api/admin/ban",
            &format!(
                "{{\"client\": {id}, \"reason\": \"reloading to poison\", \"address_minutes\": 5}}"
            ),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("and its address for 5 min"), "{body}");
        tab.await.unwrap();
        assert_eq!(
            post(
                addr,
                "/api/admin/ban",
                &format!("{{\"client\": {id}, \"address_minutes\": 0}}")
            )
            .await
            .0,
            400
        );
    });
    // New ids: loopback is exempt by default, so this run counts it.
    runtime().block_on(async {
        let mut cfg = config("new-ids", 5, 2);
        cfg.run.hold = true;
        cfg.limits.max_new_ids_per_minute = 2;
        cfg.limits.loopback_exempt = false;
        let running = canopy_server::start(cfg).await.unwrap();
        let url = format!("ws://{}/ws", running.addr);
        tokio::task::spawn_blocking(move || {
            let mut kept = Vec::new();
            for name in ["a", "b"] {
                let mut ws = connect(&url);
                ws.send(hello(name, None)).unwrap();
                assert!(matches!(read(&mut ws), Some(ServerMsg::Welcome(_))));
                kept.push(ws);
            }
            let mut ws = connect(&url);
            ws.send(hello("c", None)).unwrap();
            expect_error(
                &mut ws,
                ErrorCode::Refused,
                "too many new clients from this address: at most 2 a minute",
            );
        })
        .await
        .unwrap();
    });
}

#[test]
fn connection_limits_answer_with_clear_errors() {
    runtime().block_on(async {
        let mut cfg = config("limits", 5, 2);
        cfg.run.hold = true;
        cfg.limits.max_connections = 3;
        cfg.limits.max_per_address = 2;
        cfg.limits.loopback_exempt = false;
        cfg.limits.hello_timeout_ms = 400;
        cfg.limits.max_frames_per_sec = 5.0;
        cfg.limits.frame_burst = 5.0;
        let running = canopy_server::start(cfg).await.unwrap();
        let url = format!("ws://{}/ws", running.addr);
        let app = running.app.clone();
        let a = tokio::task::spawn_blocking(move || {
            // Per address: the third connection from 127.0.0.1 is refused.
            let mut a = connect(&url);
            a.send(hello("a", None)).unwrap();
            assert!(matches!(read(&mut a), Some(ServerMsg::Welcome(_))));
            let mut b = connect(&url);
            b.send(hello("b", None)).unwrap();
            assert!(matches!(read(&mut b), Some(ServerMsg::Welcome(_))));
            let mut c = connect(&url);
            expect_error(
                &mut c,
                ErrorCode::Refused,
                "too many connections from 127.0.0.1",
            );
            assert!(read(&mut c).is_none());
            // Frames per second: a burst of 5, then refusals (said once, not per frame).
            for _ in 0..20 {
                a.send(Message::binary(encode(&ClientMsg::Progress {
                    round: 0,
                    progress: Default::default(),
                })))
                .unwrap();
            }
            expect_error(&mut a, ErrorCode::Refused, "too many frames");
            // No Hello in time: closed with a reason (b leaves first to make room).
            b.close(None).ok();
            while read(&mut b).is_some() {}
            std::thread::sleep(Duration::from_millis(200));
            let t0 = Instant::now();
            let mut d = connect(&url);
            expect_error(&mut d, ErrorCode::Refused, "no Hello");
            assert!(read(&mut d).is_none());
            assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
            a
        })
        .await
        .unwrap();
        // Places are given back when sessions end: only `a` is left.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(app.limits.open(), 1);
        drop(a);
    });
}

#[test]
fn a_straggler_stays_busy_and_its_late_result_counts_in_the_next_round() {
    runtime().block_on(async {
        let mut cfg = config("straggler", 8, 2);
        // Held until both have joined, so round 1 samples both; later rounds need only one.
        cfg.run.hold = true;
        cfg.run.min_clients = 1;
        cfg.run.late_results = LateResults::NextRound;
        cfg.strategy.config.deadline_ms = 1000;
        let running = canopy_server::start(cfg).await.unwrap();
        let url = format!("ws://{}/ws", running.addr);
        let app = running.app.clone();
        // Joins first (shard 0), answers round 1 only after two more rounds ran without it,
        // then answers at once.
        let u = url.clone();
        let hub = app.hub.clone();
        let slow = tokio::task::spawn_blocking(move || {
            let mut ws = connect(&u);
            ws.send(hello("slow", None)).unwrap();
            let mut tasks: Vec<u32> = Vec::new();
            let mut late_sent_at_round = None;
            loop {
                match read(&mut ws) {
                    Some(ServerMsg::Task(t)) => {
                        tasks.push(t.round);
                        if tasks.len() == 1 {
                            // Wait until the others finished two rounds without us.
                            let t0 = Instant::now();
                            while hub.lock().unwrap().rounds().len() < 2
                                && t0.elapsed() < Duration::from_secs(60)
                            {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            late_sent_at_round = Some(hub.lock().unwrap().rounds().len() as u32);
                        }
                        ws.send(unchanged(&t, 10)).unwrap();
                    }
                    Some(ServerMsg::Bye { .. }) | None => return (tasks, late_sent_at_round),
                    Some(_) => {}
                }
            }
        });
        let fast = tokio::task::spawn_blocking(move || {
            canopy_server::lab::sim::run_client(&url, "fast", Duration::from_secs(10))
        });
        while app.hub.lock().unwrap().connected() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(post(running.addr, "/api/admin/start", "").await.0, 200);
        tokio::time::timeout(Duration::from_secs(120), running.rounds)
            .await
            .expect("run finished")
            .unwrap();
        let (tasks, late_at) = slow.await.unwrap();
        assert!(fast.await.unwrap().finished);
        let late_at = late_at.expect("the slow client answered late");
        assert!(late_at >= 2);
        // While its round-1 task was outstanding it was never sampled: its second task is for a
        // round that began after it answered.
        assert_eq!(tasks[0], 1);
        assert!(
            tasks.len() >= 2 && tasks[1] > late_at,
            "tasks {tasks:?}, late result sent after {late_at} rounds"
        );
        let hub = app.hub.lock().unwrap();
        let rounds = hub.rounds();
        assert_eq!(rounds.len(), 8);
        assert_eq!(
            rounds[0].dropped, 1,
            "round 1 went on without the straggler"
        );
        let counted: Vec<u32> = rounds
            .iter()
            .filter(|r| r.extra.get("late_results") == Some(&1.0))
            .map(|r| r.round)
            .collect();
        assert_eq!(
            counted.len(),
            1,
            "the late result was counted once: {rounds:?}"
        );
        assert!(
            counted[0] > late_at,
            "in a round after it came: {counted:?}"
        );
    });
}

#[test]
fn every_client_gets_bye_before_a_server_that_exits_when_done() {
    const IDLE: usize = 60;
    let rt = runtime();
    let mut cfg = config("goodbye", 1, 1);
    cfg.run.min_clients = 1;
    let (running, addr) = rt.block_on(async {
        let r = canopy_server::start(cfg).await.unwrap();
        let a = r.addr;
        (r, a)
    });
    let url = format!("ws://{addr}/ws");
    // Idle clients that only listen, each on its own thread.
    let idle: Vec<_> = (0..IDLE)
        .map(|i| {
            let u = url.clone();
            std::thread::spawn(move || {
                let mut ws = connect(&u);
                ws.send(hello(&format!("idle-{i}"), None)).unwrap();
                if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                }
                loop {
                    match read(&mut ws) {
                        Some(ServerMsg::Bye { .. }) => return true,
                        Some(ServerMsg::Task(t)) => ws.send(unchanged(&t, 10)).unwrap(),
                        Some(_) => {}
                        None => return false,
                    }
                }
            })
        })
        .collect();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), running.rounds)
            .await
            .expect("run finished")
            .unwrap()
    });
    // What `--exit-when-done` does next: the process ends, and every task with it.
    rt.shutdown_timeout(Duration::ZERO);
    let got_bye = idle
        .into_iter()
        .map(|h| h.join().unwrap_or(false))
        .filter(|b| *b)
        .count();
    assert_eq!(got_bye, IDLE, "every connected client received Bye");
}
