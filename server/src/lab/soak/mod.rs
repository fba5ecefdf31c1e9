//! `canopy soak`: a run spread over edges, left going for a while under churn and faults, then a
//! report. A local `nats-server -js`, K edges and a root are child processes; thousands of
//! synthetic clients (those of `canopy load`) join the edges, stay a random while, leave (in or
//! between rounds) and come back as new clients; a few hostile ones send poisoned, non-finite,
//! misshapen and undecodable results. Part-way through one edge is killed (SIGKILL) and started
//! again, later the NATS server. At the end every honest result is looked up in the root's
//! rounds: the ones missing must all be explained by a killed process.

pub mod client;
pub mod report;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use canopy_core::metric_keys as keys;
use tokio::process::Child;

use crate::lab::load::edges::{read_root, spawn_logging, start_nats_at};
use crate::lab::load::support::{
    LoadArgs, cpu_seconds, free_port, load_config, raise_fd_limit, vm_hwm_kb, wait_for_port,
};
use crate::scale::{edge_prefix, local_id};
use report::{Accounting, Outage, account, quantile};

#[derive(clap::Args, Clone, Debug)]
pub struct SoakArgs {
    /// How long the soak runs.
    #[arg(long, default_value_t = 20.0)]
    pub minutes: f64,
    /// Synthetic clients in all, hostile ones included (each comes and goes).
    #[arg(long, default_value_t = 2000)]
    pub clients: usize,
    /// Of which this many are hostile (spread over the edges).
    #[arg(long, default_value_t = 6)]
    pub hostile: usize,
    #[arg(long, default_value_t = 3)]
    pub edges: usize,
    /// Clients sampled a round (FedAvg's C = sample / clients).
    #[arg(long, default_value_t = 500)]
    pub sample: usize,
    /// Mean seconds a client stays before it leaves (exponential; at least 5 s).
    #[arg(long, default_value_t = 180.0)]
    pub session_s: f64,
    /// Seconds the killed edge and the killed NATS server stay down.
    #[arg(long, default_value_t = 15.0)]
    pub down_s: f64,
    /// Folder for the run's config, logs, metrics and report.
    #[arg(long, default_value = "runs/soak")]
    pub out: PathBuf,
}

/// The servers' logs: a round or two of lines each, so a soak's faults can be traced.
const LOG: &str = "info";

/// Seconds each round gives its clients (the synthetic ones answer at once).
const DEADLINE_MS: u64 = 20_000;

/// A child process the soak watches: its peak memory and CPU over all its lives.
struct Proc {
    name: String,
    child: Option<Child>,
    lives: u32,
    peak_kb: u64,
    cpu_done: f64,
    cpu_now: f64,
}

impl Proc {
    fn new(name: &str, child: Child) -> Proc {
        Proc {
            name: name.into(),
            child: Some(child),
            lives: 1,
            peak_kb: 0,
            cpu_done: 0.0,
            cpu_now: 0.0,
        }
    }

    fn sample(&mut self) {
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
            self.peak_kb = self.peak_kb.max(vm_hwm_kb(pid));
            let cpu = cpu_seconds(pid);
            if cpu > 0.0 {
                self.cpu_now = cpu;
            }
        }
    }

    /// SIGKILL, as a crash or a pulled plug would end it.
    async fn kill(&mut self) {
        self.sample();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
        self.cpu_done += self.cpu_now;
        self.cpu_now = 0.0;
    }

    fn restarted(&mut self, child: Child) {
        self.child = Some(child);
        self.lives += 1;
    }

    /// Whether it is running; Some(status) when it exited on its own.
    fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            _ => None,
        }
    }
}

