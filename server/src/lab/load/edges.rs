//! `canopy load --edges K`: the same synthetic clients spread over K edge servers federated
//! through a local `nats-server -js`, with a root running the rounds. Every server is a child
//! process, so each one's memory and CPU are its own; the figures are the root's round time and
//! work, each edge's partial (size, time) and the servers' peak memory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use canopy_core::metric_keys as keys;
use tokio::process::{Child, Command};

use super::support::{
    LoadArgs, client, cpu_seconds, free_port, load_config, read_metrics, records_of, vm_hwm_kb,
    wait_for_port,
};
use crate::scale::Role;

/// One spread-out run's figures.
#[derive(Clone, Debug, Default)]
pub struct EdgeRow {
    pub clients: usize,
    pub edges: usize,
    pub round_s: f64,
    /// The root's own work per round: announcing, fetching and merging partials, aggregating.
    pub root_ms: f64,
    pub root_cpu_s: f64,
    pub root_rss_mb: f64,
    /// Mean over edges and rounds: an edge's time from tasks out to partial published.
    pub edge_round_s: f64,
    pub edge_cpu_s: f64,
    pub edge_rss_mb: f64,
    pub partial_mb: f64,
    pub results: f64,
}

/// A local `nats-server -js` keeping its store in `run_dir/nats` (killed when dropped), and
/// its URL.
pub async fn start_nats(run_dir: &Path) -> Result<(Child, String), String> {
    start_nats_at(run_dir, free_port()?).await
}

/// [`start_nats`] on a given port (a restart keeps its clients' URL and its store).
pub async fn start_nats_at(run_dir: &Path, nats_port: u16) -> Result<(Child, String), String> {
    let nats_bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("nats-server is not installed: `just setup` installs it")?;
    let mut nats = Command::new(nats_bin)
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &nats_port.to_string(),
            "-sd",
        ])
        .arg(run_dir.join("nats"))
        .stdout(Stdio::null())
        .stderr(append(&run_dir.join("nats.log"))?)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting nats-server: {e}"))?;
    wait_for_port(nats_port, &mut nats).await?;
    Ok((nats, format!("nats://127.0.0.1:{nats_port}")))
}

/// `path` opened for appending (created if need be): a restarted process's log follows its
/// first life's.
fn append(path: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

/// A `canopy` child process with `args`, its stderr appended to `log`, killed when dropped;
/// it logs warnings and errors only.
pub fn spawn(exe: &Path, args: &[String], log: PathBuf) -> Result<Child, String> {
    spawn_logging(exe, args, log, "warn")
}

/// [`spawn`] with the log filter `level` (`RUST_LOG`).
pub fn spawn_logging(
    exe: &Path,
    args: &[String],
    log: PathBuf,
    level: &str,
) -> Result<Child, String> {
    Command::new(exe)
        .args(args)
        .env("RUST_LOG", level)
        // The server logs to stdout; panics go to stderr: both into the log.
        .stdout(append(&log)?)
        .stderr(append(&log)?)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))
}

