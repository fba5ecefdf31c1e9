//! Who is connected, what each client is doing, and the run's public state.
//!
//! One `Hub` behind a mutex, shared by the WebSocket sessions, the round loop and the HTTP API.
//! Its fields are private: every change goes through a method named for what happened, so the
//! rules (a dropped client is never idle, bytes count per round...) live in one place.
//! Critical sections are short: no awaiting while the lock is held.

pub mod snapshot;

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::serve::outbox::{Frame, Outbox, Refused};
use canopy_core::data::partition::Shard;
use canopy_core::protocol::{DeviceInfo, ErrorCode, Hello, RunInfo, ServerMsg, Welcome, encode};
use canopy_core::strategy::{ClientView, Phase as StrategyPhase};
use canopy_core::train::Progress;
use serde::{Serialize, Serializer};

use crate::round::record::RoundRecord;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Idle,
    Training,
    Dropped,
}

/// What the run is doing, as the dashboard shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    WaitingForClients,
    /// Clients are working on the round's tasks; the strategy names what kind of round it is.
    Round(StrategyPhase),
    Aggregating,
    /// Held at a round boundary by the dashboard's Pause (or before the first round with `hold`).
    Paused,
    Done,
    /// Ended early by the dashboard's Stop.
    Stopped,
}

impl Phase {
    pub fn name(&self) -> &str {
        match self {
            Phase::WaitingForClients => "waiting_for_clients",
            Phase::Round(p) => p.name(),
            Phase::Aggregating => "aggregating",
            Phase::Paused => "paused",
            Phase::Done => "done",
            Phase::Stopped => "stopped",
        }
    }

    pub fn is_over(&self) -> bool {
        matches!(self, Phase::Done | Phase::Stopped)
    }

    /// A round is under way (its count can no longer be taken back).
    pub fn is_busy(&self) -> bool {
        matches!(self, Phase::Round(_) | Phase::Aggregating)
    }
}

impl Serialize for Phase {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
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
    pub suspicion: canopy_core::aggregate::robust::Suspicion,
    /// Banned by an admin: disconnected, and refused when it comes back with this id.
    pub banned: bool,
    #[serde(skip)]
    tx: Option<Outbox>,
}

impl Client {
    pub fn connected(&self) -> bool {
        self.tx.is_some()
    }
}

/// The frame a session's writer takes as "close the connection now" (real frames are never empty).
pub const CLOSE: &[u8] = &[];

pub struct Hub {
    info: RunInfo,
    shards: Vec<Shard>,
    clients: BTreeMap<u64, Client>,
    phase: Phase,
    round: u32,
    rounds: Vec<RoundRecord>,
    started: Instant,
    /// Bytes in and out since the current round began (frames as sent, headers excluded).
    round_bytes_up: u64,
    round_bytes_down: u64,
    control: Control,
    next_id: u64,
    next_shard: usize,
    /// Banned client ids and why.
    banned: BTreeMap<u64, String>,
    /// Set on a root: tabs are told to join an edge instead.
    refuse_joins: Option<String>,
    /// On a root: its edges, by name, and which edge each reported client is on.
    edges: BTreeMap<String, EdgeRow>,
    edge_of: BTreeMap<u64, String>,
}

/// An edge of a run spread over servers, as its root sees it.
#[derive(Clone, Debug, Serialize)]
pub struct EdgeRow {
    pub name: String,
    pub url: String,
    pub connected: usize,
    pub idle: usize,
    #[serde(skip)]
    idle_clients: Vec<ClientView>,
    #[serde(skip)]
    seen: Instant,
    /// Its partials, newest last (the last 20).
    pub partials: Vec<PartialRow>,
}

/// What became of one partial an edge sent.
#[derive(Clone, Debug, Serialize)]
pub struct PartialRow {
    pub round: u32,
    pub results: u64,
    pub samples: f64,
    /// Size of its sums, and whether they came through the Object Store.
    pub sum_bytes: u64,
    pub in_store: bool,
    pub edge_seconds: f64,
    /// `merged`, or why it was ignored (`duplicate`, `stale`, `late`, `wrong round`, `bad`).
    pub outcome: String,
}

impl Hub {
    /// A hub for a run; `done` are the rounds a resumed run already finished.
    pub fn new(info: RunInfo, shards: Vec<Shard>, done: Vec<RoundRecord>, hold: bool) -> Hub {
        Hub {
            info,
            shards,
            clients: BTreeMap::new(),
            phase: Phase::WaitingForClients,
            round: 0,
            rounds: done,
            started: Instant::now(),
            round_bytes_up: 0,
            round_bytes_down: 0,
            control: Control {
                held: hold,
                ..Control::default()
            },
            next_id: 1,
            next_shard: 0,
            banned: BTreeMap::new(),
            refuse_joins: None,
            edges: BTreeMap::new(),
            edge_of: BTreeMap::new(),
        }
    }

