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
pub mod config_reference;
pub mod datasets;
pub mod hub;
pub mod lab;
pub mod round;
pub mod scale;
pub mod serve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use canopy_core::data::Dataset;
use canopy_core::data::partition::Shard;
use canopy_core::model::arch::Arch;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::RunInfo;
use canopy_core::strategy::Strategy;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedSender;

use config::Config;
use hub::Hub;
use round::exchange::Desk;
use round::inbox::Incoming;
use round::record::RoundRecord;
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
    let seed = config.run.seed;
    let data = load_data(&config)?;
    let (mut strategy, mut global) = build_model(&config, &data.train)?;
    if strategy.needs_validation() && data.validation.is_empty() {
        return Err(format!(
            "strategy '{}' as configured decides on the server's validation split, which is empty: \
             set data.validation above 0 (it is {})",
            config.strategy.name, config.data.validation
        ));
    }
    let run_name = config.run.name.clone().unwrap_or_else(timestamp);
    let run_dir = config.run.out_dir.join(&run_name);
    let Resumed { first_round, done } = resume(&config, &run_dir, strategy.as_mut(), &mut global)?;
    write_run_folder(&run_dir, &config)?;
    log_prepared(&config, &data, &global);
    let Data {
        test,
        validation,
        shards,
        ..
    } = data;
    let hub = Arc::new(Mutex::new(Hub::new(
        run_info(&config, &run_name),
        shards,
        done,
        config.run.hold,
        std::time::Duration::from_millis(config.scale.edge_timeout_ms),
    )));
    hub.lock().unwrap().limit_new_ids(
        config.limits.max_new_ids_per_minute,
        config.limits.loopback_exempt,
    );
    if config.data.on_tabs() {
        hub.lock().unwrap().on_tabs(config.data.classes.len());
    }
    let desk = Arc::new(Desk::default());
    let global = Arc::new(Mutex::new(global));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let config_json = serde_json::to_value(&config).map_err(|e| e.to_string())?;
    let (listener, addr) = bind(&config).await?;
    let Web {
        join_urls,
        tls,
        http_redirect,
    } = web_setup(&config, addr).await?;
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
    let link = connect(&config, &run_name).await?;
    let edges = match (&link, config.scale.role) {
        (Some(link), scale::Role::Root) => {
            Some(start_root(&config, link, &hub, first_round).await?)
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
        norm_prior: None,
        edges,
    };
    let rounds = spawn_rounds(round_loop, link, &config, &app, addr);
    Ok(Running {
        addr,
        run_dir,
        app,
        rounds,
    })
}

/// The run's data: the clients' shards and the server's own validation and test sets.
struct Data {
    /// What the shards were cut from (its shape and classes size the model).
    train: Dataset,
    validation: Dataset,
    test: Dataset,
    shards: Vec<Shard>,
}

/// Loads the dataset and splits it: a test set (the dataset's own, or a share of it), capped
/// training and test sets, a validation share, and the training samples partitioned into shards.
fn load_data(config: &Config) -> Result<Data, String> {
    let c = &config.data;
    let seed = config.run.seed;
    if c.on_tabs() {
        return Ok(tab_data(config));
    }
    let loaded = datasets::load(c)?;
    let (mut train, test) = match loaded.test {
        Some(test) => (loaded.train, test),
        None => loaded.train.split(c.test_fraction, seed),
    };
    if c.max_train > 0 && train.len() > c.max_train {
        train = train.select(&(0..c.max_train).collect::<Vec<_>>());
    }
    let test = cap(test, c.max_test);
    let (train, validation) = train.split(c.validation, seed ^ 0x5eed);
    let shards = c.partition.split(&train, c.shards, c.local_test, seed);
    let shards = edge_shards(config, shards)?;
    Ok(Data {
        train,
        validation,
        test,
        shards,
    })
}

/// A run on the tabs' own data: the server holds none. Every shard is empty, of the model's
/// input shape (28×28 grayscale, as the built-in datasets) and the configured classes; each tab
/// fills its own with the examples it labels and keeps.
fn tab_data(config: &Config) -> Data {
    let empty = Dataset {
        shape: [1, 28, 28],
        classes: config.data.classes.len(),
        images: Vec::new(),
        labels: Vec::new(),
    };
    let shards = (0..config.data.shards)
        .map(|index| Shard {
            index,
            train: empty.clone(),
            test: empty.clone(),
        })
        .collect();
    Data {
        train: empty.clone(),
        validation: empty.clone(),
        test: empty,
        shards,
    }
}