pub async fn run(args: SoakArgs) -> Result<(), String> {
    if args.edges == 0 || args.clients == 0 || args.hostile >= args.clients {
        return Err("a soak needs ≥ 1 edge and more clients than hostile ones".into());
    }
    raise_fd_limit();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::path::absolute(&args.out).map_err(|e| e.to_string())?;
    let n = args.clients;
    let load = LoadArgs {
        clients: vec![n],
        modes: vec!["streaming".into()],
        rounds: 1_000_000,
        model: "mlp".into(),
        strategy: "fedavg".into(),
        sample: args.sample,
        buffered_max: 0,
        edges: vec![args.edges],
        out: out.clone(),
    };
    // The load generator's run (the default defence, streamed), with deadlines and edge
    // timeouts of a real deployment, and rounds starting once a quarter of the sample is there.
    let mut config = load_config(&load, n, "streaming", 0, &out)?;
    config.run.name = Some("soak".into());
    config.run.min_clients = (args.sample / 4).max(1);
    config.strategy.config.deadline_ms = DEADLINE_MS;
    config.limits.hello_timeout_ms = 10_000;
    config.data.shards = (100 * args.edges).min(n).max(args.edges);
    config.data.max_train = 20 * config.data.shards;
    config.limits.max_connections = n / args.edges + 200;
    config.scale.edge_timeout_ms = 5_000;
    let run_dir = out.join("soak");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    let nats_port = free_port()?;
    let (nats, url) = start_nats_at(&run_dir, nats_port).await?;
    config.scale.nats = url;
    let toml_path = run_dir.join("soak.toml");
    std::fs::write(
        &toml_path,
        toml::to_string_pretty(&config).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let serve_args = |role: &str, port: u16, edge: Option<usize>| -> Vec<String> {
        let mut a: Vec<String> = [
            "serve",
            "--config",
            &toml_path.display().to_string(),
            "--role",
            role,
            "--port",
            &port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(k) = edge {
            a.extend([
                "--edge-name".into(),
                format!("e{}", k + 1),
                "--edge-shards".into(),
                format!("{k}/{}", args.edges),
            ]);
        }
        a
    };

    let mut procs = vec![Proc::new("nats-server", nats)];
    let mut edge_ports = Vec::new();
    for k in 0..args.edges {
        let port = free_port()?;
        let log = run_dir.join(format!("edge-{}.log", k + 1));
        let mut child = spawn_logging(&exe, &serve_args("edge", port, Some(k)), log, LOG)?;
        wait_for_port(port, &mut child).await?;
        procs.push(Proc::new(&format!("edge e{}", k + 1), child));
        edge_ports.push(port);
    }
    let root_port = free_port()?;
    let mut root = spawn_logging(
        &exe,
        &serve_args("root", root_port, None),
        run_dir.join("root.log"),
        LOG,
    )?;
    wait_for_port(root_port, &mut root).await?;
    procs.push(Proc::new("root", root));

    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shared = Arc::new(client::Shared {
        start: Instant::now(),
        edge_urls: edge_ports
            .iter()
            .map(|p| format!("ws://127.0.0.1:{p}/ws"))
            .collect(),
        sent: Default::default(),
        model: Default::default(),
        joins: Default::default(),
        leaves_mid_round: Default::default(),
        hostile_sent: Default::default(),
        errors: Default::default(),
        last_error: Default::default(),
        stop: stop_rx,
        mean_session_s: args.session_s,
        connecting: tokio::sync::Semaphore::new(256),
    });
    println!(
        "soak: {n} clients ({} hostile) over {} edges for {} min; logs in {}",
        args.hostile,
        args.edges,
        args.minutes,
        run_dir.display()
    );
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let hostile = (i < args.hostile).then(|| client::KINDS[i % client::KINDS.len()]);
            tokio::spawn(client::run(shared.clone(), i, hostile))
        })
        .collect();

    // The faults: the second edge (or the only one) at 35% of the time, NATS at 65%.
    let victim = 1.min(args.edges - 1);
    let mut plan = [
        (
            0.35,
            1 + victim,
            format!("edge e{}", victim + 1),
            vec![victim],
        ),
        (0.65, 0, "NATS".to_string(), (0..args.edges).collect()),
    ]
    .into_iter()
    .map(|(at, proc_at, what, edges)| {
        let down = at * total.as_secs_f64();
        (
            Outage {
                what,
                edges,
                down,
                up: down + args.down_s,
            },
            proc_at,
            false,
            false,
        )
    })
    .collect::<Vec<_>>();
    let mut failure = None;
    while shared.start.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = shared.start.elapsed().as_secs_f64();
        for p in procs.iter_mut() {
            p.sample();
        }
        for (o, at, killed, started) in plan.iter_mut() {
            if !*killed && now >= o.down {
                println!("{:.1} min: killing {}", now / 60.0, o.what);
                procs[*at].kill().await;
                o.down = shared.start.elapsed().as_secs_f64();
                *killed = true;
            } else if *killed && !*started && now >= o.up {
                let child = if *at == 0 {
                    start_nats_at(&run_dir, nats_port).await?.0
                } else {
                    let k = *at - 1;
                    let log = run_dir.join(format!("edge-{}.log", k + 1));
                    let mut c =
                        spawn_logging(&exe, &serve_args("edge", edge_ports[k], Some(k)), log, LOG)?;
                    wait_for_port(edge_ports[k], &mut c).await?;
                    c
                };
                procs[*at].restarted(child);
                o.up = shared.start.elapsed().as_secs_f64();
                *started = true;
                println!("{:.1} min: {} started again", o.up / 60.0, o.what);
            }
        }
        if let Some(p) = procs
            .iter_mut()
            .find_map(|p| p.exited().map(|s| (p.name.clone(), s)))
        {
            failure = Some(format!("{} exited on its own ({})", p.0, p.1));
            break;
        }
    }
    let elapsed = shared.start.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    // Let the last round's results reach the root's record before reading it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for p in procs.iter_mut() {
        p.sample();
    }
    let (records, _) = read_root(&run_dir);
    let generator_kb = vm_hwm_kb(std::process::id());
    for p in procs.iter_mut() {
        p.kill().await;
    }

    let prefixes: Vec<u64> = (0..args.edges)
        .map(|k| edge_prefix(&format!("e{}", k + 1)))
        .collect();
    let merged: HashSet<(u32, usize, u64)> = records
        .iter()
        .flat_map(|r| r.participants.iter().map(move |g| (r.round, *g)))
        .filter_map(|(round, g)| {
            prefixes
                .iter()
                .enumerate()
                .find_map(|(k, p)| local_id(*p, g).map(|l| (round, k, l)))
        })
        .collect();
    let outages: Vec<Outage> = plan.iter().filter(|p| p.2).map(|p| p.0.clone()).collect();
    let sent = shared.sent.lock().unwrap().clone();
    // A result is in flight for up to a deadline and the root's grace after it.
    let window = (DEADLINE_MS + config.scale.grace_ms) as f64 / 1000.0;
    let left_out_rounds: HashSet<u32> = records
        .iter()
        .filter(|r| {
            r.extra
                .get(keys::PARTIALS_LEFT_OUT)
                .is_some_and(|n| *n > 0.0)
        })
        .map(|r| r.round)
        .collect();
    let a = account(&sent, &merged, &left_out_rounds, &outages, window);
    let text = report_text(
        &args,
        &config,
        elapsed,
        &records,
        &a,
        &outages,
        &procs,
        generator_kb,
        &shared,
    );
    println!("\n{text}");
    let path = out.join("soak-report.md");
    std::fs::write(&path, &text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("report written to {}", path.display());
    if let Some(f) = failure {
        return Err(f);
    }
    if !a.unexplained.is_empty() {
        return Err(format!(
            "{} honest results lost with no killed process to blame (first: {:?})",
            a.unexplained.len(),
            a.unexplained.first()
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report_text(
    args: &SoakArgs,
    config: &crate::config::Config,
    elapsed: f64,
    records: &[crate::round::record::RoundRecord],
    a: &Accounting,
    outages: &[Outage],
    procs: &[Proc],
    generator_kb: u64,
    shared: &client::Shared,
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mib = |kb: u64| kb as f64 / 1024.0;
    let secs: Vec<f64> = records.iter().map(|r| r.seconds).collect();
    let _ = writeln!(
        s,
        "Soak of {:.1} min: {} synthetic clients ({} hostile) over {} edges and a root on one machine, \
         {} over NATS JetStream, {} with the default defence, about {} sampled a round, a client staying {:.0} s on average; {}.",
        elapsed / 60.0,
        args.clients,
        args.hostile,
        args.edges,
        config.model,
        config.strategy.name,
        args.sample,
        args.session_s,
        outages
            .iter()
            .map(|o| format!(
                "{} killed at {:.1} min and started again {:.0} s later",
                o.what,
                o.down / 60.0,
                o.up - o.down
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| rounds | rounds/min | round s p50 / p99 / max | retried attempts | sampled clients dropped | results rejected | client visits | left mid-round |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        s,
        "| {} | {:.1} | {:.2} / {:.2} / {:.2} | {} | {} | {} | {} | {} |",
        records.len(),
        records.len() as f64 / (elapsed / 60.0),
        quantile(&secs, 0.5),
        quantile(&secs, 0.99),
        secs.iter().copied().fold(0.0, f64::max),
        records.iter().map(|r| r.retries).sum::<u32>(),
        records.iter().map(|r| r.dropped).sum::<usize>(),
        records.iter().map(|r| r.rejected).sum::<usize>(),
        shared.joins.load(Ordering::Relaxed),
        shared.leaves_mid_round.load(Ordering::Relaxed),
    );
    let _ = writeln!(s);
    let lost: Vec<String> = outages
        .iter()
        .zip(&a.lost_to)
        .map(|(o, n)| format!("{n} ({})", o.what))
        .collect();
    let _ = writeln!(
        s,
        "| honest results sent | in a finished round | lost with a killed process | left out with an honest edge's partial (rounds) | lost otherwise |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    let left_out_rounds = records
        .iter()
        .filter(|r| {
            r.extra
                .get(keys::PARTIALS_LEFT_OUT)
                .is_some_and(|n| *n > 0.0)
        })
        .count();
    let _ = writeln!(
        s,
        "| {} | {} | {} | {} ({left_out_rounds}) | **{}** |",
        a.sent,
        a.merged,
        lost.join(", "),
        a.left_out,
        a.unexplained.len()
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "| process | lives | peak RSS MiB | CPU s |");
    let _ = writeln!(s, "|---|---|---|---|");
    for p in procs {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} |",
            p.name,
            p.lives,
            mib(p.peak_kb),
            p.cpu_done + p.cpu_now
        );
    }
    let _ = writeln!(
        s,
        "| load generator (all clients) | 1 | {:.0} | — |",
        mib(generator_kb)
    );
    let _ = writeln!(s);
    for (o, r) in outages.iter().zip(&a.recovered_after) {
        let _ = writeln!(
            s,
            "- {}: {}",
            o.what,
            match r {
                Some(t) =>
                    format!("a result sent {t:.1} s after its restart is in a finished round"),
                None => "no result sent after its restart reached a finished round".into(),
            }
        );
    }
    let model = shared.model.lock().unwrap();
    let tops: Vec<f32> = model.values().map(|v| v.0).collect();
    let _ = writeln!(
        s,
        "- hostile clients ({}): {} results sent; the model's largest |weight| went {:.4} → {:.4} over {} rounds seen (at most {:.4}); rounds with a weight not finite: {}",
        client::KINDS[..args.hostile.min(client::KINDS.len())].join(", "),
        shared.hostile_sent.load(Ordering::Relaxed),
        tops.first().copied().unwrap_or(f32::NAN),
        tops.last().copied().unwrap_or(f32::NAN),
        tops.len(),
        tops.iter().copied().fold(0.0, f32::max),
        model.values().filter(|v| v.1).count()
    );
    let errors = shared.errors.load(Ordering::Relaxed);
    if errors > 0 {
        let _ = writeln!(
            s,
            "- client-side errors: {errors} (last: {})",
            shared.last_error.lock().unwrap()
        );
    }
    if let Some(first) = a.unexplained.first() {
        let _ = writeln!(s, "- first result lost otherwise: {first:?}");
    }
    s
}