pub async fn one(exe: &Path, args: &LoadArgs, n: usize, edges: usize) -> Result<EdgeRow, String> {
    let out = std::path::absolute(&args.out).map_err(|e| e.to_string())?;
    let mut config = load_config(args, n, "streaming", 0, &out)?;
    let name = format!("{}-{n}-edges{edges}", args.strategy);
    config.run.name = Some(name.clone());
    let run_dir = out.join(&name);
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    // Every edge deals out the same number of shards per client as one server would.
    config.data.shards = (100 * edges).min(n).max(edges);
    config.data.max_train = 20 * config.data.shards;
    config.limits.max_connections = n / edges + 100;
    config.scale.edge_timeout_ms = 10_000;
    let (_nats, nats_url) = start_nats(&run_dir).await?;
    config.scale.nats = nats_url;
    let toml_path = run_dir.join("load.toml");
    std::fs::write(
        &toml_path,
        toml::to_string_pretty(&config).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let base = |role: Role, port: u16| -> Vec<String> {
        let role = match role {
            Role::Root => "root",
            _ => "edge",
        };
        vec![
            "serve".into(),
            "--config".into(),
            toml_path.display().to_string(),
            "--role".into(),
            role.into(),
            "--port".into(),
            port.to_string(),
        ]
    };
    let mut servers = Vec::new();
    let mut edge_ports = Vec::new();
    for k in 0..edges {
        let port = free_port()?;
        let mut a = base(Role::Edge, port);
        a.extend([
            "--edge-name".into(),
            format!("e{}", k + 1),
            "--edge-shards".into(),
            format!("{k}/{edges}"),
        ]);
        let mut child = spawn(exe, &a, run_dir.join(format!("edge-{}.log", k + 1)))?;
        wait_for_port(port, &mut child).await?;
        servers.push(child);
        edge_ports.push(port);
    }
    let root_port = free_port()?;
    let mut root = spawn(exe, &base(Role::Root, root_port), run_dir.join("root.log"))?;
    wait_for_port(root_port, &mut root).await?;
    println!(
        "{n} clients over {edges} edges: logs in {}",
        run_dir.display()
    );

    let welcomed = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let url = format!("ws://127.0.0.1:{}/ws", edge_ports[i % edges]);
            tokio::spawn(client(
                url,
                i,
                connecting.clone(),
                welcomed.clone(),
                errors.clone(),
            ))
        })
        .collect();
    let root_pid = root.id().ok_or("the root exited at once")?;
    let edge_pids: Vec<u32> = servers.iter().filter_map(|c| c.id()).collect();
    let cpu_all = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let mut marks: Vec<(u32, f64, f64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let (records, edges_json) = loop {
        if let Ok(Some(status)) = root.try_wait() {
            return Err(format!(
                "the root exited ({status}); see {}",
                run_dir.join("root.log").display()
            ));
        }
        let (records, edges_json) = read_root(&run_dir);
        let done = records.len() as u32;
        if marks.last().is_none_or(|m| m.0 != done) {
            marks.push((done, cpu_seconds(root_pid), cpu_all(&edge_pids)));
        }
        if done >= args.rounds {
            break (records, edges_json);
        }
        if Instant::now() > deadline {
            return Err("load run took over an hour".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let root_rss_mb = vm_hwm_kb(root_pid) as f64 / 1024.0;
    let edge_rss_mb = edge_pids
        .iter()
        .map(|p| vm_hwm_kb(*p) as f64 / 1024.0)
        .fold(0.0, f64::max);
    for c in clients {
        c.abort();
    }
    drop(servers);
    drop(root);
    let first = marks.iter().find(|m| m.0 >= 1).copied().unwrap_or_default();
    let last = marks.last().copied().unwrap_or_default();
    let measured: Vec<&crate::round::record::RoundRecord> =
        records.iter().filter(|r| r.round > first.0).collect();
    let m = measured.len().max(1) as f64;
    let mean = |f: &dyn Fn(&crate::round::record::RoundRecord) -> f64| {
        measured.iter().map(|r| f(r)).sum::<f64>() / m
    };
    let extra =
        |r: &crate::round::record::RoundRecord, k: &str| r.extra.get(k).copied().unwrap_or(0.0);
    // Each edge's merged partials of the measured rounds.
    let partials: Vec<(f64, f64)> = edges_json
        .iter()
        .flat_map(|e| e["partials"].as_array().cloned().unwrap_or_default())
        .filter(|p| {
            p["outcome"] == "merged" && p["round"].as_u64().is_some_and(|r| r as u32 > first.0)
        })
        .map(|p| {
            (
                p["edge_seconds"].as_f64().unwrap_or(0.0),
                p["sum_bytes"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let pm = partials.len().max(1) as f64;
    let rounds = (last.0 - first.0).max(1) as f64;
    Ok(EdgeRow {
        clients: n,
        edges,
        round_s: mean(&|r| r.seconds),
        root_ms: mean(&|r| {
            extra(r, keys::SERVER_SEND_MS)
                + extra(r, keys::SERVER_FOLD_MS)
                + extra(r, keys::SERVER_AGGREGATE_MS)
        }),
        root_cpu_s: (last.1 - first.1) / rounds,
        root_rss_mb,
        edge_round_s: partials.iter().map(|p| p.0).sum::<f64>() / pm,
        edge_cpu_s: (last.2 - first.2) / rounds / edges as f64,
        edge_rss_mb,
        partial_mb: partials.iter().map(|p| p.1).sum::<f64>() / pm / 1e6,
        results: mean(&|r| r.results as f64),
    })
}

/// The root's finished rounds and its edges' rows (with their partials).
pub fn read_root(
    run_dir: &Path,
) -> (
    Vec<crate::round::record::RoundRecord>,
    Vec<serde_json::Value>,
) {
    let Some(json) = read_metrics(run_dir) else {
        return Default::default();
    };
    let edges = json
        .get("edges")
        .and_then(|e| e.as_array().cloned())
        .unwrap_or_default();
    (records_of(&json), edges)
}

pub fn print_rows(rows: &[EdgeRow]) {
    println!(
        "| clients | edges | results/round | round s | root work ms/round (announce+merge+aggregate) | root CPU s/round | root peak RSS MiB | edge round s | edge CPU s/round | edge peak RSS MiB (max) | partial MB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} |",
            r.clients,
            r.edges,
            r.results,
            r.round_s,
            r.root_ms,
            r.root_cpu_s,
            r.root_rss_mb,
            r.edge_round_s,
            r.edge_cpu_s,
            r.edge_rss_mb,
            r.partial_mb
        );
    }
}
