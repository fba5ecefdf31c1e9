//! `canopy load`: the server alone under many clients. Thousands of lightweight protocol
//! clients (tokio tasks, not threads, in this process) join a real `canopy serve` started as a
//! child process, and answer every task at once with a synthetic, valid update (no training).
//! The server's peak resident memory (VmHWM) and CPU time are read from /proc, so the figures are
//! the server's own, not the load generator's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use canopy_core::metric_keys as keys;
use canopy_core::partition::Partition;
use canopy_core::protocol::{Backend, Blob, ClientMetrics, ClientMsg, DeviceInfo, Hello, PROTOCOL_VERSION, Params, ServerMsg, TaskResult, Update, UploadSpec, decode, encode};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::config::Config;
use crate::metrics::RoundRecord;

#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    /// Client counts, one server run each (per aggregation mode).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub clients: Vec<usize>,
    /// Aggregation modes to compare: streaming, buffered.
    #[arg(long, value_delimiter = ',', default_value = "streaming,buffered")]
    pub modes: Vec<String>,
    /// Rounds per run; the first is warm-up, the figures are over the rest.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// fedavg (weights up) or fedavgm (deltas up).
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    /// At most this many clients sampled per round (FedAvg's C = min(1, sample / clients)).
    #[arg(long, default_value_t = 1000)]
    pub sample: usize,
    /// Skip buffered runs of this many clients or more (their memory grows with clients × model).
    #[arg(long, default_value_t = 100_000)]
    pub buffered_max: usize,
    /// Also spread the clients over this many edge servers federated through a local
    /// nats-server (a root runs the rounds), one run per count; e.g. `--edges 3`.
    #[arg(long, value_delimiter = ',')]
    pub edges: Vec<usize>,
    /// Folder for the runs' configs, logs and metrics.
    #[arg(long, default_value = "runs/load")]
    pub out: PathBuf,
}

/// One server run's figures.
#[derive(Clone, Debug, Default)]
pub struct LoadRow {
    pub mode: String,
    pub clients: usize,
    pub sampled: f64,
    /// Seconds until every client had joined and been welcomed.
    pub join_s: f64,
    /// Mean wall time of the measured rounds (tasks out to new model).
    pub round_s: f64,
    /// The server process's CPU time (user + system) per measured round.
    pub server_cpu_s: f64,
    /// The round loop's own work per round: send + fold + aggregate, milliseconds.
    pub loop_ms: f64,
    pub peak_rss_mb: f64,
    /// Frames per second through the server in a round (tasks out + results in).
    pub frames_per_s: f64,
    pub wait_p50_ms: f64,
    pub wait_p99_ms: f64,
    pub results: f64,
    pub errors: usize,
}

pub async fn run(args: LoadArgs) -> Result<Vec<LoadRow>, String> {
    raise_fd_limit();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for &n in &args.clients {
        for mode in &args.modes {
            if mode == "buffered" && n >= args.buffered_max {
                println!("skipping {n} clients buffered (--buffered-max {})", args.buffered_max);
                continue;
            }
            let row = one(&exe, &args, n, mode).await?;
            print_rows(std::slice::from_ref(&row));
            rows.push(row);
        }
    }
    let mut spread = Vec::new();
    for &n in &args.clients {
        for &k in args.edges.iter().filter(|k| **k > 0) {
            let row = crate::load_edges::one(&exe, &args, n, k).await?;
            crate::load_edges::print_rows(std::slice::from_ref(&row));
            spread.push(row);
        }
    }
    println!();
    print_rows(&rows);
    print_ratios(&rows);
    if !spread.is_empty() {
        println!();
        crate::load_edges::print_rows(&spread);
        for e in &spread {
            if let Some(s) = rows.iter().find(|r| r.mode == "streaming" && r.clients == e.clients) {
                println!(
                    "{} clients over {} edges / one server: round time {:.2}×, busiest server's CPU per round {:.2}× (root {:.2} s, each edge {:.2} s, one server {:.2} s)",
                    e.clients, e.edges, e.round_s / s.round_s.max(1e-9), e.root_cpu_s.max(e.edge_cpu_s) / s.server_cpu_s.max(1e-9), e.root_cpu_s, e.edge_cpu_s, s.server_cpu_s
                );
            }
        }
    }
    Ok(rows)
}

