//! Who is connected, what each client is doing, and the run's public state.
//!
//! One `Hub` behind a mutex, shared by the WebSocket sessions, the round loop and the HTTP API.
//! It is made of three parts, each with its own rules and tests: [`clients::Clients`] (who is
//! connected: status, outboxes, suspicion, bans), [`rounds::Rounds`] (the phase, the round, its
//! records and bytes, the dashboard's controls) and, on a root, [`edges::EdgeTable`] (its edges
//! and their partials). The hub itself holds only what spans parts: a frame sent to a client
//! counts in the round's bytes, a welcome carries the run's description, progress shows only for
//! a client's latest task, refused results and partials are counted for `/metrics`
//! ([`tally::Tally`]). Its fields are private: every change goes through a method named for what
//! happened. Critical sections are short: no awaiting while the lock is held.

pub mod clients;
pub mod edges;
pub mod rounds;
pub mod snapshot;
pub mod tally;

use std::time::{Duration, Instant};

use crate::serve::outbox::{Frame, Outbox};
use canopy_core::aggregate::robust::Verdict;
use canopy_core::data::partition::Shard;
use canopy_core::protocol::{ErrorCode, Hello, RunInfo, ServerMsg, Welcome, encode};
use canopy_core::strategy::{ClientView, Phase as StrategyPhase};
use canopy_core::train::Progress;

use crate::round::record::RoundRecord;
use crate::scale::wire::Presence;

use clients::Clients;
use edges::EdgeTable;
use rounds::Rounds;
use tally::Tally;

pub use clients::{CLOSE, Client, Status};
pub use edges::{EdgeRow, PartialRow};
pub use rounds::{BufferFill, Control, Phase};
pub use tally::Refusal;

pub struct Hub {
    clients: Clients,
    rounds: Rounds,
    /// On a root: its edges (empty elsewhere).
    edges: EdgeTable,
    /// On a root: how long an edge stays live without reporting (`[scale] edge_timeout_ms`).
    edge_timeout: std::time::Duration,
    /// Refused results and edges' partials, counted for `/metrics`.
    tally: Tally,
}

impl Hub {
    /// A hub for a run; `done` are the rounds a resumed run already finished; `edge_timeout` is
    /// how long an edge counts as live after its last report (on a root).
    pub fn new(
        info: RunInfo,
        shards: Vec<Shard>,
        done: Vec<RoundRecord>,
        hold: bool,
        edge_timeout: std::time::Duration,
    ) -> Hub {
        Hub {
            clients: Clients::new(shards),
            rounds: Rounds::new(info, done, hold),
            edges: EdgeTable::default(),
            edge_timeout,
            tally: Tally::default(),
        }
    }

    /// How long an edge counts as live after its last report.
    pub fn edge_timeout(&self) -> std::time::Duration {
        self.edge_timeout
    }

    // ---- clients ----

    /// Registers a client (or re-attaches one that reconnects with its old id) and sends it the
    /// welcome with its data shard. Returns its id, or why it may not join (it was banned).
    pub fn join(&mut self, hello: Hello, tx: Outbox) -> Result<u64, String> {
        self.join_from(hello, tx, None)
    }

    /// [`Hub::join`] from a network address: refused while the address is banned, or when it
    /// has taken too many new ids this minute.
    pub fn join_from(
        &mut self,
        hello: Hello,
        tx: Outbox,
        addr: Option<std::net::IpAddr>,
    ) -> Result<u64, String> {
        let id = self
            .clients
            .join_from(hello, tx, addr, std::time::Instant::now())?;
        let shard = self.clients.shard(id).expect("joined").clone();
        let run = self.rounds.info().clone();
        self.send(
            id,
            &ServerMsg::Welcome(Welcome {
                client_id: id,
                run,
                shard,
            }),
        );
        // Joining a run that has ended: say so at once rather than leave it waiting.
        if self.rounds.phase().is_over() {
            self.send(
                id,
                &ServerMsg::Bye {
                    reason: "run finished".into(),
                },
            );
        }
        Ok(id)
    }

