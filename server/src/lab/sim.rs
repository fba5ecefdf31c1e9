//! Native simulated clients: the same client runtime as a browser tab, over real WebSockets,
//! one OS thread each.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use canopy_core::client::{ClientHost, ClientRuntime};
use canopy_core::protocol::{
    Backend, Blob, ClientMsg, DeviceInfo, ServerMsg, UploadSpec, decode, encode,
};
use canopy_core::train::{Host, Progress};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use crate::lab::poison::Attack;

type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

struct NativeHost {
    t0: Instant,
    ws: Option<Socket>,
    /// Frames that arrived while a task awaited an exchange reply, handled after the task.
    backlog: VecDeque<Vec<u8>>,
}

impl Host for NativeHost {
    fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }
    async fn progress(&mut self, _p: &Progress) {}
}

impl ClientHost for NativeHost {
    fn send(&mut self, msg: ClientMsg) {
        if let Some(ws) = &mut self.ws {
            let _ = ws.send(Message::binary(encode(&msg)));
        }
    }

    /// Sends the request, then reads frames until its reply comes; anything else that arrives
    /// meanwhile waits in the backlog. (The task runs on this thread, so blocking here is fine.)
    async fn request(&mut self, round: u32, seq: u32, payload: Vec<u8>) -> Result<Blob, String> {
        let ws = self.ws.as_mut().ok_or("not connected")?;
        ws.send(Message::binary(encode(&ClientMsg::Exchange {
            round,
            seq,
            payload: Blob(payload),
        })))
        .map_err(|e| format!("sending exchange request: {e}"))?;
        loop {
            let frame = match self.ws.as_mut().map(|ws| ws.read()) {
                Some(Ok(Message::Binary(b))) => b.to_vec(),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    self.ws = None;
                    return Err("connection lost while awaiting an exchange reply".into());
                }
            };
            match decode::<ServerMsg>(&frame) {
                Ok(ServerMsg::Exchange {
                    round: r,
                    seq: s,
                    payload,
                }) if (r, s) == (round, seq) => return Ok(payload),
                Ok(ServerMsg::ExchangeFailed {
                    round: r,
                    seq: s,
                    message,
                    ..
                }) if (r, s) == (round, seq) => return Err(format!("exchange refused: {message}")),
                // A stale reply (an earlier task's) is dropped; everything else waits.
                Ok(ServerMsg::Exchange { .. } | ServerMsg::ExchangeFailed { .. }) => {}
                _ => self.backlog.push_back(frame),
            }
        }
    }
}

/// What one simulated client did.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub tasks: u32,
    pub errors: Vec<String>,
    pub finished: bool,
}

/// Runs one client until the server says the run is finished. Reconnects (keeping its id, so
/// its data shard) with backoff when the connection drops, for up to `patience`.
pub fn run_client(url: &str, name: &str, patience: Duration) -> SimReport {
    run_client_signalling(url, name, patience, None, Attack::None, 1.0)
}

