//! Canopy's aggregator: serves the client page and dashboard, talks to clients over WebSockets
//! and runs the rounds.
//!
//! The rooms: [`serve`] (HTTP, WebSocket sessions, frames out, limits, the admin API, LAN join
//! URLs), [`hub`] (who is connected and the run's public state), [`round`] (the round loop and
//! what it uses: the in-round exchange desk, results in, evaluation, records, checkpoints),
//! [`scale`] (a run spread over edges through NATS), [`lab`] (simulated clients, load, attacks,
//! comparisons and benchmarks: tools around a server, never used by one), and [`config`] and
//! [`datasets`], which every room reads.

pub mod config;
pub mod datasets;
pub mod hub;
pub mod lab;
pub mod round;
pub mod scale;
pub mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use canopy_core::data::Dataset;
use canopy_core::model::arch::Arch;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::RunInfo;
use tokio::sync::mpsc::UnboundedSender;

use config::Config;
use hub::Hub;
use round::exchange::Desk;
use round::inbox::Incoming;
use round::run::RoundLoop;
use serve::{admin, lan, limits, listen, tls, web};

/// State shared by every request handler and the round loop.
pub struct App {
    pub hub: Arc<Mutex<Hub>>,
    pub incoming: UnboundedSender<Incoming>,
    /// In-round requests are answered here, beside the round loop.
    pub desk: Arc<Desk>,
    pub global: Arc<Mutex<ModelState>>,
    pub web_dir: PathBuf,
    pub config_json: serde_json::Value,
    pub run_dir: PathBuf,
    /// Token the dashboard's controls need (never shown in the metrics).
    pub admin_token: String,
    /// Client-page URLs on every usable address, best first (classroom mode).
    pub join_urls: Vec<String>,
    /// Connections counted against the `[limits]`.
    pub limits: Arc<limits::Limits>,
    /// With https: the SHA-256 fingerprint of the certificate (on the dashboard and join page,
    /// so a student can check the certificate they accept) and where it came from.
    pub tls_fingerprint: Option<String>,
    pub tls_origin: Option<String>,
    /// With https and `http_port`: the plain-http address that redirects to https.
    pub http_redirect: Option<SocketAddr>,
}

pub struct Running {
    pub addr: SocketAddr,
    pub run_dir: PathBuf,
    pub app: Arc<App>,
    /// Ends when the last round is done.
    pub rounds: tokio::task::JoinHandle<()>,
}