    /// The tabs bring their own data, labelled with `classes` classes.
    pub fn on_tabs(&mut self, classes: usize) {
        self.clients.on_tabs(classes);
    }

    /// A tab reports how many examples it holds per class (see [`Clients::set_examples`]).
    pub fn examples_reported(
        &mut self,
        id: u64,
        train: Vec<u32>,
        test: Vec<u32>,
    ) -> Result<(), String> {
        self.clients.set_examples(id, train, test)
    }

    /// Bans a client: it is told why (an error frame, then Bye so it does not reconnect), its
    /// connection is closed, and it cannot join again with its id. Returns its name.
    pub fn ban(&mut self, id: u64, reason: &str) -> Result<String, String> {
        let name = self.clients.ban(id, reason)?;
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
        self.clients.is_banned(id)
    }

    /// [`Hub::ban`], and its address for `minutes`: new ids from there are refused meanwhile,
    /// and every client connected from it is banned too. Returns the names banned.
    pub fn ban_with_address(
        &mut self,
        id: u64,
        reason: &str,
        minutes: u64,
    ) -> Result<Vec<String>, String> {
        let until = std::time::Instant::now() + Duration::from_secs(minutes.saturating_mul(60));
        let others = self.clients.ban_address(id, until, reason)?;
        let mut names = vec![self.ban(id, reason)?];
        for o in others {
            names.push(self.ban(o, reason)?);
        }
        Ok(names)
    }

    /// New ids per address per minute (`limits.max_new_ids_per_minute`).
    pub fn limit_new_ids(&mut self, per_minute: usize, loopback_exempt: bool) {
        self.clients.limit_new_ids(per_minute, loopback_exempt);
    }

    /// Asks the session of `id` to close its connection once the frames queued before have gone.
    pub fn close(&mut self, id: u64) {
        self.send_frame(id, CLOSE.to_vec());
    }

    /// [`Hub::close`] for every connected client (after Bye at the end of the run).
    pub fn close_all(&mut self) {
        for id in self.clients.ids() {
            self.close(id);
        }
    }

    pub fn disconnect(&mut self, id: u64) {
        self.clients.disconnect(id);
    }

    pub fn client(&self, id: u64) -> Option<&Client> {
        self.clients.get(id)
    }

    pub fn clients(&self) -> impl Iterator<Item = &Client> {
        self.clients.iter()
    }

    /// Connected clients with nothing to do, as the strategy sees them.
    pub fn idle_clients(&self) -> Vec<ClientView> {
        self.clients.idle()
    }

    pub fn connected(&self) -> usize {
        self.clients.connected()
    }

    /// Size of a client's training split: the most samples a result from it may claim.
    pub fn train_samples(&self, id: u64) -> u64 {
        self.clients.train_samples(id)
    }

    pub fn mask_version(&self, id: u64) -> Option<u64> {
        self.clients.mask_version(id)
    }

    pub fn set_status(&mut self, id: u64, status: Status) {
        self.clients.set_status(id, status);
    }

    /// A task went out to `id` for `round`.
    pub fn task_sent(&mut self, id: u64, round: u32) {
        self.clients.task_sent(id, round);
    }

    /// `id`'s result was accepted.
    pub fn result_accepted(&mut self, id: u64, samples_per_sec: f64, mask_version: Option<u64>) {
        self.clients
            .result_accepted(id, samples_per_sec, mask_version);
    }

    /// What the robust aggregation layer did to `id`'s update this round.
    pub fn judged(&mut self, v: &Verdict) {
        self.clients.judged(v);
    }

    /// `id` could not do its task; it may have lost its cached mask, so send it in full next time.
    pub fn task_failed(&mut self, id: u64) {
        self.clients.task_failed(id);
    }

