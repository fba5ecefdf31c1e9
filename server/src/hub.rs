//! Who is connected, what each client is doing, and the run's public state.
//!
//! One `Hub` behind a mutex, shared by the WebSocket sessions, the round loop and the HTTP API.
//! Critical sections are short: no awaiting while the lock is held.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use canopy_core::partition::Shard;
use canopy_core::protocol::{DeviceInfo, Hello, RunInfo, ServerMsg, Welcome, encode};
use canopy_core::train::Progress;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::RoundRecord;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Idle,
    Training,
    Dropped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    WaitingForClients,
    Exploring,
    Training,
    Aggregating,
    /// Held at a round boundary by the dashboard's Pause (or before the first round with `hold`).
    Paused,
    Done,
    /// Ended early by the dashboard's Stop.
    Stopped,
}

/// What the dashboard's admin controls asked for. The round loop reads it at round boundaries.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Control {
    /// Do not start the next round.
    pub paused: bool,
    /// Waiting for the first Start (`run.hold`): a teacher lets the class join first.
    pub held: bool,
    /// End the run after the round in progress.
    pub stop: bool,
    /// Offer at most this many idle clients to the strategy each round.
    pub clients_per_round: Option<usize>,
    /// Strategy chosen for the next run (see `next-run.toml` in the run folder).
    pub next_strategy: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Client {
    pub id: u64,
    pub name: String,
    pub device: DeviceInfo,
    pub shard: usize,
    pub train_samples: u64,
    pub status: Status,
    pub rounds_done: u32,
    pub last_round: Option<u32>,
    pub samples_per_sec: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub progress: Option<Progress>,
    pub joined_unix_ms: u64,
    /// The pruning-mask version this client holds.
    pub mask_version: Option<u64>,
    /// What the robust aggregation layer did to its updates.
    pub suspicion: canopy_core::robust::Suspicion,
    #[serde(skip)]
    pub tx: Option<UnboundedSender<Vec<u8>>>,
}

pub struct Hub {
    pub info: RunInfo,
    pub shards: Vec<Shard>,
    pub clients: BTreeMap<u64, Client>,
    pub phase: Phase,
    pub round: u32,
    pub rounds: Vec<RoundRecord>,
    pub started: Instant,
    /// Bytes in and out since the current round began (frames as sent, headers excluded).
    pub round_bytes_up: u64,
    pub round_bytes_down: u64,
    pub control: Control,
    next_id: u64,
    next_shard: usize,
}

impl Hub {
    pub fn new(info: RunInfo, shards: Vec<Shard>) -> Hub {
        Hub {
            info,
            shards,
            clients: BTreeMap::new(),
            phase: Phase::WaitingForClients,
            round: 0,
            rounds: Vec::new(),
            started: Instant::now(),
            round_bytes_up: 0,
            round_bytes_down: 0,
            control: Control::default(),
            next_id: 1,
            next_shard: 0,
        }
    }

    /// Registers a client (or re-attaches one that reconnects with its old id) and sends it the
    /// welcome with its data shard. Returns its id.
    pub fn join(&mut self, hello: Hello, tx: UnboundedSender<Vec<u8>>) -> u64 {
        let resumed = hello.resume.filter(|id| self.clients.get(id).is_some_and(|c| c.tx.is_none()));
        let id = match resumed {
            Some(id) => {
                let c = self.clients.get_mut(&id).expect("checked");
                c.tx = Some(tx);
                c.status = Status::Idle;
                c.device = hello.device;
                c.mask_version = hello.mask_version;
                id
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                // Shards are dealt out in join order; with more clients than shards they repeat.
                let shard = self.next_shard % self.shards.len();
                self.next_shard += 1;
                let name = if hello.name.trim().is_empty() { format!("client-{id}") } else { hello.name.chars().take(40).collect() };
                let joined_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                let train_samples = self.shards[shard].train.len() as u64;
                self.clients.insert(id, Client {
                    id, name, device: hello.device, shard, train_samples, status: Status::Idle, rounds_done: 0,
                    last_round: None, samples_per_sec: 0.0, bytes_up: 0, bytes_down: 0, progress: None,
                    joined_unix_ms, mask_version: hello.mask_version, suspicion: Default::default(), tx: Some(tx),
                });
                id
            }
        };
        let shard = self.shards[self.clients[&id].shard].clone();
        self.send(id, &ServerMsg::Welcome(Welcome { client_id: id, run: self.info.clone(), shard }));
        id
    }

    pub fn disconnect(&mut self, id: u64) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.tx = None;
            c.status = Status::Dropped;
            c.progress = None;
        }
    }

    /// Sends a message to a connected client, counting its bytes. Returns the frame size.
    pub fn send(&mut self, id: u64, msg: &ServerMsg) -> usize {
        self.send_frame(id, encode(msg))
    }

    pub fn send_frame(&mut self, id: u64, frame: Vec<u8>) -> usize {
        let len = frame.len();
        if let Some(c) = self.clients.get_mut(&id)
            && let Some(tx) = &c.tx
            && tx.send(frame).is_ok()
        {
            c.bytes_down += len as u64;
            self.round_bytes_down += len as u64;
            return len;
        }
        0
    }

    pub fn count_up(&mut self, id: u64, bytes: usize) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.bytes_up += bytes as u64;
        }
        self.round_bytes_up += bytes as u64;
    }

    pub fn idle_clients(&self) -> Vec<&Client> {
        self.clients.values().filter(|c| c.tx.is_some() && c.status == Status::Idle).collect()
    }

    pub fn connected(&self) -> usize {
        self.clients.values().filter(|c| c.tx.is_some()).count()
    }

    pub fn set_status(&mut self, id: u64, status: Status) {
        if let Some(c) = self.clients.get_mut(&id)
            && c.tx.is_some()
        {
            c.status = status;
            if status == Status::Idle {
                c.progress = None;
            }
        }
    }

    pub fn broadcast(&mut self, msg: &ServerMsg) {
        let frame = encode(msg);
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        for id in ids {
            self.send_frame(id, frame.clone());
        }
    }
}