/// Loads data, builds the model and strategy, binds the port and starts the round loop.
pub async fn start(config: Config) -> Result<Running, String> {
    let loaded = datasets::load(&config.data)?;
    let seed = config.run.seed;
    let (mut train, test) = match loaded.test {
        Some(test) => (loaded.train, test),
        None => loaded.train.split(config.data.test_fraction, seed),
    };
    if config.data.max_train > 0 && train.len() > config.data.max_train {
        train = train.select(&(0..config.data.max_train).collect::<Vec<_>>());
    }
    let test = cap(test, config.data.max_test);
    let (train, validation) = train.split(config.data.validation, seed ^ 0x5eed);
    let mut shards =
        config
            .data
            .partition
            .split(&train, config.data.shards, config.data.local_test, seed);
    if let (scale::Role::Edge, Some([i, n])) = (config.scale.role, config.scale.edge_shards) {
        // Edges of one run hand out disjoint shards of the same split.
        shards = shards
            .into_iter()
            .enumerate()
            .filter(|(k, _)| k % n == i)
            .map(|(_, s)| s)
            .collect();
        if shards.is_empty() {
            return Err(format!(
                "edge shards {i}/{n}: no shard left of {}",
                config.data.shards
            ));
        }
    }
    let arch =
        Arch::preset(&config.model, train.shape, train.classes).map_err(|e| e.to_string())?;
    let mut strategy = config.strategy.build()?;
    strategy.check_model(&arch)?;
    let mut global = ModelState::init(arch, seed);
    let run_name = config.run.name.clone().unwrap_or_else(timestamp);
    let run_dir = config.run.out_dir.join(&run_name);
    let mut first_round = 1;
    let mut done_rounds = Vec::new();
    if config.run.resume {
        match round::checkpoint::resume(&run_dir)? {
            Some((ckpt, rounds)) => {
                strategy.load_state(&ckpt.strategy)?;
                global = ckpt.global;
                first_round = ckpt.round + 1;
                done_rounds = rounds;
                tracing::info!(
                    round = ckpt.round,
                    "resuming {} after round {}",
                    run_dir.display(),
                    ckpt.round
                );
            }
            None => tracing::info!(
                "nothing to resume in {}: starting afresh",
                run_dir.display()
            ),
        }
    }
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    let toml = toml::to_string_pretty(&config).map_err(|e| e.to_string())?;
    std::fs::write(run_dir.join("config.toml"), toml).map_err(|e| e.to_string())?;
    tracing::info!(
        dataset = %config.data.dataset, train = train.len(), test = test.len(), shards = shards.len(),
        partition = %config.data.partition, model = %config.model, params = global.arch.num_params(),
        strategy = %config.strategy.name, "run prepared"
    );
    let info = RunInfo {
        run_id: run_name.clone(),
        strategy: config.strategy.name.clone(),
        model: config.model.clone(),
        dataset: config.data.dataset.clone(),
        partition: config.data.partition.to_string(),
        rounds: config.run.rounds,
    };
    let hub = Arc::new(Mutex::new(Hub::new(
        info,
        shards,
        done_rounds,
        config.run.hold,
    )));
    let desk = Arc::new(Desk::default());
    let global = Arc::new(Mutex::new(global));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let config_json = serde_json::to_value(&config).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind((config.server.bind.as_str(), config.server.port))
        .await
        .map_err(|e| format!("binding {}:{}: {e}", config.server.bind, config.server.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let https = config.server.https();
    let join_urls = lan::join_urls(
        &config.server.bind,
        addr.port(),
        if https { "https" } else { "http" },
    );
    let hosts: Vec<String> = join_urls.iter().map(|u| tls::url_host(u)).collect();
    let server = &config.server;
    let tls = tls::prepare(
        server.tls,
        server.tls_cert.as_deref(),
        server.tls_key.as_deref(),
        &server.state_dir(),
        &hosts,
    )?;
    let http_redirect = match server.http_port {
        Some(port) if https => Some(listen::spawn_redirect(&server.bind, port, addr.port()).await?),
        _ => None,
    };
    let app = Arc::new(App {
        hub: hub.clone(),
        incoming: tx,
        desk: desk.clone(),
        global: global.clone(),
        web_dir: config.server.web_dir.clone(),
        config_json: config_json.clone(),
        run_dir: run_dir.clone(),
        admin_token: config
            .server
            .admin_token
            .clone()
            .unwrap_or_else(admin::random_token),
        join_urls,
        limits: limits::Limits::new(config.limits.clone()),
        tls_fingerprint: tls.as_ref().map(|t| t.fingerprint.clone()),
        tls_origin: tls.as_ref().map(|t| t.origin.clone()),
        http_redirect,
    });
    listen::spawn(listener, web::router(app.clone()), tls);
    // Root and edges find each other by the run's name (config validation made sure it is set).
    let link = match config.scale.role {
        scale::Role::Single => None,
        role => Some(
            scale::Link::connect(
                &config.scale.nats,
                &run_name,
                &format!("canopy {role:?} {run_name}"),
                std::time::Duration::from_secs(30),
            )
            .await?,
        ),
    };
    let edges = match (&link, config.scale.role) {
        (Some(link), scale::Role::Root) => {
            hub.lock().unwrap().refuse_joins("this server is the root of a run spread over edge servers: open one of the edges' pages to join (see its dashboard)");
            if !config.run.resume {
                // A fresh run: what an earlier run of this name left in the stream is not ours.
                link.stream
                    .clone()
                    .purge()
                    .await
                    .map_err(|e| format!("clearing the run's stream: {e}"))?;
            }
            let scale_cfg = &config.scale;
            let ms = std::time::Duration::from_millis;
            Some(
                scale::root::Edges::start(
                    link.clone(),
                    hub.clone(),
                    first_round,
                    ms(scale_cfg.edge_timeout_ms),
                    ms(scale_cfg.grace_ms),
                )
                .await?,
            )
        }
        _ => None,
    };
    let round_loop = RoundLoop {
        hub,
        incoming: rx,
        desk,
        strategy,
        global,
        test: Arc::new(test),
        validation: Arc::new(validation),
        rounds: config.run.rounds,
        min_clients: config.run.min_clients,
        min_results: config.run.min_results,
        seed,
        run_dir: run_dir.clone(),
        config_json,
        first_round,
        robust: config.aggregation.clone(),
        late_results: config.run.late_results,
        goodbye: std::time::Duration::from_secs_f64(config.run.goodbye_seconds.max(0.0)),
        late: Default::default(),
        carried: Vec::new(),
        edges,
    };
    let rounds = match (link, config.scale.role) {
        (Some(link), scale::Role::Edge) => {
            let name = config
                .scale
                .edge
                .clone()
                .unwrap_or_else(|| format!("edge-{}", addr.port()));
            let url = app
                .join_urls
                .first()
                .cloned()
                .unwrap_or_else(|| format!("http://{addr}/"));
            tokio::spawn(scale::edge::run(round_loop, link, name, url))
        }
        _ => tokio::spawn(round_loop.run()),
    };
    Ok(Running {
        addr,
        run_dir,
        app,
        rounds,
    })
}

fn cap(d: Dataset, max: usize) -> Dataset {
    if max == 0 || d.len() <= max {
        return d;
    }
    d.select(&(0..max).collect::<Vec<_>>())
}

fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("run-{secs}")
}