/// Like [`run_client`], and says on `joined` when the server has welcomed it.
/// An attacking client runs the same runtime and alters its shard and results ([`Attack`]).
/// A client of `pace` p > 1 stands for a device p times slower: it waits (p − 1) times as long
/// as each task took before sending its result (waiting, not computing, so slow clients do not
/// slow the machine's other clients down).
fn run_client_signalling(
    url: &str,
    name: &str,
    patience: Duration,
    joined: Option<std::sync::mpsc::Sender<()>>,
    attack: Attack,
    pace: f64,
) -> SimReport {
    let mut joined = joined;
    let info = DeviceInfo::new(
        Backend::Native,
        "burn flex (CPU)",
        format!("canopy-sim/{}", env!("CARGO_PKG_VERSION")),
    );
    let host = NativeHost {
        t0: Instant::now(),
        ws: None,
        backlog: VecDeque::new(),
    };
    let mut rt = ClientRuntime::new(host, Device::flex(), info, name.to_string());
    let mut report = SimReport::default();
    let mut last_ok = Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        match tungstenite::connect(url) {
            Ok((ws, _)) => {
                rt.host.ws = Some(ws);
                rt.host.backlog.clear();
                backoff = Duration::from_millis(200);
                let hello = encode(&rt.hello());
                rt.host
                    .ws
                    .as_mut()
                    .unwrap()
                    .send(Message::binary(hello))
                    .ok();
                if serve(&mut rt, &mut report, &mut joined, attack, pace) {
                    report.finished = true;
                    return report;
                }
                last_ok = Instant::now();
            }
            Err(e) => {
                if last_ok.elapsed() > patience {
                    report.errors.push(format!("giving up on {url}: {e}"));
                    return report;
                }
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Handles messages until the run finishes (true) or the connection drops (false).
fn serve(
    rt: &mut ClientRuntime<NativeHost>,
    report: &mut SimReport,
    joined: &mut Option<std::sync::mpsc::Sender<()>>,
    attack: Attack,
    pace: f64,
) -> bool {
    let mut upload = UploadSpec::Weights;
    loop {
        let msg = match rt.host.backlog.pop_front() {
            Some(frame) => frame.into(),
            None => match rt.host.ws.as_mut().map(|ws| ws.read()) {
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    rt.host.ws = None;
                    return false;
                }
                Some(Ok(_)) => continue,
            },
        };
        let msg: ServerMsg = match decode(&msg) {
            Ok(m) => m,
            Err(e) => {
                report.errors.push(format!("bad frame from server: {e}"));
                continue;
            }
        };
        match &msg {
            ServerMsg::Bye { .. } => {
                if let Some(ws) = rt.host.ws.as_mut() {
                    let _ = ws.send(Message::binary(encode(&ClientMsg::Bye)));
                    let _ = ws.close(None);
                }
                return true;
            }
            ServerMsg::Error { message, .. } => report.errors.push(message.clone()),
            ServerMsg::Task(t) => {
                report.tasks += 1;
                upload = t.upload;
            }
            ServerMsg::Welcome(_) => {
                if let Some(tx) = joined.take() {
                    let _ = tx.send(());
                }
            }
            _ => {}
        }
        let welcome = matches!(msg, ServerMsg::Welcome(_));
        let task = matches!(msg, ServerMsg::Task(_));
        let working = Instant::now();
        let mut reply = pollster::block_on(rt.handle(msg));
        if task && pace > 1.0 {
            std::thread::sleep(working.elapsed().mul_f64(pace - 1.0));
        }
        if attack != Attack::None {
            if welcome && let Some(shard) = rt.shard.as_mut() {
                attack.poison_shard(shard);
            }
            if let (Some(ClientMsg::Result(result)), Some((arch, start))) =
                (reply.as_mut(), rt.last_model.as_ref())
            {
                let mask = rt.state.mask.mask();
                if let Err(e) = attack.poison_result(result, arch, start, mask, upload) {
                    report.errors.push(format!("attack failed: {e}"));
                }
            }
        }
        if let Some(reply) = reply {
            if rt.host.ws.is_none() {
                return false; // the connection went while the task ran
            }
            rt.host.send(reply);
        }
    }
}

/// Runs `n` clients on threads and waits for all of them. They join one after another, so
/// client i gets data shard i and a rerun with the same seed sees the same clients.
pub fn run_many(url: &str, n: usize, prefix: &str, patience: Duration) -> Vec<SimReport> {
    run_many_attacking(url, &vec![Attack::None; n], prefix, patience)
}

/// Like [`run_many`], one client per entry of `attacks` (client i mounts `attacks[i]`).
pub fn run_many_attacking(
    url: &str,
    attacks: &[Attack],
    prefix: &str,
    patience: Duration,
) -> Vec<SimReport> {
    let clients: Vec<(Attack, f64)> = attacks.iter().map(|&a| (a, 1.0)).collect();
    run_many_as(url, &clients, prefix, patience)
}

/// Like [`run_many`], one honest client per entry of `paces`: client i is `paces[i]` times
/// slower than this machine runs it (see [`run_client_signalling`]).
pub fn run_many_paced(
    url: &str,
    paces: &[f64],
    prefix: &str,
    patience: Duration,
) -> Vec<SimReport> {
    let clients: Vec<(Attack, f64)> = paces.iter().map(|&p| (Attack::None, p)).collect();
    run_many_as(url, &clients, prefix, patience)
}

/// One client per entry: its attack and its pace.
fn run_many_as(
    url: &str,
    clients: &[(Attack, f64)],
    prefix: &str,
    patience: Duration,
) -> Vec<SimReport> {
    let handles: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, &(attack, pace))| {
            let (url, name) = (url.to_string(), format!("{prefix}-{i}"));
            let (tx, rx) = std::sync::mpsc::channel();
            let h = std::thread::spawn(move || {
                run_client_signalling(&url, &name, patience, Some(tx), attack, pace)
            });
            // Wait for the welcome (or for the client to give up) before starting the next.
            let _ = rx.recv_timeout(patience + Duration::from_secs(5));
            h
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect()
}
