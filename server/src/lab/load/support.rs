//! What the load runs share: their arguments, the server config they run, the synthetic
//! protocol client, and reading a child process's figures from /proc and its run folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use canopy_core::data::partition::Partition;
use canopy_core::protocol::{
    Backend, Blob, ClientMetrics, ClientMsg, DeviceInfo, Hello, PROTOCOL_VERSION, Params,
    ServerMsg, TaskResult, Update, UploadSpec, decode, encode,
};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::config::Config;
use crate::round::record::RoundRecord;

#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    /// Client counts, one server run each (per aggregation mode).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub clients: Vec<usize>,
    /// Aggregation modes to compare: streaming (the default defence, streamed), mean (the plain
    /// mean, streamed), buffered (the default defence with `streaming = false`).
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

/// The config of one load run: every client sampled (by default), nothing held back by limits
/// meant for the open internet, deadlines long enough that no result is late.
pub fn load_config(
    args: &LoadArgs,
    n: usize,
    mode: &str,
    port: u16,
    out: &Path,
) -> Result<Config, String> {
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
        "mean" => {
            c.aggregation = canopy_core::aggregate::robust::RobustConfig::plain();
            true
        }
        "buffered" => false,
        other => {
            return Err(format!(
                "unknown mode '{other}' (streaming, mean, buffered)"
            ));
        }
    };
    c.limits.max_connections = n + 100;
    c.limits.hello_timeout_ms = 120_000;
    c.server.bind = "127.0.0.1".into();
    c.server.port = port;
    Ok(c)
}

pub async fn wait_for_port(port: u16, child: &mut tokio::process::Child) -> Result<(), String> {
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
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
    read_metrics(run_dir)
        .map(|json| records_of(&json))
        .unwrap_or_default()
}

/// The finished rounds in a parsed `metrics.json`.
pub fn records_of(json: &serde_json::Value) -> Vec<RoundRecord> {
    json.get("rounds")
        .and_then(|r| serde_json::from_value(r.clone()).ok())
        .unwrap_or_default()
}

/// A port nothing listens on now, for a child server.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// One synthetic client: joins, then answers each task at once with a valid update of the
/// requested kind (the task's weights nudged by a small amount, or that small amount as a delta).
pub async fn client(
    url: String,
    i: usize,
    connecting: Arc<tokio::sync::Semaphore>,
    welcomed: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
) {
    let ws = {
        let _permit = connecting.acquire().await;
        let mut tries = 0;
        loop {
            // Small socket buffers, as the server's: the generator holds thousands of sockets too.
            match connect_small(&url).await {
                Ok(ws) => break ws,
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
        device: DeviceInfo::new(
            Backend::Native,
            "canopy load (synthetic updates)",
            "canopy-load",
        ),
        resume: None,
        mask_version: None,
    };
    if sink
        .send(Message::binary(encode(&ClientMsg::Hello(hello))))
        .await
        .is_err()
    {
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
        let Message::Binary(frame) = msg else {
            continue;
        };
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
        if crate::serve::upgrade::send_frame(&mut sink, encode(&reply).into(), TAB_FRAGMENT)
            .await
            .is_err()
        {
            break;
        }
        drop(reading);
    }
}

/// Connects to `url` (`ws://host:port/...`) with a small kernel receive buffer. Every synthetic
/// client's socket lives in the same kernel as the server, whereas a tab's lives on its own
/// machine: 10,000 sockets each autotuned to hold a task they have not read yet (0.8 MB) put the
/// machine's TCP memory under pressure (Linux then drops segments, and retransmissions back off
/// for minutes), which no real population of clients does to a server.
pub(crate) async fn connect_small(
    url: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::Error;
    let host = url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .ok_or_else(|| {
            Error::Url(tokio_tungstenite::tungstenite::error::UrlError::UnsupportedUrlScheme)
        })?;
    let addr = tokio::net::lookup_host(host)
        .await?
        .next()
        .ok_or_else(|| Error::Url(tokio_tungstenite::tungstenite::error::UrlError::NoHostName))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_recv_buffer_size(64 << 10)?;
    let stream = socket.connect(addr).await?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        stream,
        Some(crate::serve::upgrade::config(64 << 20)),
    )
    .await?;
    Ok(ws)
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
pub fn synthetic_result(
    task: &canopy_core::protocol::Task,
    samples: u64,
    client: u64,
) -> ClientMsg {
    let n = task.model.arch.num_params();
    let nudge = |j: usize| {
        if (j as u64 + client).is_multiple_of(3) {
            1e-3f32
        } else {
            -1e-3
        }
    };
    let update = match (&task.upload, &task.model.params, &task.model.mask) {
        (UploadSpec::Weights, Params::Values(blob), None) => match blob.to_f32() {
            Ok(w) if w.len() == n => Update::Weights(Blob::from_f32(
                &w.iter()
                    .enumerate()
                    .map(|(j, v)| v + nudge(j))
                    .collect::<Vec<_>>(),
            )),
            _ => {
                return ClientMsg::Error {
                    round: Some(task.round),
                    message: "task model does not decode".into(),
                };
            }
        },
        (UploadSpec::Delta | UploadSpec::ClippedDelta { .. }, _, None) => {
            Update::Delta(Blob::from_f32(&(0..n).map(nudge).collect::<Vec<_>>()))
        }
        _ => {
            return ClientMsg::Error {
                round: Some(task.round),
                message: "load clients answer unmasked weights and delta tasks only".into(),
            };
        }
    };
    let metrics = ClientMetrics {
        train_loss: 1.0,
        epochs: 1,
        steps: 1,
        train_seconds: 1e-3,
        samples_per_sec: samples as f64 * 1e3,
        ..Default::default()
    };
    ClientMsg::Result(TaskResult {
        round: task.round,
        samples,
        update,
        metrics,
        mask_version: None,
    })
}

/// Thousands of sockets need more file descriptors than the usual soft limit of 1,024: raise it
/// to the hard limit (children, such as the server, inherit it).
pub fn raise_fd_limit() {
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
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
