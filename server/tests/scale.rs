//! A run spread over servers, on loopback with a real `nats-server -js`: one root (in this
//! process), three edges (child processes of the `canopy` binary), 3 × 200 synthetic clients.
//! Checks that the root's model after every round is what one server's FedAvg (and FedAvgM, whose
//! velocity carries over) makes of exactly the updates the clients sent, that partial sums over 1 MB travel through the Object Store, that a
//! duplicate and a stale partial are ignored, and that an edge killed mid-round does not stop
//! the round (its clients drop out, the others count). Then HideNseek's votes across two edges,
//! and edges authenticated over TLS with NKeys, signing their partials.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_core::aggregate::robust::{Clip, Rule};
use canopy_core::model::state::ModelState;
use canopy_core::protocol::{
    ClientMsg, DeviceInfo, Hello, PROTOCOL_VERSION, Params, ServerMsg, Update, decode, encode,
};
use canopy_core::strategy::{RoundContext, RunningSum, StrategyConfig, build};
use canopy_core::train::Eval;
use canopy_server::scale::Role;
use canopy_server::scale::wire::{self, Signed};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const PER_EDGE: usize = 200;
const EDGES: usize = 3;
/// Edge 3's clients stall in this round, and edge 3 is killed while they do.
const KILL_ROUND: u32 = 2;

/// A child process killed when the test ends, however it ends.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str) {
    let until = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < until,
            "{what} did not listen on port {port} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Debian's nats-server with JetStream on a free port, storing under `dir`.
fn nats(dir: &Path) -> (Kill, String) {
    let port = free_port();
    let args =
        ["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"].map(std::ffi::OsString::from);
    start_nats(
        dir,
        port,
        args.into_iter().chain([dir.as_os_str().to_owned()]),
    )
}

/// Runs nats-server with `args` (it listens on `port`, logs into `dir`) until the guard drops.
fn start_nats(
    dir: &Path,
    port: u16,
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> (Kill, String) {
    let Ok(path) = which("nats-server") else {
        panic!(
            "nats-server is not installed: `just setup` installs it (Debian package nats-server); the scale-out tests need a real one"
        );
    };
    let child = Command::new(path)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("nats.log")).unwrap())
        .spawn()
        .expect("starting nats-server");
    let guard = Kill(child);
    wait_port(port, "nats-server");
    (guard, format!("nats://127.0.0.1:{port}"))
}

/// An edge server (a child process of the `canopy` binary) named `name` on a free port, with
/// data shards `k/n`; its log in `dir`. Returns it with its port.
fn spawn_edge(edge_toml: &Path, dir: &Path, name: &str, shards: (usize, usize)) -> (Kill, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args(["serve", "--config"])
        .arg(edge_toml)
        .args([
            "--role",
            "edge",
            "--port",
            &port.to_string(),
            "--edge-name",
            name,
        ])
        .args(["--edge-shards", &format!("{}/{}", shards.0, shards.1)])
        .env("RUST_LOG", "warn,canopy_server::scale=info")
        .stdout(std::fs::File::create(dir.join(format!("edge-{name}.log"))).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("edge-{name}.err"))).unwrap())
        .spawn()
        .expect("starting an edge");
    (Kill(child), port)
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .or_else(|| {
            ["/usr/sbin", "/usr/bin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|f| f.is_file())
        })
        .ok_or(())
}

/// What the clients did: per round, the sum of what they sent and the model their tasks carried.
#[derive(Default)]
struct Book {
    sent: BTreeMap<u32, RunningSum>,
    models: BTreeMap<u32, Vec<f32>>,
    /// A round whose tasks carried different models (must not happen under FedAvg).
    mixed: Vec<u32>,
}

type Sink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;
type Stream = futures_util::stream::SplitStream<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
>;

/// Connects to `url` (retrying until the edge listens) and says Hello as `name`.
async fn joined(url: &str, name: String) -> (Sink, Stream) {
    let ws = loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => break ws,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let (mut sink, stream) = ws.split();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        name,
        device: DeviceInfo::new(canopy_core::protocol::Backend::Native, "test", "test"),
        resume: None,
        mask_version: None,
    };
    sink.send(Message::binary(encode(&ClientMsg::Hello(hello))))
        .await
        .unwrap();
    (sink, stream)
}