    /// Training progress from `id`, shown while it belongs to the client's latest task (in a
    /// buffered run a task trains an older version than the one being made, and a straggler's
    /// an older round).
    pub fn progress(&mut self, id: u64, round: u32, progress: Progress) {
        if self.clients.get(id).and_then(|c| c.last_round) == Some(round) {
            self.clients.progress(id, progress);
        }
    }

    // ---- edges (on a root) ----

    /// This server takes no tabs (a root): each is told `why` and sent away.
    pub fn refuse_joins(&mut self, why: &str) {
        self.clients.refuse_joins(why);
    }

    /// An edge reported its clients; a report not newer than its last is refused, with why.
    pub fn edge_seen(&mut self, p: Presence) -> Result<(), String> {
        self.edges.seen(p)
    }

    /// A report claiming to come from `edge` was refused for `why`: counted for `/metrics`, and
    /// on the edge's row when it has one. Returns the row's count (0 without a row).
    pub fn edge_report_refused(&mut self, edge: &str, why: &str) -> u64 {
        self.tally.report_refused();
        self.edges.refused(edge, why)
    }

    /// What the root did with an edge's partial.
    pub fn edge_partial(&mut self, edge: &str, row: PartialRow) {
        // Counted by kind ("refused", not "refused: signed by U…"): whoever may publish on NATS
        // chooses the text, and must not choose how many counters `/metrics` keeps.
        let kind = row.outcome.split(':').next().unwrap_or_default();
        self.tally.partial(kind);
        self.edges.partial(edge, row);
    }

    /// Edges heard from within the edge timeout.
    pub fn edges_live(&self) -> usize {
        self.edges.live_count(self.edge_timeout)
    }

    /// Edges heard from within `timeout`.
    pub fn edge_alive(&self, edge: &str, timeout: Duration) -> bool {
        self.edges.alive(edge, timeout)
    }

    /// Idle clients of the edges heard from within `timeout`, as the strategy sees them.
    pub fn edge_idle_clients(&self, timeout: Duration) -> Vec<ClientView> {
        self.edges.idle_since(timeout, None).0
    }

    /// Idle clients of the edges heard from within `timeout` (and, given `since`, after it),
    /// and whether every edge heard from within `timeout` has reported since then: a round's
    /// clients are only known idle again once their edge reported after the round.
    pub fn edge_idle_since(
        &self,
        timeout: Duration,
        since: Option<Instant>,
    ) -> (Vec<ClientView>, bool) {
        self.edges.idle_since(timeout, since)
    }

    /// The edge a client (run-wide id) was last reported on.
    pub fn edge_of(&self, client: u64) -> Option<&str> {
        self.edges.edge_of(client)
    }

    /// Clients connected to edges heard from within `timeout`.
    pub fn edge_connected(&self, timeout: Duration) -> usize {
        self.edges.connected(timeout)
    }

    /// Where the edges' tabs join, in edge order (on a root).
    pub fn edge_urls(&self) -> Vec<String> {
        self.edges.urls()
    }

    /// Bytes the edges' tabs moved this round (the root moves none itself).
    pub fn add_round_bytes(&mut self, up: u64, down: u64) {
        self.rounds.add_bytes(up, down);
    }

    /// The edges for the dashboard, with how long ago each was heard from.
    pub fn edges_json(&self) -> serde_json::Value {
        self.edges.json()
    }

    // ---- frames ----

    /// Sends a message to a connected client, counting its bytes. Returns the frame size.
    pub fn send(&mut self, id: u64, msg: &ServerMsg) -> usize {
        self.send_frame(id, encode(msg))
    }

    /// A result from `id` was refused for `why`: the client is told `message` (a `Rejected`
    /// error) and the refusal is counted for `/metrics`. Every path that refuses a result (the
    /// round loop's, the buffered driver's) refuses it here.
    pub fn reject(&mut self, id: u64, why: Refusal, message: String) {
        self.tally.rejected(why);
        self.send(
            id,
            &ServerMsg::Error {
                code: ErrorCode::Rejected,
                message,
            },
        );
    }