/// The config of one load run: every client sampled (by default), nothing held back by limits
/// meant for the open internet, deadlines long enough that no result is late.
pub fn load_config(args: &LoadArgs, n: usize, mode: &str, port: u16, out: &Path) -> Result<Config, String> {
    let mut c = Config::default();
    c.model = args.model.clone();
    c.run.rounds = args.rounds;
    c.run.min_clients = n;
    c.run.min_results = 1;
    c.run.linger = true;
    c.run.goodbye_seconds = 0.5;
    c.run.name = Some(format!("{}-{n}-{mode}", args.strategy));
    c.run.out_dir = out.to_path_buf();
    c.data.partition = Partition::Iid;
    // Welcome frames carry a client's shard: keep them small, the data is not what is measured.
    c.data.shards = 100.min(n).max(1);
    c.data.max_train = 20 * c.data.shards;
    c.data.max_test = 200;
    c.data.validation = 0.0;
    c.strategy.name = args.strategy.clone();
    c.strategy.config.fraction = (args.sample as f64 / n as f64).min(1.0);
    c.strategy.config.deadline_ms = 600_000;
    c.aggregation.streaming = match mode {
        "streaming" => true,
        "buffered" => false,
        other => return Err(format!("unknown mode '{other}' (streaming, buffered)")),
    };
    c.limits.max_connections = n + 100;
    c.limits.hello_timeout_ms = 120_000;
    c.server.bind = "127.0.0.1".into();
    c.server.port = port;
    Ok(c)
}

async fn one(exe: &Path, args: &LoadArgs, n: usize, mode: &str) -> Result<LoadRow, String> {
    let port = free_port()?;
    let out = std::path::absolute(&args.out).map_err(|e| e.to_string())?;
    let config = load_config(args, n, mode, port, &out)?;
    let run_dir = out.join(config.run.name.as_deref().unwrap_or("load"));
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    let _ = std::fs::remove_file(run_dir.join("metrics.json"));
    let config_path = run_dir.join("load.toml");
    std::fs::write(&config_path, toml::to_string_pretty(&config).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(run_dir.join("server.log")).map_err(|e| e.to_string())?;
    println!("{mode}, {n} clients: server on port {port}, log in {}", run_dir.join("server.log").display());
    let mut child = tokio::process::Command::new(exe)
        .args(["serve", "--config"])
        .arg(&config_path)
        // One log line per join would cost the server more than the join itself.
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting the server: {e}"))?;
    let pid = child.id().ok_or("server exited at once")?;
    let url = format!("ws://127.0.0.1:{port}/ws");
    wait_for_port(port, &mut child).await?;

    let started = Instant::now();
    let welcomed = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    // Connecting thousands at once overflows the listen backlog (and then waits on SYN retries).
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let clients: Vec<_> = (0..n)
        .map(|i| tokio::spawn(client(url.clone(), i, connecting.clone(), welcomed.clone(), errors.clone())))
        .collect();
    let mut join_s = None;
    let mut marks: Vec<(u32, f64)> = Vec::new(); // (rounds done, server CPU seconds)
    let deadline = Instant::now() + Duration::from_secs(3600);
    let records = loop {
        if join_s.is_none() && welcomed.load(Ordering::Relaxed) >= n {
            join_s = Some(started.elapsed().as_secs_f64());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the server exited ({status}); see {}", run_dir.join("server.log").display()));
        }
        let records = read_records(&run_dir);
        let done = records.len() as u32;
        if marks.last().is_none_or(|m| m.0 != done) {
            marks.push((done, cpu_seconds(pid)));
        }
        if done >= args.rounds {
            break records;
        }
        if Instant::now() > deadline {
            return Err("load run took over an hour".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let peak_rss_mb = vm_hwm_kb(pid) as f64 / 1024.0;
    let _ = child.kill().await;
    for c in clients {
        c.abort();
    }
    // CPU between the end of the first round and the end of the last.
    let first = marks.iter().find(|m| m.0 >= 1).copied().unwrap_or((0, 0.0));
    let last = marks.last().copied().unwrap_or((0, 0.0));
    let measured: Vec<&RoundRecord> = records.iter().filter(|r| r.round > first.0).collect();
    let m = measured.len().max(1) as f64;
    let mean = |f: &dyn Fn(&RoundRecord) -> f64| measured.iter().map(|r| f(r)).sum::<f64>() / m;
    let extra = |r: &RoundRecord, k: &str| r.extra.get(k).copied().unwrap_or(0.0);
    Ok(LoadRow {
        mode: mode.to_string(),
        clients: n,
        sampled: mean(&|r| r.sampled as f64),
        join_s: join_s.unwrap_or(f64::NAN),
        round_s: mean(&|r| r.seconds),
        server_cpu_s: (last.1 - first.1) / (last.0 - first.0).max(1) as f64,
        loop_ms: mean(&|r| extra(r, keys::SERVER_SEND_MS) + extra(r, keys::SERVER_FOLD_MS) + extra(r, keys::SERVER_AGGREGATE_MS)),
        peak_rss_mb,
        frames_per_s: mean(&|r| (r.sampled + r.results) as f64 / r.seconds.max(1e-9)),
        wait_p50_ms: mean(&|r| extra(r, keys::SERVER_RESULT_WAIT_P50_MS)),
        wait_p99_ms: mean(&|r| extra(r, keys::SERVER_RESULT_WAIT_P99_MS)),
        results: mean(&|r| r.results as f64),
        errors: errors.load(Ordering::Relaxed),
    })
}

pub async fn wait_for_port(port: u16, child: &mut tokio::process::Child) -> Result<(), String> {
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the server exited before listening ({status})"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the server did not listen within 60 s".into())
}

/// A run's `metrics.json` as the server last wrote it (None before the first write).
pub fn read_metrics(run_dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("metrics.json")).ok()?).ok()
}

/// The finished rounds in a run's `metrics.json`.
pub fn read_records(run_dir: &Path) -> Vec<RoundRecord> {
    read_metrics(run_dir).map(|json| records_of(&json)).unwrap_or_default()
}

/// The finished rounds in a parsed `metrics.json`.
pub fn records_of(json: &serde_json::Value) -> Vec<RoundRecord> {
    json.get("rounds").and_then(|r| serde_json::from_value(r.clone()).ok()).unwrap_or_default()
}

/// A port nothing listens on now, for a child server.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(|e| e.to_string())
}

