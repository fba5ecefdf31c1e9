//! One server under the load: a `canopy serve` child process, its figures as one row.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use canopy_core::metric_keys as keys;

use crate::round::record::RoundRecord;

use super::support::{
    LoadArgs, client, cpu_seconds, free_port, load_config, read_records, vm_hwm_kb, wait_for_port,
};

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

pub async fn one(exe: &Path, args: &LoadArgs, n: usize, mode: &str) -> Result<LoadRow, String> {
    let port = free_port()?;
    let out = std::path::absolute(&args.out).map_err(|e| e.to_string())?;
    let config = load_config(args, n, mode, port, &out)?;
    let run_dir = out.join(config.run.name.as_deref().unwrap_or("load"));
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    let _ = std::fs::remove_file(run_dir.join("metrics.json"));
    let config_path = run_dir.join("load.toml");
    std::fs::write(
        &config_path,
        toml::to_string_pretty(&config).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(run_dir.join("server.log")).map_err(|e| e.to_string())?;
    println!(
        "{mode}, {n} clients: server on port {port}, log in {}",
        run_dir.join("server.log").display()
    );
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
        .map(|i| {
            tokio::spawn(client(
                url.clone(),
                i,
                connecting.clone(),
                welcomed.clone(),
                errors.clone(),
            ))
        })
        .collect();
    let mut join_s = None;
    let mut marks: Vec<(u32, f64)> = Vec::new(); // (rounds done, server CPU seconds)
    let deadline = Instant::now() + Duration::from_secs(3600);
    let records = loop {
        if join_s.is_none() && welcomed.load(Ordering::Relaxed) >= n {
            join_s = Some(started.elapsed().as_secs_f64());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the server exited ({status}); see {}",
                run_dir.join("server.log").display()
            ));
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
        loop_ms: mean(&|r| {
            extra(r, keys::SERVER_SEND_MS)
                + extra(r, keys::SERVER_FOLD_MS)
                + extra(r, keys::SERVER_AGGREGATE_MS)
        }),
        peak_rss_mb,
        frames_per_s: mean(&|r| (r.sampled + r.results) as f64 / r.seconds.max(1e-9)),
        wait_p50_ms: mean(&|r| extra(r, keys::SERVER_RESULT_WAIT_P50_MS)),
        wait_p99_ms: mean(&|r| extra(r, keys::SERVER_RESULT_WAIT_P99_MS)),
        results: mean(&|r| r.results as f64),
        errors: errors.load(Ordering::Relaxed),
    })
}

pub fn print_rows(rows: &[LoadRow]) {
    println!(
        "| aggregation | clients | sampled/round | join s | round s | server CPU s/round | loop ms/round (send+fold+aggregate) | peak server RSS MiB | frames/s | result wait p50 / p99 ms | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} / {:.1} | {} |",
            r.mode,
            r.clients,
            r.sampled,
            r.join_s,
            r.round_s,
            r.server_cpu_s,
            r.loop_ms,
            r.peak_rss_mb,
            r.frames_per_s,
            r.wait_p50_ms,
            r.wait_p99_ms,
            r.errors
        );
    }
}

/// Streaming against buffered at each client count of the same run.
pub fn print_ratios(rows: &[LoadRow]) {
    for s in rows.iter().filter(|r| r.mode == "streaming") {
        if let Some(b) = rows
            .iter()
            .find(|r| r.mode == "buffered" && r.clients == s.clients)
        {
            println!(
                "{} clients: streaming / buffered peak RSS {:.2}× ({:.0} / {:.0} MiB), server CPU per round {:.2}×, round time {:.2}×",
                s.clients,
                s.peak_rss_mb / b.peak_rss_mb,
                s.peak_rss_mb,
                b.peak_rss_mb,
                s.server_cpu_s / b.server_cpu_s.max(1e-9),
                s.round_s / b.round_s.max(1e-9)
            );
        }
    }
}