    /// Refused results and edges' partials so far.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Queues a frame for a connected client, counting it in the client's and the round's bytes
    /// down. Returns its size, or 0 when it was not queued.
    pub fn send_frame(&mut self, id: u64, frame: impl Into<Frame>) -> usize {
        let sent = self.clients.send_frame(id, frame);
        self.rounds.add_bytes(0, sent as u64);
        sent
    }

    /// Bytes that came in from `id`: the client's and the round's.
    pub fn count_up(&mut self, id: u64, bytes: usize) {
        self.clients.count_up(id, bytes);
        self.rounds.add_bytes(bytes as u64, 0);
    }

    pub fn broadcast(&mut self, msg: &ServerMsg) {
        let frame = Frame::from(encode(msg));
        for id in self.clients.ids() {
            self.send_frame(id, frame.clone());
        }
    }

    // ---- the run ----

    pub fn info(&self) -> &RunInfo {
        self.rounds.info()
    }

    pub fn phase(&self) -> Phase {
        self.rounds.phase()
    }

    /// The round under way (or the last one, between rounds).
    pub fn round(&self) -> u32 {
        self.rounds.round()
    }

    pub fn set_phase(&mut self, phase: Phase, round: u32) {
        self.rounds.set_phase(phase, round);
    }

    /// A new round starts: its byte counters begin at zero.
    pub fn begin_round(&mut self, round: u32, phase: StrategyPhase) {
        self.rounds.begin_round(round, phase);
    }

    /// Bytes (up, down) since the round began.
    pub fn round_bytes(&self) -> (u64, u64) {
        self.rounds.bytes()
    }

    pub fn record(&mut self, record: RoundRecord) {
        self.rounds.record(record);
    }

    /// A buffered run's buffer changed (results in, a step taken, a client busy or free).
    pub fn set_buffer(&mut self, fill: BufferFill) {
        self.rounds.set_buffer(fill);
    }

    pub fn buffer(&self) -> Option<&BufferFill> {
        self.rounds.buffer()
    }

    /// Finished rounds, in order.
    pub fn rounds(&self) -> &[RoundRecord] {
        self.rounds.records()
    }

    pub fn elapsed_seconds(&self) -> f64 {
        self.rounds.elapsed_seconds()
    }

    // ---- the dashboard's controls ----

    pub fn control(&self) -> &Control {
        self.rounds.control()
    }

    /// Rounds the run should have (the dashboard can change it).
    pub fn planned_rounds(&self) -> u32 {
        self.rounds.planned_rounds()
    }

    /// Changes the round count; rounds done or under way cannot be taken back.
    pub fn set_planned_rounds(&mut self, rounds: u32) -> Result<(), String> {
        self.rounds.set_planned_rounds(rounds)
    }

    /// Starts a held run or resumes a paused one.
    pub fn start(&mut self) -> Result<(), String> {
        self.rounds.start()
    }

    pub fn pause(&mut self) {
        self.rounds.pause();
    }

    pub fn stop(&mut self) {
        self.rounds.stop();
    }

    pub fn set_clients_per_round(&mut self, n: Option<usize>) {
        self.rounds.set_clients_per_round(n);
    }

