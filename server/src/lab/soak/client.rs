//! The soak's clients: honest synthetic clients that come and go (a tab opened, closed, opened
//! again), and a few hostile ones. Every result an honest client hands to the kernel is written
//! down with its round and the edge it went to, so the report can look for each one in the
//! root's rounds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_core::protocol::{
    Backend, Blob, ClientMetrics, ClientMsg, DeviceInfo, Hello, PROTOCOL_VERSION, Params,
    ServerMsg, TaskResult, Update, decode, encode,
};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::lab::load::support::{TAB_FRAGMENT, connect_small, synthetic_result};

/// One honest result as its client sent it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sent {
    pub round: u32,
    /// Index of the edge it went to (0-based).
    pub edge: usize,
    /// The id the edge gave the client (its global id is the edge's prefix and this).
    pub local: u64,
    /// Seconds since the soak began.
    pub at: f64,
}

/// What every client task shares with the soak's driver.
pub struct Shared {
    pub start: Instant,
    pub edge_urls: Vec<String>,
    pub sent: Mutex<Vec<Sent>>,
    /// The largest |weight| of each round's model, as a sample of clients received it, and
    /// whether any weight was not finite.
    pub model: Mutex<std::collections::BTreeMap<u32, (f32, bool)>>,
    pub joins: AtomicUsize,
    pub leaves_mid_round: AtomicUsize,
    pub hostile_sent: AtomicUsize,
    pub errors: AtomicUsize,
    pub last_error: Mutex<String>,
    pub stop: tokio::sync::watch::Receiver<bool>,
    pub mean_session_s: f64,
    pub connecting: tokio::sync::Semaphore,
}

impl Shared {
    fn since(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap() = e;
    }
}

/// splitmix64: each client's own reproducible random numbers.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) from a seed.
fn unit(seed: u64) -> f64 {
    (mix(seed) >> 11) as f64 / (1u64 << 53) as f64
}

/// How a hostile client misbehaves; client `i` of the hostile ones is `KINDS[i % 5]`.
pub const KINDS: [&str; 5] = [
    "constant:1e6",
    "sign-flip:10",
    "nan",
    "wrong-length",
    "garbage-frame",
];