/// Edges of one run hand out disjoint shards of the same split: edge `i` of `n` keeps the shards
/// `k` with `k % n == i`. Any other server keeps them all.
fn edge_shards(config: &Config, shards: Vec<Shard>) -> Result<Vec<Shard>, String> {
    let (scale::Role::Edge, Some([i, n])) = (config.scale.role, config.scale.edge_shards) else {
        return Ok(shards);
    };
    let shards: Vec<Shard> = shards
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
    Ok(shards)
}

/// The strategy, checked against the model it will train, and that model, freshly initialised.
fn build_model(
    config: &Config,
    train: &Dataset,
) -> Result<(Box<dyn Strategy>, ModelState), String> {
    let arch =
        Arch::preset(&config.model, train.shape, train.classes).map_err(|e| e.to_string())?;
    let strategy = config.strategy.build()?;
    strategy.check_model(&arch)?;
    strategy.check_robust(&config.aggregation)?;
    if config.buffered.is_some() {
        strategy.check_buffered().map_err(|e| {
            format!(
                "[buffered] cannot run strategy {}: {e}. FedAvg, FedAvgM, FedProx, FedAdagrad, FedAdam and FedYogi can",
                config.strategy.name
            )
        })?;
    }
    Ok((strategy, ModelState::init(arch, config.run.seed)))
}

/// Where a run starts: after the rounds a resumed run finished, or at round 1.
struct Resumed {
    first_round: u32,
    done: Vec<RoundRecord>,
}

/// With `run.resume`, picks the run up from the checkpoint in its folder: the strategy's state
/// and the global model are loaded, and the rounds it finished are kept. Without one (or with
/// nothing to resume), the run starts afresh.
fn resume(
    config: &Config,
    run_dir: &Path,
    strategy: &mut dyn Strategy,
    global: &mut ModelState,
) -> Result<Resumed, String> {
    let fresh = Resumed {
        first_round: 1,
        done: Vec::new(),
    };
    if !config.run.resume {
        return Ok(fresh);
    }
    let Some((ckpt, rounds)) = round::checkpoint::resume(run_dir)? else {
        tracing::info!(
            "nothing to resume in {}: starting afresh",
            run_dir.display()
        );
        return Ok(fresh);
    };
    strategy.load_state(&ckpt.strategy)?;
    *global = ckpt.global;
    tracing::info!(
        round = ckpt.round,
        "resuming {} after round {}",
        run_dir.display(),
        ckpt.round
    );
    Ok(Resumed {
        first_round: ckpt.round + 1,
        done: rounds,
    })
}

/// Creates the run folder and writes the run's settings into it (`config.toml`).
fn write_run_folder(run_dir: &Path, config: &Config) -> Result<(), String> {
    std::fs::create_dir_all(run_dir).map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    let toml = toml::to_string_pretty(config).map_err(|e| e.to_string())?;
    std::fs::write(run_dir.join("config.toml"), toml).map_err(|e| e.to_string())
}

fn log_prepared(config: &Config, data: &Data, global: &ModelState) {
    tracing::info!(
        dataset = %config.data.dataset, train = data.train.len(), test = data.test.len(),
        shards = data.shards.len(), partition = %config.data.partition, model = %config.model,
        params = global.arch.num_params(), strategy = %config.strategy.name, "run prepared"
    );
}

/// What the run is, for the client page to show.
fn run_info(config: &Config, run_name: &str) -> RunInfo {
    RunInfo {
        run_id: run_name.to_string(),
        strategy: config.strategy.name.clone(),
        model: config.model.clone(),
        dataset: config.data.dataset.clone(),
        partition: if config.data.on_tabs() {
            "each tab's own".into()
        } else {
            config.data.partition.to_string()
        },
        rounds: config.run.rounds,
        classes: config.data.classes.clone(),
    }
}