    pub fn set_next_strategy(&mut self, name: String) {
        self.rounds.set_next_strategy(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::outbox::{Inbox, channel};
    use canopy_core::protocol::decode;
    use clients::tests::{hello, shards};
    use futures_util::FutureExt;
    use rounds::tests::info;

    fn hub() -> Hub {
        Hub::new(
            info(3),
            shards(2),
            Vec::new(),
            false,
            Duration::from_secs(3),
        )
    }

    /// The messages queued for a connection, and whether a close followed them.
    fn queued(rx: &mut Inbox) -> (Vec<ServerMsg>, bool) {
        let mut msgs = Vec::new();
        let mut closed = false;
        while let Some(Some(frame)) = rx.recv().now_or_never() {
            if frame.is_empty() {
                closed = true;
            } else {
                msgs.push(decode(&frame.into_bytes()).unwrap());
            }
        }
        (msgs, closed)
    }

    #[test]
    fn a_joining_client_is_welcomed_with_its_shard_and_its_bytes_count_in_the_round() {
        let mut h = hub();
        let (tx, mut rx) = channel(1 << 20);
        let id = h.join(hello("a", None), tx).unwrap();
        let (msgs, closed) = queued(&mut rx);
        let [ServerMsg::Welcome(w)] = &msgs[..] else {
            panic!("{msgs:?}")
        };
        assert_eq!((w.client_id, w.shard.index, w.run.rounds), (id, 0, 3));
        assert!(!closed);
        let down = h.client(id).unwrap().bytes_down;
        assert!(down > 0);
        assert_eq!(h.round_bytes(), (0, down));
        h.count_up(id, 7);
        assert_eq!(h.round_bytes(), (7, down));
        h.begin_round(1, StrategyPhase::Training);
        assert_eq!(h.round_bytes(), (0, 0));
        // A broadcast counts once per client it reached.
        let (tx, _rx2) = channel(1 << 20);
        h.join(hello("b", None), tx).unwrap();
        let (_, after_join) = h.round_bytes();
        h.broadcast(&ServerMsg::Bye { reason: "x".into() });
        let bye = encode(&ServerMsg::Bye { reason: "x".into() }).len() as u64;
        assert_eq!(h.round_bytes(), (0, after_join + 2 * bye));
    }

    #[test]
    fn joining_an_ended_run_is_answered_with_bye() {
        let mut h = hub();
        h.set_phase(Phase::Done, 3);
        let (tx, mut rx) = channel(1 << 20);
        h.join(hello("late", None), tx).unwrap();
        let (msgs, _) = queued(&mut rx);
        assert!(
            matches!(&msgs[..], [ServerMsg::Welcome(_), ServerMsg::Bye { reason }] if reason == "run finished")
        );
    }

    #[test]
    fn a_banned_client_is_told_why_closed_and_refused_with_its_id() {
        let mut h = hub();
        let (tx, mut rx) = channel(1 << 20);
        let id = h.join(hello("mallory", None), tx).unwrap();
        queued(&mut rx);
        assert_eq!(h.ban(id, "poisoning").unwrap(), "mallory");
        let (msgs, closed) = queued(&mut rx);
        assert!(matches!(
            &msgs[..],
            [ServerMsg::Error { code: ErrorCode::Banned, message }, ServerMsg::Bye { reason }]
                if message == "banned: poisoning" && reason == message
        ));
        assert!(closed);
        assert_eq!(h.client(id).unwrap().status, Status::Dropped);
        let (tx, _rx) = channel(1 << 20);
        assert_eq!(
            h.join(hello("mallory", Some(id)), tx).unwrap_err(),
            "banned: poisoning"
        );
    }

    #[test]
    fn progress_shows_only_for_the_clients_latest_task() {
        let mut h = hub();
        let (tx, _rx) = channel(1 << 20);
        let id = h.join(hello("a", None), tx).unwrap();
        h.begin_round(2, StrategyPhase::Training);
        h.task_sent(id, 2);
        h.progress(id, 1, Progress::default());
        assert!(h.client(id).unwrap().progress.is_none());
        h.progress(id, 2, Progress::default());
        assert!(h.client(id).unwrap().progress.is_some());
        // A buffered run has gone on to version 5 while this client trains version 2's task.
        let (tx, _rx2) = channel(1 << 20);
        let b = h.join(hello("b", None), tx).unwrap();
        h.task_sent(b, 2);
        h.begin_round(5, StrategyPhase::Training);
        h.progress(b, 2, Progress::default());
        assert!(h.client(b).unwrap().progress.is_some());
    }
}