/// Client `i` until the soak stops: joins edge `i % edges`, stays for a random time (exponential,
/// mean `mean_session_s`), leaves (closing its socket, in or between rounds), comes back after
/// 1–10 s as a new client. A server going away is waited out; so is a refusal.
pub async fn run(shared: Arc<Shared>, i: usize, hostile: Option<&'static str>) {
    let edge = i % shared.edge_urls.len();
    let mut visit = 0u64;
    let mut stop = shared.stop.clone();
    while !*stop.borrow() {
        visit += 1;
        let seed = mix((i as u64) << 20 ^ visit);
        // Exponential stay: −mean·ln(u), at least 5 s.
        let stay = (-shared.mean_session_s * (1.0 - unit(seed)).ln()).max(5.0);
        let until = Instant::now() + Duration::from_secs_f64(stay);
        let ended = tokio::select! {
            r = session(&shared, i, edge, until, hostile) => r,
            _ = stop.changed() => return,
        };
        if let Err(e) = ended {
            shared.error(format!("client {i}: {e}"));
        }
        let pause = 1.0 + 9.0 * unit(seed ^ 0xA5A5);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(pause)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One visit: Ok when it ended as planned (its time was up, or the server closed it), Err with
/// what went wrong otherwise. A server that cannot be reached is retried every second.
async fn session(
    shared: &Shared,
    i: usize,
    edge: usize,
    until: Instant,
    hostile: Option<&'static str>,
) -> Result<(), String> {
    let url = &shared.edge_urls[edge];
    let ws = loop {
        let got = {
            let _permit = shared.connecting.acquire().await;
            connect_small(url).await
        };
        match got {
            Ok(ws) => break ws,
            // The edge is down (killed for the soak) or refusing: try again, as a tab reconnects.
            Err(_) if Instant::now() < until => tokio::time::sleep(Duration::from_secs(1)).await,
            Err(_) => return Ok(()),
        }
    };
    let (mut sink, mut stream) = ws.split();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        name: format!("soak-{i}"),
        device: DeviceInfo::new(
            Backend::Native,
            "canopy soak (synthetic updates)",
            "canopy-soak",
        ),
        resume: None,
        mask_version: None,
    };
    sink.send(Message::binary(encode(&ClientMsg::Hello(hello))))
        .await
        .map_err(|e| format!("hello: {e}"))?;
    let (mut samples, mut local) = (1u64, 0u64);
    let mut in_round = false;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let msg = match tokio::time::timeout(left, stream.next()).await {
            Err(_) => {
                // Time to leave, as a closed tab: mid-round if a task is being worked on.
                if in_round {
                    shared.leaves_mid_round.fetch_add(1, Ordering::Relaxed);
                }
                let _ = sink.send(Message::Close(None)).await;
                return Ok(());
            }
            // The server closed the socket (a restart, a ban): a tab would reconnect.
            Ok(None) | Ok(Some(Err(_))) => return Ok(()),
            Ok(Some(Ok(m))) => m,
        };
        let Message::Binary(frame) = msg else {
            continue;
        };
        let reply = match decode::<ServerMsg>(&frame) {
            Ok(ServerMsg::Welcome(w)) => {
                samples = (w.shard.train.len() as u64).max(1);
                local = w.client_id;
                shared.joins.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(ServerMsg::Task(task)) => {
                in_round = true;
                if hostile.is_none() && local % 16 == 0 {
                    watch_model(shared, &task);
                }
                match hostile {
                    None => synthetic_result(&task, samples, local),
                    Some(kind) => {
                        shared.hostile_sent.fetch_add(1, Ordering::Relaxed);
                        if kind == "garbage-frame" {
                            let junk: Vec<u8> = (0..4096u32).map(|b| (b * 37 + 11) as u8).collect();
                            sink.send(Message::binary(junk))
                                .await
                                .map_err(|e| format!("garbage: {e}"))?;
                            continue;
                        }
                        hostile_result(kind, &task, samples, local)
                    }
                }
            }
            Ok(ServerMsg::Bye { .. }) => return Ok(()),
            Ok(_) => continue,
            Err(e) => return Err(format!("bad frame from the server: {e}")),
        };
        let round = match &reply {
            ClientMsg::Result(r) => Some(r.round),
            _ => None,
        };
        drop(frame);
        if crate::serve::upgrade::send_frame(&mut sink, encode(&reply).into(), TAB_FRAGMENT)
            .await
            .is_err()
        {
            // Not sent: the server went away first.
            return Ok(());
        }
        in_round = false;
        if let (Some(round), None) = (round, hostile) {
            shared.sent.lock().unwrap().push(Sent {
                round,
                edge,
                local,
                at: shared.since(),
            });
        }
    }
}

/// Notes the round's model's largest |weight| (the model each client is sent is the global one).
fn watch_model(shared: &Shared, task: &canopy_core::protocol::Task) {
    if let Params::Values(blob) = &task.model.params
        && let Ok(w) = blob.to_f32()
    {
        let finite = w.iter().all(|v| v.is_finite());
        let top = w
            .iter()
            .filter(|v| v.is_finite())
            .fold(0f32, |m, v| m.max(v.abs()));
        shared
            .model
            .lock()
            .unwrap()
            .insert(task.round, (top, !finite));
    }
}

/// A hostile client's answer to `task`.
fn hostile_result(
    kind: &str,
    task: &canopy_core::protocol::Task,
    samples: u64,
    client: u64,
) -> ClientMsg {
    let honest = synthetic_result(task, samples, client);
    let ClientMsg::Result(mut r) = honest else {
        return honest;
    };
    let base = match &task.model.params {
        Params::Values(b) => b.to_f32().unwrap_or_default(),
        _ => Vec::new(),
    };
    let values = match &r.update {
        Update::Weights(b) | Update::Delta(b) => b.to_f32().unwrap_or_default(),
        _ => Vec::new(),
    };
    let weights = matches!(r.update, Update::Weights(_));
    let bad: Vec<f32> = match kind {
        "constant:1e6" => vec![1e6; values.len()],
        "sign-flip:10" => values
            .iter()
            .enumerate()
            .map(|(j, v)| {
                let b = if weights {
                    base.get(j).copied().unwrap_or(0.0)
                } else {
                    0.0
                };
                b - 10.0 * (v - b)
            })
            .collect(),
        "nan" => values.iter().map(|_| f32::NAN).collect(),
        // Half the model: a shape the server must refuse.
        _ => values[..values.len() / 2].to_vec(),
    };
    r.update = if weights {
        Update::Weights(Blob::from_f32(&bad))
    } else {
        Update::Delta(Blob::from_f32(&bad))
    };
    r.metrics = ClientMetrics {
        train_loss: 0.01,
        ..r.metrics
    };
    ClientMsg::Result(TaskResult { ..r })
}