/// One synthetic client: joins, then answers each task at once with a valid update of the
/// requested kind (the task's weights nudged by a small amount, or that small amount as a delta).
pub async fn client(url: String, i: usize, connecting: Arc<tokio::sync::Semaphore>, welcomed: Arc<AtomicUsize>, errors: Arc<AtomicUsize>) {
    let ws = {
        let _permit = connecting.acquire().await;
        let mut tries = 0;
        loop {
            // Small socket buffers, as the server's: the generator holds thousands of sockets too.
            match tokio_tungstenite::connect_async_with_config(url.as_str(), Some(crate::upgrade::config(64 << 20)), false).await {
                Ok((ws, _)) => break ws,
                Err(e) => {
                    tries += 1;
                    if tries >= 20 {
                        eprintln!("client {i}: could not connect: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    };
    let (mut sink, mut stream) = ws.split();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        name: format!("load-{i}"),
        device: DeviceInfo::new(Backend::Native, "canopy load (synthetic updates)", "canopy-load"),
        resume: None,
        mask_version: None,
    };
    if sink.send(Message::binary(encode(&ClientMsg::Hello(hello)))).await.is_err() {
        errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let (mut samples, mut id) = (1u64, i as u64);
    loop {
        // At most READERS clients read (and hold a task's model in memory) at once; the others'
        // tasks wait in their sockets and the server's queues, as a slow network would keep them.
        // A reader with nothing to read lets go after a moment, so idle clients hold no permit.
        let reading = READERS.acquire().await.expect("never closed");
        let msg = match tokio::time::timeout(Duration::from_millis(50), stream.next()).await {
            Ok(Some(Ok(msg))) => msg,
            Ok(_) => break,
            Err(_) => {
                drop(reading);
                tokio::time::sleep(Duration::from_millis(100 + (i % 400) as u64)).await;
                continue;
            }
        };
        let Message::Binary(frame) = msg else { continue };
        let reply = match decode::<ServerMsg>(&frame) {
            Ok(ServerMsg::Welcome(w)) => {
                samples = (w.shard.train.len() as u64).max(1);
                id = w.client_id;
                welcomed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(ServerMsg::Task(task)) => synthetic_result(&task, samples, id),
            Ok(ServerMsg::Bye { .. }) => break,
            Ok(ServerMsg::Error { message, .. }) => {
                eprintln!("client {i}: server error: {message}");
                errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                eprintln!("client {i}: bad frame: {e}");
                errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        drop(frame);
        // Fragmented as Chromium fragments a tab's upload, so the server reads what it reads from tabs.
        if crate::upgrade::send_frame(&mut sink, encode(&reply).into(), TAB_FRAGMENT).await.is_err() {
            break;
        }
        drop(reading);
    }
}

/// How many synthetic clients of one process read at once (see [`client`]): 10,000 clients each
/// holding a 0.8 MB model and its answer would need 16 GB on the generator's side alone.
static READERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(512);

/// Frame size of a large message sent by a Chromium tab (156: a 0.8 MB message went as
/// 131,000-byte frames on a raw socket).
pub const TAB_FRAGMENT: usize = 131_000;

/// A valid result for `task` without training: weights (the task's, each nudged by ±1e-3, a
/// different pattern per client) or the nudges alone as a delta.
/// The pattern follows the server's client id, so a rerun gives the same updates.
pub fn synthetic_result(task: &canopy_core::protocol::Task, samples: u64, client: u64) -> ClientMsg {
    let n = task.model.arch.num_params();
    let nudge = |j: usize| if (j as u64 + client) % 3 == 0 { 1e-3f32 } else { -1e-3 };
    let update = match (&task.upload, &task.model.params, &task.model.mask) {
        (UploadSpec::Weights, Params::Values(blob), None) => match blob.to_f32() {
            Ok(w) if w.len() == n => Update::Weights(Blob::from_f32(&w.iter().enumerate().map(|(j, v)| v + nudge(j)).collect::<Vec<_>>())),
            _ => return ClientMsg::Error { round: Some(task.round), message: "task model does not decode".into() },
        },
        (UploadSpec::Delta, _, None) => Update::Delta(Blob::from_f32(&(0..n).map(nudge).collect::<Vec<_>>())),
        _ => return ClientMsg::Error { round: Some(task.round), message: "load clients answer unmasked weights and delta tasks only".into() },
    };
    let metrics = ClientMetrics { train_loss: 1.0, epochs: 1, steps: 1, train_seconds: 1e-3, samples_per_sec: samples as f64 * 1e3, ..Default::default() };
    ClientMsg::Result(TaskResult { round: task.round, samples, update, metrics, mask_version: None })
}

/// Thousands of sockets need more file descriptors than the usual soft limit of 1,024: raise it
/// to the hard limit (children, such as the server, inherit it).
pub fn raise_fd_limit() {
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                eprintln!("could not raise the open-file limit to {}", lim.rlim_max);
            }
        }
    }
}

/// Peak resident set size of process `pid` in KiB (VmHWM), 0 if unreadable.
pub fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of process `pid` so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / hz
}

pub fn print_rows(rows: &[LoadRow]) {
    println!("| aggregation | clients | sampled/round | join s | round s | server CPU s/round | loop ms/round (send+fold+aggregate) | peak server RSS MiB | frames/s | result wait p50 / p99 ms | errors |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} / {:.1} | {} |",
            r.mode, r.clients, r.sampled, r.join_s, r.round_s, r.server_cpu_s, r.loop_ms, r.peak_rss_mb, r.frames_per_s, r.wait_p50_ms, r.wait_p99_ms, r.errors
        );
    }
}

/// Streaming against buffered at each client count of the same run.
pub fn print_ratios(rows: &[LoadRow]) {
    for s in rows.iter().filter(|r| r.mode == "streaming") {
        if let Some(b) = rows.iter().find(|r| r.mode == "buffered" && r.clients == s.clients) {
            println!(
                "{} clients: streaming / buffered peak RSS {:.2}× ({:.0} / {:.0} MiB), server CPU per round {:.2}×, round time {:.2}×",
                s.clients, s.peak_rss_mb / b.peak_rss_mb, s.peak_rss_mb, b.peak_rss_mb, s.server_cpu_s / b.server_cpu_s.max(1e-9), s.round_s / b.round_s.max(1e-9)
            );
        }
    }
}