    // ---- clients ----

    /// Registers a client (or re-attaches one that reconnects with its old id) and sends it the
    /// welcome with its data shard. Returns its id, or why it may not join (it was banned).
    pub fn join(&mut self, hello: Hello, tx: Outbox) -> Result<u64, String> {
        if let Some(why) = &self.refuse_joins {
            return Err(why.clone());
        }
        if let Some(why) = hello.resume.and_then(|id| self.banned.get(&id)) {
            return Err(format!("banned: {why}"));
        }
        let resumed = hello
            .resume
            .filter(|id| self.clients.get(id).is_some_and(|c| c.tx.is_none()));
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
                let name = if hello.name.trim().is_empty() {
                    format!("client-{id}")
                } else {
                    hello.name.chars().take(40).collect()
                };
                let joined_unix_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let train_samples = self.shards[shard].train.len() as u64;
                self.clients.insert(
                    id,
                    Client {
                        id,
                        name,
                        device: hello.device,
                        shard,
                        train_samples,
                        status: Status::Idle,
                        rounds_done: 0,
                        last_round: None,
                        samples_per_sec: 0.0,
                        bytes_up: 0,
                        bytes_down: 0,
                        progress: None,
                        joined_unix_ms,
                        mask_version: hello.mask_version,
                        suspicion: Default::default(),
                        banned: false,
                        tx: Some(tx),
                    },
                );
                id
            }
        };
        let shard = self.shards[self.clients[&id].shard].clone();
        self.send(
            id,
            &ServerMsg::Welcome(Welcome {
                client_id: id,
                run: self.info.clone(),
                shard,
            }),
        );
        // Joining a run that has ended: say so at once rather than leave it waiting.
        if self.phase.is_over() {
            self.send(
                id,
                &ServerMsg::Bye {
                    reason: "run finished".into(),
                },
            );
        }
        Ok(id)
    }

    /// Bans a client: it is told why (an error frame, then Bye so it does not reconnect), its
    /// connection is closed, and it cannot join again with its id. Returns its name.
    pub fn ban(&mut self, id: u64, reason: &str) -> Result<String, String> {
        let Some(c) = self.clients.get_mut(&id) else {
            return Err(format!("no client {id}"));
        };
        c.banned = true;
        let name = c.name.clone();
        self.banned.insert(id, reason.to_string());
        let why = format!("banned: {reason}");
        self.send(
            id,
            &ServerMsg::Error {
                code: ErrorCode::Banned,
                message: why.clone(),
            },
        );
        self.send(id, &ServerMsg::Bye { reason: why });
        self.close(id);
        self.disconnect(id);
        Ok(name)
    }

    pub fn is_banned(&self, id: u64) -> bool {
        self.banned.contains_key(&id)
    }

    /// Asks the session of `id` to close its connection once the frames queued before have gone.
    pub fn close(&mut self, id: u64) {
        self.send_frame(id, CLOSE.to_vec());
    }

    /// [`Hub::close`] for every connected client (after Bye at the end of the run).
    pub fn close_all(&mut self) {
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        for id in ids {
            self.close(id);
        }
    }

    pub fn disconnect(&mut self, id: u64) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.tx = None;
            c.status = Status::Dropped;
            c.progress = None;
        }
    }

    pub fn client(&self, id: u64) -> Option<&Client> {
        self.clients.get(&id)
    }

    pub fn clients(&self) -> impl Iterator<Item = &Client> {
        self.clients.values()
    }

    // ---- edges (on a root) ----

    /// This server takes no tabs (a root): each is told `why` and sent away.
    pub fn refuse_joins(&mut self, why: &str) {
        self.refuse_joins = Some(why.to_string());
    }

    /// An edge reported its clients.
    pub fn edge_seen(&mut self, p: crate::scale::wire::Presence) {
        for (id, _) in &p.idle {
            self.edge_of.insert(*id, p.edge.clone());
        }
        let row = self.edges.entry(p.edge.clone()).or_insert_with(|| EdgeRow {
            name: p.edge.clone(),
            url: String::new(),
            connected: 0,
            idle: 0,
            idle_clients: Vec::new(),
            seen: Instant::now(),
            partials: Vec::new(),
        });
        row.url = p.url;
        row.connected = p.connected;
        row.idle = p.idle.len();
        row.idle_clients = p
            .idle
            .into_iter()
            .map(|(id, samples)| ClientView { id, samples })
            .collect();
        row.seen = Instant::now();
    }

    /// What the root did with an edge's partial.
    pub fn edge_partial(&mut self, edge: &str, row: PartialRow) {
        if let Some(e) = self.edges.get_mut(edge) {
            e.partials.push(row);
            let n = e.partials.len();
            if n > 20 {
                e.partials.drain(..n - 20);
            }
        }
    }

    /// Edges heard from within `timeout`.
    pub fn edge_alive(&self, edge: &str, timeout: std::time::Duration) -> bool {
        self.edges
            .get(edge)
            .is_some_and(|e| e.seen.elapsed() <= timeout)
    }

    /// Idle clients of the edges heard from within `timeout`, as the strategy sees them.
    pub fn edge_idle_clients(&self, timeout: std::time::Duration) -> Vec<ClientView> {
        self.edge_idle_since(timeout, None).0
    }

    /// Idle clients of the edges heard from within `timeout` (and, given `since`, after it),
    /// and whether every edge heard from within `timeout` has reported since then: a round's
    /// clients are only known idle again once their edge reported after the round.
    pub fn edge_idle_since(
        &self,
        timeout: std::time::Duration,
        since: Option<Instant>,
    ) -> (Vec<ClientView>, bool) {
        let alive: Vec<&EdgeRow> = self
            .edges
            .values()
            .filter(|e| e.seen.elapsed() <= timeout)
            .collect();
        let fresh = |e: &EdgeRow| since.is_none_or(|s| e.seen > s);
        let mut all: Vec<ClientView> = alive
            .iter()
            .filter(|e| fresh(e))
            .flat_map(|e| e.idle_clients.iter().cloned())
            .collect();
        all.sort_by_key(|c| c.id);
        (all, alive.iter().all(|e| fresh(e)))
    }

    /// The edge a client (run-wide id) was last reported on.
    pub fn edge_of(&self, client: u64) -> Option<&str> {
        self.edge_of.get(&client).map(|s| s.as_str())
    }

    /// Clients connected to edges heard from within `timeout`.
    pub fn edge_connected(&self, timeout: std::time::Duration) -> usize {
        self.edges
            .values()
            .filter(|e| e.seen.elapsed() <= timeout)
            .map(|e| e.connected)
            .sum()
    }

    /// Where the edges' tabs join, in edge order (on a root).
    pub fn edge_urls(&self) -> Vec<String> {
        self.edges
            .values()
            .map(|e| e.url.clone())
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// Bytes the edges' tabs moved this round (the root moves none itself).
    pub fn add_round_bytes(&mut self, up: u64, down: u64) {
        self.round_bytes_up += up;
        self.round_bytes_down += down;
    }

    /// The edges for the dashboard, with how long ago each was heard from.
    pub fn edges_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.edges
                .values()
                .map(|e| {
                    let mut v = serde_json::to_value(e).unwrap_or_default();
                    v["seen_ms_ago"] = (e.seen.elapsed().as_millis() as u64).into();
                    v
                })
                .collect(),
        )
    }

    /// Connected clients with nothing to do, as the strategy sees them.
    pub fn idle_clients(&self) -> Vec<ClientView> {
        self.clients
            .values()
            .filter(|c| c.tx.is_some() && c.status == Status::Idle)
            .map(|c| ClientView {
                id: c.id,
                samples: c.train_samples,
            })
            .collect()
    }

    pub fn connected(&self) -> usize {
        self.clients.values().filter(|c| c.tx.is_some()).count()
    }

    /// Size of a client's training split: the most samples a result from it may claim.
    pub fn train_samples(&self, id: u64) -> u64 {
        self.clients.get(&id).map_or(0, |c| c.train_samples)
    }

    pub fn mask_version(&self, id: u64) -> Option<u64> {
        self.clients.get(&id).and_then(|c| c.mask_version)
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

    /// A task went out to `id` for `round`.
    pub fn task_sent(&mut self, id: u64, round: u32) {
        self.set_status(id, Status::Training);
        if let Some(c) = self.clients.get_mut(&id) {
            c.last_round = Some(round);
        }
    }

    /// `id`'s result was accepted.
    pub fn result_accepted(&mut self, id: u64, samples_per_sec: f64, mask_version: Option<u64>) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.rounds_done += 1;
            c.samples_per_sec = samples_per_sec;
            c.mask_version = mask_version;
        }
    }

    /// What the robust aggregation layer did to `id`'s update this round.
    pub fn judged(&mut self, v: &canopy_core::aggregate::robust::Verdict) {
        if let Some(c) = self.clients.get_mut(&v.client) {
            c.suspicion.record(v);
        }
    }

    /// `id` could not do its task; it may have lost its cached mask, so send it in full next time.
    pub fn task_failed(&mut self, id: u64) {
        self.set_status(id, Status::Idle);
        if let Some(c) = self.clients.get_mut(&id) {
            c.mask_version = None;
        }
    }

    /// Training progress from `id`, shown while it belongs to the current round.
    pub fn progress(&mut self, id: u64, round: u32, progress: Progress) {
        if self.round == round
            && let Some(c) = self.clients.get_mut(&id)
        {
            c.samples_per_sec = progress.samples_per_sec as f64;
            c.progress = Some(progress);
        }
    }

    // ---- frames ----

    /// Sends a message to a connected client, counting its bytes. Returns the frame size.
    pub fn send(&mut self, id: u64, msg: &ServerMsg) -> usize {
        self.send_frame(id, encode(msg))
    }

    pub fn send_frame(&mut self, id: u64, frame: impl Into<Frame>) -> usize {
        let frame = frame.into();
        let len = frame.len();
        if let Some(c) = self.clients.get_mut(&id)
            && let Some(tx) = &c.tx
        {
            match tx.send(frame) {
                Ok(()) => {
                    c.bytes_down += len as u64;
                    self.round_bytes_down += len as u64;
                    return len;
                }
                Err(Refused::Full(queued)) => {
                    tracing::warn!(
                        client = id,
                        queued,
                        frame = len,
                        "client is not reading its frames: frame dropped"
                    );
                }
                Err(Refused::Closed) => {}
            }
        }
        0
    }

    pub fn count_up(&mut self, id: u64, bytes: usize) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.bytes_up += bytes as u64;
        }
        self.round_bytes_up += bytes as u64;
    }

    pub fn broadcast(&mut self, msg: &ServerMsg) {
        let frame = Frame::from(encode(msg));
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        for id in ids {
            self.send_frame(id, frame.clone());
        }
    }

    // ---- the run ----

    pub fn info(&self) -> &RunInfo {
        &self.info
    }

    pub fn phase(&self) -> Phase {
        self.phase.clone()
    }

    /// The round under way (or the last one, between rounds).
    pub fn round(&self) -> u32 {
        self.round
    }

    pub fn set_phase(&mut self, phase: Phase, round: u32) {
        self.phase = phase;
        self.round = round;
    }

    /// A new round starts: its byte counters begin at zero.
    pub fn begin_round(&mut self, round: u32, phase: StrategyPhase) {
        self.set_phase(Phase::Round(phase), round);
        self.round_bytes_up = 0;
        self.round_bytes_down = 0;
    }

    /// Bytes (up, down) since the round began.
    pub fn round_bytes(&self) -> (u64, u64) {
        (self.round_bytes_up, self.round_bytes_down)
    }

    pub fn record(&mut self, record: RoundRecord) {
        self.rounds.push(record);
    }

    /// Finished rounds, in order.
    pub fn rounds(&self) -> &[RoundRecord] {
        &self.rounds
    }

    pub fn elapsed_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    // ---- the dashboard's controls ----

    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Rounds the run should have (the dashboard can change it).
    pub fn planned_rounds(&self) -> u32 {
        self.info.rounds
    }

    /// Changes the round count; rounds done or under way cannot be taken back.
    pub fn set_planned_rounds(&mut self, rounds: u32) -> Result<(), String> {
        if self.phase.is_over() {
            return Err("this run is over; its round count can no longer change".into());
        }
        let floor = (self.rounds.len() as u32)
            .max(if self.phase.is_busy() { self.round } else { 0 })
            .max(1);
        if rounds < floor {
            return Err(format!(
                "rounds must be at least {floor} (rounds done or under way)"
            ));
        }
        self.info.rounds = rounds;
        Ok(())
    }

    /// Starts a held run or resumes a paused one.
    pub fn start(&mut self) -> Result<(), String> {
        if self.phase.is_over() {
            return Err("this run is over; start the next one with the command in next-run.toml or restart the server".into());
        }
        self.control.paused = false;
        self.control.held = false;
        Ok(())
    }

    pub fn pause(&mut self) {
        self.control.paused = true;
    }

    pub fn stop(&mut self) {
        self.control.stop = true;
    }

    pub fn set_clients_per_round(&mut self, n: Option<usize>) {
        self.control.clients_per_round = n;
    }

    pub fn set_next_strategy(&mut self, name: String) {
        self.control.next_strategy = Some(name);
    }
}