/// Binds the configured address (port 0: any free port) and says which address it got.
async fn bind(config: &Config) -> Result<(TcpListener, SocketAddr), String> {
    let (host, port) = (config.server.bind.as_str(), config.server.port);
    let send_buffer = config.limits.socket_buffer;
    let listener = if send_buffer == 0 {
        TcpListener::bind((host, port))
            .await
            .map_err(|e| format!("binding {host}:{port}: {e}"))?
    } else {
        // Every accepted connection inherits the listener's socket buffers (Linux). Without a
        // cap the kernel grows each send buffer to hold up to 4 MB of a task its client has not
        // read yet (3.5 GB of kernel memory with 10,000 clients sampled at once, beside the
        // process's own), and each receive buffer up to 32 MB of a result waiting for one of the
        // gate's slots. Capped, a task waits in the client's outbox instead (every client shares
        // the round's one encoding of the model), and a result in the client's own socket.
        let at = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("binding {host}:{port}: {e}"))?
            .next()
            .ok_or_else(|| format!("binding {host}:{port}: no address"))?;
        let socket = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        socket.set_reuseaddr(true).map_err(|e| e.to_string())?;
        socket
            .set_send_buffer_size(send_buffer as u32)
            .and_then(|()| socket.set_recv_buffer_size(send_buffer as u32))
            .map_err(|e| format!("limits.socket_buffer: {e}"))?;
        socket
            .bind(at)
            .map_err(|e| format!("binding {host}:{port}: {e}"))?;
        socket
            .listen(1024)
            .map_err(|e| format!("listening on {host}:{port}: {e}"))?
    };
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    Ok((listener, addr))
}

/// What the bound port serves with: the join URLs (https or http), the certificate, and the
/// plain-http port that redirects to https.
struct Web {
    join_urls: Vec<String>,
    tls: Option<tls::Tls>,
    http_redirect: Option<SocketAddr>,
}

/// The certificate (self-signed for every join address, or the configured files) and the http
/// redirect, once the port is known.
async fn web_setup(config: &Config, addr: SocketAddr) -> Result<Web, String> {
    let server = &config.server;
    let https = server.https();
    let join_urls = lan::join_urls(
        &server.bind,
        addr.port(),
        if https { "https" } else { "http" },
    );
    let hosts: Vec<String> = join_urls.iter().map(|u| tls::url_host(u)).collect();
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
    Ok(Web {
        join_urls,
        tls,
        http_redirect,
    })
}

/// A root or an edge connects to NATS (a single server has no link). Root and edges find each
/// other by the run's name (config validation made sure it is set).
async fn connect(config: &Config, run_name: &str) -> Result<Option<scale::Link>, String> {
    let role = config.scale.role;
    if role == scale::Role::Single {
        return Ok(None);
    }
    let who = format!("canopy {role:?} {run_name}");
    let link = scale::Link::connect(
        &config.scale,
        run_name,
        &who,
        std::time::Duration::from_secs(30),
    )
    .await?;
    Ok(Some(link))
}

/// A root takes no tabs (they are sent to the edges), clears what an earlier run of its name
/// left in the stream unless it resumes, and starts listening to its edges.
async fn start_root(
    config: &Config,
    link: &scale::Link,
    hub: &Arc<Mutex<Hub>>,
    first_round: u32,
) -> Result<scale::root::Edges, String> {
    hub.lock().unwrap().refuse_joins("this server is the root of a run spread over edge servers: open one of the edges' pages to join (see its dashboard)");
    if !config.run.resume {
        // A fresh run: what an earlier run of this name left in the stream is not ours.
        link.stream
            .clone()
            .purge()
            .await
            .map_err(|e| format!("clearing the run's stream: {e}"))?;
    }
    let ms = std::time::Duration::from_millis;
    scale::root::Edges::start(
        link.clone(),
        hub.clone(),
        first_round,
        ms(config.scale.edge_timeout_ms),
        ms(config.scale.grace_ms),
        config.scale.edge_keys.clone(),
    )
    .await
}

/// Runs the rounds in the background: on an edge under its root (named by `scale.edge`, or by
/// its port), elsewhere on their own, in lock-step or (with `[buffered]`) asynchronously.
fn spawn_rounds(
    round_loop: RoundLoop,
    link: Option<scale::Link>,
    config: &Config,
    app: &App,
    addr: SocketAddr,
) -> tokio::task::JoinHandle<()> {
    match (link, config.scale.role) {
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
        _ => match config.buffered.clone() {
            Some(buffered) => tokio::spawn(round::buffered::run(round_loop, buffered)),
            None => tokio::spawn(round_loop.run()),
        },
    }
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