/// A synthetic client that records what it sends. `stall` (edge 3's clients): in that round it
/// reports the task and never answers.
async fn client(
    url: String,
    name: String,
    book: Arc<Mutex<Book>>,
    stall: Option<Arc<AtomicUsize>>,
    welcomed: Arc<AtomicUsize>,
) {
    let (mut sink, mut stream) = joined(&url, name).await;
    let (mut samples, mut id) = (1, 0);
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Binary(frame) = msg else {
            continue;
        };
        let task = match decode::<ServerMsg>(&frame) {
            Ok(ServerMsg::Welcome(w)) => {
                samples = (w.shard.train.len() as u64).max(1);
                id = w.client_id;
                welcomed.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            Ok(ServerMsg::Task(t)) => t,
            Ok(ServerMsg::Bye { .. }) => break,
            _ => continue,
        };
        if let Some(stalled) = &stall
            && task.round == KILL_ROUND
        {
            stalled.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let reply = canopy_server::lab::load::support::synthetic_result(&task, samples, id);
        {
            let Params::Values(model) = &task.model.params else {
                panic!("a FedAvg task carries values")
            };
            let model = model.to_f32().unwrap();
            let ClientMsg::Result(r) = &reply else {
                panic!("a synthetic result")
            };
            let (Update::Weights(w) | Update::Delta(w)) = &r.update else {
                panic!("FedAvg and FedProx upload weights, FedAvgM and FedAdam deltas")
            };
            let mut b = book.lock().unwrap();
            let known = b
                .models
                .entry(task.round)
                .or_insert_with(|| model.clone())
                .clone();
            if known != model {
                b.mixed.push(task.round);
            }
            let sum = b
                .sent
                .entry(task.round)
                .or_insert_with(|| RunningSum::new(model.len(), Default::default()));
            sum.add(&w.to_f32().unwrap(), r.samples).unwrap();
        }
        if sink.send(Message::binary(encode(&reply))).await.is_err() {
            break;
        }
    }
}

#[test]
fn fedavg_across_edges_equals_one_server() {
    edges_aggregate_as_one_server("fedavg");
}

#[test]
fn fedavgm_across_edges_equals_one_server() {
    edges_aggregate_as_one_server("fedavgm");
}

/// FedProx aggregates as FedAvg does (its term is in the clients' training), FedAdam steps its
/// moments on the mean delta: both stream, so the root's model must be one server's.
#[test]
fn fedprox_and_fedadam_across_edges_equal_one_server() {
    edges_aggregate_as_one_server("fedprox");
    edges_aggregate_as_one_server("fedadam");
}

/// The scale tests start several servers each and depend on their reports' timing: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A scale test's start: its turn, its log (shown when it fails, filtered by `filter`) and a
/// fresh folder named after `name`.
fn setup(name: &str, filter: &str) -> (std::sync::MutexGuard<'static, ()>, PathBuf) {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    let dir = std::env::temp_dir().join(format!("canopy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (turn, dir)
}

fn edges_aggregate_as_one_server(strategy: &str) {
    let run = format!("scale-{strategy}");
    let (_one, dir) = setup(
        &run,
        "warn,canopy_server::scale=info,canopy_server::round::run=info",
    );
    let (_nats, url) = nats(&dir);

    let mut config = common::config(&run, 3, EDGES * PER_EDGE, "canopy-scale-test");
    config.run.out_dir = dir.join("runs");
    config.run.hold = true;
    config.run.min_clients = 2 * PER_EDGE;
    config.strategy.name = strategy.into();
    config.strategy.config.deadline_ms = 60_000;
    config.aggregation.rule = Rule::Mean;
    config.aggregation.clip = Clip::None;
    config.aggregation.streaming = true;
    config.limits.max_connections = 2 * PER_EDGE;
    config.limits.hello_timeout_ms = 60_000;
    config.scale.nats = url.clone();
    config.scale.edge_timeout_ms = 4_000;
    config.scale.grace_ms = 2_000;
    let edge_toml = dir.join("edge.toml");
    std::fs::write(&edge_toml, toml::to_string_pretty(&config).unwrap()).unwrap();
    config.scale.role = Role::Root;

    // Edges first; they wait for the root's rounds (and reconnect to NATS by themselves).
    let mut edges = Vec::new();
    let mut ports = Vec::new();
    for k in 0..EDGES {
        let (edge, port) = spawn_edge(&edge_toml, &dir, &format!("e{}", k + 1), (k, EDGES));
        edges.push(Some(edge));
        ports.push(port);
    }
    for (k, p) in ports.iter().enumerate() {
        wait_port(*p, &format!("edge {}", k + 1));
    }

    common::runtime().block_on(async move {
        let running = canopy_server::start(config).await.expect("the root starts");
        let app = running.app.clone();
        let book = Arc::new(Mutex::new(Book::default()));
        let welcomed = Arc::new(AtomicUsize::new(0));
        let stalled = Arc::new(AtomicUsize::new(0));
        let mut clients = Vec::new();
        for (k, port) in ports.iter().enumerate() {
            for i in 0..PER_EDGE {
                let stall = (k == EDGES - 1).then(|| stalled.clone());
                let ws = format!("ws://127.0.0.1:{port}/ws");
                clients.push(tokio::spawn(client(ws, format!("e{}-{i}", k + 1), book.clone(), stall, welcomed.clone())));
            }
        }
        // Every client joined and every edge reported them: start the run.
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            let idle = app.hub.lock().unwrap().edge_idle_clients(Duration::from_secs(4)).len();
            if welcomed.load(Ordering::SeqCst) == EDGES * PER_EDGE && idle == EDGES * PER_EDGE {
                break;
            }
            assert!(Instant::now() < until, "clients joined: {}, idle on the root's view: {idle}", welcomed.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        app.hub.lock().unwrap().start().unwrap();

        // A duplicate and a stale copy of edge 1's partial in the round edge 3 dies in.
        let nats = async_nats::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(nats.clone());
        let subject = format!("canopy.{run}.partial.2.e1");
        let mut partials = nats.subscribe(subject.clone()).await.unwrap();
        let injected = tokio::spawn(async move {
            let m = partials.next().await.unwrap();
            let wire::Envelope::Inline(bytes) = wire::decode(&m.payload, "a partial").unwrap() else { panic!("a small partial travels inline") };
            let p: wire::Partial = wire::decode(&bytes, "a partial").unwrap();
            let send = |id: String, p: &wire::Partial| {
                let (js, payload, subject) = (js.clone(), wire::encode(&wire::Envelope::Inline(wire::encode(p))), subject.clone());
                async move {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Msg-Id", id.as_str());
                    js.publish_with_headers(subject, h, payload.into()).await.unwrap().await.unwrap()
                }
            };
            // The same Msg-Id again: JetStream itself drops it.
            assert!(send(p.msg_id(), &p).await.duplicate, "JetStream de-duplicates by Msg-Id");
            // A copy that got past de-duplication (another id), and one trained on another model.
            assert!(!send(format!("{}-again", p.msg_id()), &p).await.duplicate);
            let stale = wire::Partial { base: p.base ^ 1, attempt: p.attempt + 1, ..p.clone() };
            assert!(!send(stale.msg_id(), &stale).await.duplicate);
            p
        });

        // Edge 3 dies while its clients work on round 2.
        while stalled.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(edges.pop());

        tokio::time::timeout(Duration::from_secs(180), running.rounds).await.expect("the run ends").unwrap();
        let e1_partial = injected.await.unwrap();
        for c in clients {
            c.abort();
        }
        assert!(e1_partial.sum.in_store() && e1_partial.sum.size() > 1 << 20, "the MLP's sums ({} bytes) travel through the Object Store", e1_partial.sum.size());

        let records = app.hub.lock().unwrap().rounds().to_vec();
        assert_eq!(records.len(), 3);
        let counts: Vec<(usize, usize)> = records.iter().map(|r| (r.results, r.dropped)).collect();
        assert_eq!(counts, vec![(600, 0), (400, 200), (400, 0)], "results, dropped per round");
        // Sampled: every idle client. (A round the root had to announce again, say after a NATS
        // timeout on a loaded machine, samples afresh while the edges that finished the first
        // announcement send their partials again, so only a first announcement is checked.)
        for (r, sampled) in records.iter().zip([600, 600, 400]) {
            if r.retries == 0 {
                assert_eq!(r.sampled, sampled, "round {} sampled", r.round);
            }
        }

        // The root's model after each round is single-server FedAvg of what the clients sent.
        let book = book.lock().unwrap();
        assert!(book.mixed.is_empty(), "rounds whose tasks carried different models: {:?}", book.mixed);
        let final_model = app.global.lock().unwrap().clone();
        let validate = |_: &ModelState| Ok(Eval::default());
        let ctx = RoundContext { rounds: 3, validate: &validate };
        // The same strategy on one server, fed the same sums in the same order (FedAvgM's
        // velocity carries over between rounds).
        let mut one_server = build(strategy, &StrategyConfig::default(), None).unwrap();
        for round in 1..=3u32 {
            let sent = &book.sent[&round];
            assert_eq!(sent.count as usize, records[round as usize - 1].results, "round {round}: results the clients sent");
            let mut expected = ModelState { params: book.models[&round].clone(), ..final_model.clone() };
            one_server.aggregate_sum(round, &mut expected, sent, &[], &ctx).unwrap();
            let root = if round < 3 { &book.models[&(round + 1)] } else { &final_model.params };
            let worst = expected.params.iter().zip(root).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-6, "{strategy} round {round}: the root's model differs from one server's on the sent updates by {worst}");
        }

        // Figures for the record (`cargo test --test scale -- --nocapture`).
        for r in &records {
            let x = |k: &str| r.extra.get(k).copied().unwrap_or(f64::NAN);
            println!(
                "round {}: {} results of {} sampled, {:.2} s; root: announce {:.1} ms, fetch+merge partials {:.1} ms, aggregate {:.1} ms",
                r.round, r.results, r.sampled, r.seconds, x(canopy_core::metric_keys::SERVER_SEND_MS), x(canopy_core::metric_keys::SERVER_FOLD_MS), x(canopy_core::metric_keys::SERVER_AGGREGATE_MS)
            );
        }
        println!("{}", serde_json::to_string_pretty(&app.hub.lock().unwrap().edges_json()).unwrap());

        // The root's dashboard: every edge, its partials, and what became of the injected ones.
        let edges_json = app.hub.lock().unwrap().edges_json();
        let rows = edges_json.as_array().unwrap();
        assert_eq!(rows.len(), 3, "{edges_json}");
        let e1: Vec<String> = rows.iter().find(|e| e["name"] == "e1").unwrap()["partials"].as_array().unwrap().iter().map(|p| format!("{}:{}", p["round"], p["outcome"].as_str().unwrap())).collect();
        assert_eq!(e1, vec!["1:merged", "2:merged", "2:duplicate", "2:stale", "3:merged"]);
        let e3 = rows.iter().find(|e| e["name"] == "e3").unwrap();
        assert_eq!(e3["partials"].as_array().unwrap().len(), 1, "edge 3 sent round 1 only: {e3}");
    });
}

/// HideNseek across two edges with native training clients: the sign votes are sums, so each
/// edge sends its vote counts and the root takes the majority. The run must learn and upload
/// about a bit per weight.
#[test]
fn hidenseek_votes_across_edges() {
    let (_one, dir) = setup(
        "scale-hns",
        "warn,canopy_server::scale=info,canopy_server::round::run=info",
    );
    let (_nats, url) = nats(&dir);
    let mut config = common::config("scale-hns", 3, 4, "canopy-scale-hns");
    config.run.out_dir = dir.join("runs");
    config.run.min_clients = 4;
    config.strategy.name = "hidenseek".into();
    config.aggregation.rule = Rule::Mean;
    config.aggregation.clip = Clip::None;
    config.aggregation.streaming = true;
    config.scale.nats = url;
    let edge_toml = dir.join("edge.toml");
    std::fs::write(&edge_toml, toml::to_string_pretty(&config).unwrap()).unwrap();
    config.scale.role = Role::Root;
    let mut children = Vec::new();
    let mut ports = Vec::new();
    for k in 0..2 {
        let (edge, port) = spawn_edge(&edge_toml, &dir, &format!("h{}", k + 1), (k, 2));
        children.push(edge);
        ports.push(port);
    }
    for p in &ports {
        wait_port(*p, "an edge");
    }
    for p in &ports {
        let sim = Command::new(env!("CARGO_BIN_EXE_canopy"))
            .args([
                "sim",
                "--url",
                &format!("ws://127.0.0.1:{p}/ws"),
                "--clients",
                "2",
                "--name",
                &format!("sim{p}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting native clients");
        children.push(Kill(sim));
    }
    common::runtime().block_on(async move {
        let running = canopy_server::start(config).await.expect("the root starts");
        let app = running.app.clone();
        tokio::time::timeout(Duration::from_secs(300), running.rounds)
            .await
            .expect("the run ends")
            .unwrap();
        let records = app.hub.lock().unwrap().rounds().to_vec();
        assert_eq!(
            records.iter().map(|r| r.results).collect::<Vec<_>>(),
            vec![4, 4, 4],
            "every client's votes in every round"
        );
        for r in &records {
            let bits = r
                .extra
                .get(canopy_core::metric_keys::UPLOAD_BITS_PER_WEIGHT)
                .copied()
                .unwrap_or(f64::NAN);
            assert!(
                bits > 0.0 && bits <= 1.1,
                "round {}: {bits} bits per weight up",
                r.round
            );
        }
        let last = records.last().unwrap().test_accuracy;
        assert!(
            last > 0.25,
            "signs learned across edges: accuracy {last} after 3 rounds (chance 0.1)"
        );
        println!(
            "hidenseek across 2 edges: accuracy {:?}",
            records.iter().map(|r| r.test_accuracy).collect::<Vec<_>>()
        );
    });
    drop(children);
}

/// A NATS server that requires TLS (with `cert` and `key`) and knows only NKey users `users`.
fn nats_secured(dir: &Path, cert: &Path, key: &Path, users: &[String]) -> (Kill, String) {
    let port = free_port();
    let users: Vec<String> = users
        .iter()
        .map(|u| format!("    {{ nkey: \"{u}\" }}"))
        .collect();
    let conf = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\nauthorization {{\n  users = [\n{}\n  ]\n}}\n",
        dir.join("js").display(),
        cert.display(),
        key.display(),
        users.join("\n")
    );
    let conf_path = dir.join("nats.conf");
    std::fs::write(&conf_path, conf).unwrap();
    start_nats(dir, port, ["-c".into(), conf_path.into_os_string()])
}

/// Edges authenticated end to end: NATS over TLS (a CA and server certificate made here) with
/// NKey users only. Root and edge connect with their NKeys and trust the CA; the edge signs its
/// partials with its NKey and the root checks each against `[scale] edge_keys`. A server with no
/// credentials is refused by NATS; partials that a NATS user the root does not list (a rogue)
/// sent, or that are unsigned, or whose contents were changed after signing, are refused and
/// shown on the root's dashboard, while the edge's own are merged. The edge's reports of its
/// clients are signed too: forged ones (unsigned, signed by the rogue, changed, replayed, or
/// from an edge that is not listed) are refused and counted, and the root never samples the
/// client they make up.
#[test]
fn edges_over_tls_with_nkeys_sign_their_partials() {
    let (_one, dir) = setup("scale-auth", "warn,canopy_server::scale=info");

    // Certificates: a CA, and the NATS server's certificate for 127.0.0.1 signed by it.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Canopy test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
    let (ca_pem, cert_pem, key_pem) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server-key.pem"),
    );
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&cert_pem, server_cert.pem()).unwrap();
    std::fs::write(&key_pem, server_key.serialize_pem()).unwrap();

    // NKeys: the root's, the edge's, and a rogue that NATS lets in but the root does not list.
    let (root_key, edge_key, rogue_key) = (
        nkeys::KeyPair::new_user(),
        nkeys::KeyPair::new_user(),
        nkeys::KeyPair::new_user(),
    );
    let seed_file = |name: &str, k: &nkeys::KeyPair| {
        let p = dir.join(format!("{name}.nk"));
        std::fs::write(&p, k.seed().unwrap()).unwrap();
        p
    };
    let (root_seed, edge_seed) = (seed_file("root", &root_key), seed_file("edge", &edge_key));
    let (_nats, url) = nats_secured(
        &dir,
        &cert_pem,
        &key_pem,
        &[
            root_key.public_key(),
            edge_key.public_key(),
            rogue_key.public_key(),
        ],
    );

    let run = "scale-auth";
    let mut config = common::config(run, 3, 2, "canopy-scale-auth");
    config.run.out_dir = dir.join("runs");
    config.run.min_clients = 2;
    config.strategy.config.deadline_ms = 60_000;
    config.scale.nats = url.clone();
    config.scale.tls_ca = Some(ca_pem.clone());
    config.scale.edge_timeout_ms = 4_000;

    // No credentials: NATS refuses the connection, and the server says why.
    let refused = common::runtime().block_on(canopy_server::scale::Link::connect(
        &config.scale,
        run,
        "no one",
        Duration::from_secs(5),
    ));
    let refused = refused
        .err()
        .expect("a server without credentials must be refused");
    assert!(refused.contains("refused this server"), "{refused}");

    config.scale.nkey_file = Some(edge_seed);
    let edge_toml = dir.join("edge.toml");
    std::fs::write(&edge_toml, toml::to_string_pretty(&config).unwrap()).unwrap();
    config.scale.role = Role::Root;
    config.scale.nkey_file = Some(root_seed);
    config.scale.edge_keys = BTreeMap::from([("a1".to_string(), edge_key.public_key())]);

    let (_edge, port) = spawn_edge(&edge_toml, &dir, "a1", (0, 1));
    wait_port(port, "the edge");
    let sim = Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args([
            "sim",
            "--url",
            &format!("ws://127.0.0.1:{port}/ws"),
            "--clients",
            "2",
            "--name",
            "auth",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting native clients");
    let _sim = Kill(sim);

    let rogue_seed = rogue_key.seed().unwrap();
    let rogue_pub = rogue_key.public_key();
    common::runtime().block_on(async move {
        let running = canopy_server::start(config)
            .await
            .expect("the root starts over TLS with its NKey");
        let app = running.app.clone();
        // The rogue: a NATS user, so it may publish, but not an edge the root lists.
        let nats = async_nats::ConnectOptions::with_nkey(rogue_seed)
            .require_tls(true)
            .add_root_certificates(ca_pem)
            .connect(&url)
            .await
            .expect("the rogue is a NATS user");
        let js = async_nats::jetstream::new(nats.clone());
        let subject = format!("canopy.{run}.partial.1.a1");
        let mut partials = nats.subscribe(subject.clone()).await.unwrap();
        let report_subject = format!("canopy.{run}.presence.a1");
        let mut reports = nats.subscribe(report_subject.clone()).await.unwrap();
        let edge_pub = edge_key.public_key();
        let forged = tokio::spawn(async move {
            let m = partials.next().await.unwrap();
            let wire::Envelope::Inline(bytes) = wire::decode(&m.payload, "a partial").unwrap()
            else {
                panic!("a small partial travels inline")
            };
            let real: wire::Partial = wire::decode(&bytes, "a partial").unwrap();
            assert_eq!(
                real.signer,
                edge_key.public_key(),
                "the edge signs with its NKey"
            );
            let send = |p: wire::Partial, tag: &str| {
                let (js, subject) = (js.clone(), subject.clone());
                let id = format!("{}-{tag}", p.msg_id());
                async move {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Msg-Id", id.as_str());
                    js.publish_with_headers(
                        subject,
                        h,
                        wire::encode(&wire::Envelope::Inline(wire::encode(&p))).into(),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                }
            };
            // Unsigned; signed by the rogue's key; and the real signature on a changed weight.
            send(
                wire::Partial {
                    signer: String::new(),
                    signature: Vec::new(),
                    ..real.clone()
                },
                "unsigned",
            )
            .await;
            let mut rogue = real.clone();
            rogue.sign(&rogue_key).unwrap();
            send(rogue, "rogue").await;
            send(
                wire::Partial {
                    weight: real.weight * 1e6,
                    ..real.clone()
                },
                "tampered",
            )
            .await;

            // The edge's reports: a real one, as signed; then forged ones listing a client that
            // does not exist (the root would send it a task and wait for it until the deadline).
            let real: wire::Presence =
                wire::decode(&reports.next().await.unwrap().payload, "a report").unwrap();
            let listed = BTreeMap::from([("a1".to_string(), edge_pub)]);
            real.verify(&listed).expect("the edge signs its reports");
            let ghost = wire::Presence {
                idle: vec![(424_242, 1_000)],
                seq: real.seq + 1_000_000,
                signer: String::new(),
                signature: Vec::new(),
                ..real.clone()
            };
            let mut rogue = ghost.clone();
            rogue.sign(&rogue_key).unwrap();
            let tampered = wire::Presence {
                idle: ghost.idle.clone(),
                ..real.clone()
            };
            for (subject, p) in [
                (report_subject.clone(), ghost.clone()),
                (report_subject.clone(), rogue),
                (report_subject.clone(), tampered),
                (report_subject.clone(), real),
                (
                    format!("canopy.{run}.presence.ghost"),
                    wire::Presence {
                        edge: "ghost".into(),
                        ..ghost
                    },
                ),
            ] {
                nats.publish(subject, wire::encode(&p).into())
                    .await
                    .unwrap();
            }
            nats.flush().await.unwrap();
        });
        tokio::time::timeout(Duration::from_secs(300), running.rounds)
            .await
            .expect("the run ends")
            .unwrap();
        forged.await.unwrap();
        // The forged reports were sent before the run ended; the root may still be reading them.
        let waited = Instant::now();
        while app.hub.lock().unwrap().tally().reports_refused() < 5
            && waited.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let records = app.hub.lock().unwrap().rounds().to_vec();
        assert_eq!(
            records.iter().map(|r| r.results).collect::<Vec<_>>(),
            vec![2, 2, 2],
            "the edge's partials count"
        );
        let edges = app.hub.lock().unwrap().edges_json();
        let outcomes: Vec<String> = edges.as_array().unwrap()[0]["partials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["outcome"].as_str().unwrap().to_string())
            .collect();
        println!("{outcomes:?}");
        assert_eq!(
            outcomes.iter().filter(|o| *o == "merged").count(),
            3,
            "{outcomes:?}"
        );
        let a1 = &edges.as_array().unwrap()[0];
        assert_eq!(
            edges.as_array().unwrap().len(),
            1,
            "a forged report makes no edge: {edges}"
        );
        assert_eq!(
            a1["reports_refused"], 4,
            "unsigned, the rogue's, changed, replayed: {a1}"
        );
        assert_eq!(app.hub.lock().unwrap().tally().reports_refused(), 5);
        assert!(
            records.iter().all(|r| r.dropped == 0 && r.sampled == 2),
            "the made-up client was never sampled"
        );
        for needle in [
            "refused: unsigned",
            &format!("refused: signed by {rogue_pub}, not by edge 'a1''s key"),
            "refused: wrongly signed",
        ] {
            assert!(
                outcomes.iter().any(|o| o.starts_with(needle)),
                "no partial '{needle}' among {outcomes:?}"
            );
        }
    });
}

/// A synthetic client that answers every task at once, except round `late_round`'s: that one
/// after `delay` (past the deadline). Sends its edge-local id once welcomed.
/// How long every client of the late-result test takes with a task after round 1 (the late
/// one).
const LATER_ROUNDS_PACE: Duration = Duration::from_millis(800);

async fn late_client(
    url: String,
    name: String,
    late_round: Option<u32>,
    delay: Duration,
    id_out: tokio::sync::mpsc::UnboundedSender<u64>,
) {
    let (mut sink, mut stream) = joined(&url, name).await;
    let (mut samples, mut id) = (1, 0);
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Binary(frame) = msg else {
            continue;
        };
        match decode::<ServerMsg>(&frame) {
            Ok(ServerMsg::Welcome(w)) => {
                samples = (w.shard.train.len() as u64).max(1);
                id = w.client_id;
                let _ = id_out.send(id);
            }
            Ok(ServerMsg::Task(t)) => {
                if Some(t.round) == late_round {
                    tokio::time::sleep(delay).await;
                } else if t.round > 1 {
                    // Later rounds take a while, so that the run is still going when the late
                    // result comes (synthetic answers are instant: three rounds could end first).
                    tokio::time::sleep(LATER_ROUNDS_PACE).await;
                }
                let reply = canopy_server::lab::load::support::synthetic_result(&t, samples, id);
                if sink.send(Message::binary(encode(&reply))).await.is_err() {
                    break;
                }
            }
            Ok(ServerMsg::Bye { .. }) => break,
            _ => {}
        }
    }
}

/// `late_results = "next_round"` on an edge: a result that comes after round 1's deadline goes
/// into the edge's next partial, the root counts it as late (not as one of that round's
/// answers), and it is among the participants of the round it went into, as on one server.
#[test]
fn an_edge_carries_a_late_result_into_its_next_partial() {
    let run = "scale-late";
    let (_one, dir) = setup(run, "warn,canopy_server::scale=info");
    let (_nats, url) = nats(&dir);
    let mut config = common::config(run, 3, 3, "canopy-scale-late");
    config.run.out_dir = dir.join("runs");
    config.run.hold = true;
    config.run.min_clients = 2;
    config.run.late_results = canopy_server::config::LateResults::NextRound;
    config.strategy.config.deadline_ms = 1_500;
    config.aggregation.rule = Rule::Mean;
    config.aggregation.clip = Clip::None;
    config.scale.nats = url;
    config.scale.edge_timeout_ms = 4_000;
    let edge_toml = dir.join("edge.toml");
    std::fs::write(&edge_toml, toml::to_string_pretty(&config).unwrap()).unwrap();
    config.scale.role = Role::Root;
    let (_edge, port) = spawn_edge(&edge_toml, &dir, "e1", (0, 1));
    wait_port(port, "the edge");

    common::runtime().block_on(async move {
        let running = canopy_server::start(config).await.expect("the root starts");
        let app = running.app.clone();
        let (tx, mut ids) = tokio::sync::mpsc::unbounded_channel();
        let ws = format!("ws://127.0.0.1:{port}/ws");
        let mut clients = Vec::new();
        for i in 0..3 {
            // The first to join is the slow one.
            let late = (i == 0).then_some(1);
            clients.push(tokio::spawn(late_client(
                ws.clone(),
                format!("late-{i}"),
                late,
                Duration::from_millis(2_500),
                tx.clone(),
            )));
            if i == 0 {
                ids.recv().await.unwrap();
            }
        }
        let slow = {
            // The slow one joined first: ids are given in order, so it has the smallest.
            let until = Instant::now() + Duration::from_secs(60);
            loop {
                let idle = app
                    .hub
                    .lock()
                    .unwrap()
                    .edge_idle_clients(Duration::from_secs(4));
                if idle.len() == 3 {
                    break idle.iter().map(|c| c.id).min().unwrap();
                }
                assert!(
                    Instant::now() < until,
                    "{} clients idle on the root's view",
                    idle.len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        app.hub.lock().unwrap().start().unwrap();
        tokio::time::timeout(Duration::from_secs(120), running.rounds)
            .await
            .expect("the run ends")
            .unwrap();
        let records = app.hub.lock().unwrap().rounds().to_vec();
        let late = |r: &canopy_server::round::record::RoundRecord| {
            r.extra.get("late_results").copied().unwrap_or(0.0)
        };
        for r in &records {
            println!(
                "round {}: sampled {} results {} dropped {} late {} participants {:?}",
                r.round,
                r.sampled,
                r.results,
                r.dropped,
                late(r),
                r.participants
            );
        }
        assert_eq!(records.len(), 3);
        assert_eq!(
            (records[0].sampled, records[0].results, records[0].dropped),
            (3, 2, 1),
            "round 1: the slow client misses the deadline"
        );
        assert!(!records[0].participants.contains(&slow));
        let carried: Vec<_> = records[1..].iter().filter(|r| late(r) == 1.0).collect();
        assert_eq!(
            carried.len(),
            1,
            "the late result goes into exactly one later round"
        );
        let r = carried[0];
        assert!(r.participants.contains(&slow), "{:?}", r.participants);
        assert_eq!(
            (r.results, r.dropped),
            (r.sampled + 1, 0),
            "a late result is no answer of its round's tasks"
        );
        for c in clients {
            c.abort();
        }
    });
}
