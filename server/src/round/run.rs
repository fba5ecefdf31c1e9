//! The round loop. It knows the [`Strategy`] trait only: which method runs is the strategy's
//! business, as are the tasks it hands out and how results become the next global model.
//! Records, checkpoints and evaluation live beside it (`metrics`, `checkpoint`, `evaluate`);
//! in-round requests are answered by the [`Desk`], never here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use canopy_core::aggregate::robust::{self, RobustConfig};
use canopy_core::aggregate::stream::StreamRound;
use canopy_core::data::Dataset;
use canopy_core::metric_keys as keys;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::{
    ErrorCode, MaskSpec, ModelPayload, ServerMsg, Task, encode_model_part, encode_task_head,
    encode_task_tail,
};
use canopy_core::strategy::{ClientView, Contribution, RoundContext, Strategy, accept};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{sleep_until, timeout};

use crate::config::LateResults;
use crate::hub::{Hub, Phase, Status};
use crate::round::checkpoint::{self, Checkpoint};
use crate::round::evaluate;
use crate::round::exchange::Desk;
use crate::round::inbox::Incoming;
use crate::round::record::{self, RoundRecord, RoundTally};
use crate::serve::outbox::Frame;

pub struct RoundLoop {
    pub hub: Arc<Mutex<Hub>>,
    pub incoming: UnboundedReceiver<Incoming>,
    pub desk: Arc<Desk>,
    pub strategy: Box<dyn Strategy>,
    pub global: Arc<Mutex<ModelState>>,
    pub test: Arc<Dataset>,
    /// The server's own validation split (for strategies that tune on data, never the test set).
    pub validation: Arc<Dataset>,
    pub rounds: u32,
    pub min_clients: usize,
    pub min_results: usize,
    pub seed: u64,
    pub run_dir: PathBuf,
    /// The run's settings, written into metrics.json.
    pub config_json: serde_json::Value,
    /// First round to run (after a resumed checkpoint: the one after it).
    pub first_round: u32,
    /// The robust aggregation layer between result acceptance and the strategy.
    pub robust: RobustConfig,
    pub late_results: LateResults,
    /// How long the end of the run waits for clients to take their Bye and close.
    pub goodbye: Duration,
    /// Clients past a deadline, still busy with that task: its round's task and starting model.
    pub late: BTreeMap<u64, Late>,
    /// Late results accepted for the next aggregation (`late_results = "next_round"`), each
    /// with the model its client started from.
    pub carried: Vec<(Contribution, Arc<Vec<f32>>)>,
    /// On a root: the round's results come from edges through NATS, not from tabs here.
    pub edges: Option<crate::scale::root::Edges>,
}

/// A task whose deadline passed before its result came.
pub struct Late {
    pub task: Task,
    /// The (masked) global model the task started from.
    pub start: Arc<Vec<f32>>,
}

/// What came back from one round's clients.
pub(crate) struct Collected {
    /// Buffered results (when the round does not stream).
    pub(crate) results: Vec<Contribution>,
    /// The round's running sums, when the strategy and the robust rule allow streaming.
    pub(crate) stream: Option<StreamRound>,
    pub(crate) dropped: usize,
    pub(crate) rejected: usize,
    /// Time spent validating and folding results, and how long each waited between its
    /// session reading it and the loop having folded (or buffered) it.
    pub(crate) fold: Duration,
    pub(crate) waits: Vec<Duration>,
}

impl Collected {
    fn count(&self) -> usize {
        self.stream
            .as_ref()
            .map_or(self.results.len(), |s| s.results())
    }
}

impl RoundLoop {
    pub async fn run(mut self) {
        // Seeded from the run's seed and the first round: a resumed run samples reproducibly for
        // its resume point, but from a new stream, not the draws the uninterrupted run would make.
        let mut rng = StdRng::seed_from_u64(self.seed ^ (self.first_round as u64 - 1));
        let mut round = self.first_round;
        let mut retries = 0;
        while self.proceed(round).await {
            let views = self.wait_for_clients(round).await;
            if views.is_empty() {
                continue; // paused or stopped while waiting: proceed() decides
            }
            let views = self.cap_clients(views, &mut rng);
            let global = self.global.lock().unwrap().clone();
            let started = Instant::now();
            // A strategy may compute here (HideNseek's SynFlow): off the async workers' backs.
            let tasks = tokio::task::block_in_place(|| {
                self.strategy
                    .configure_round(round, &global, &views, &mut rng)
            });
            if tasks.is_empty() {
                tracing::warn!(round, "strategy configured no tasks; waiting");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let deadline = tasks
                .iter()
                .map(|(_, t)| t.deadline_ms)
                .max()
                .unwrap_or(60_000);
            let start = Arc::new(global.masked_params());
            // Streaming: each accepted result is folded into running sums and dropped.
            let stream = StreamRound::start(&self.robust, self.strategy.fold(), start.clone());
            let (mut got, sampled, send_time) = if self.edges.is_some() {
                match self
                    .from_edges(round, &global, tasks, deadline, stream)
                    .await
                {
                    Some(g) => g,
                    None => break,
                }
            } else {
                let pending = self.send_tasks(round, tasks);
                let send_time = started.elapsed();
                let sampled = pending.len();
                let got = self
                    .collect(
                        round,
                        pending,
                        Duration::from_millis(deadline),
                        &start,
                        &global,
                        stream,
                    )
                    .await;
                self.desk.close();
                (got, sampled, send_time)
            };
            if got.count() < self.min_results.min(sampled) || got.count() == 0 {
                retries += 1;
                tracing::warn!(
                    round,
                    results = got.count(),
                    needed = self.min_results,
                    "too few results; retrying the round"
                );
                continue;
            }
            self.hub
                .lock()
                .unwrap()
                .set_phase(Phase::Aggregating, round);
            let aggregating = Instant::now();
            let late = self.take_carried(round, &start);
            let late_count = late.len();
            let streamed = got.stream.is_some();
            let mut next = global.clone();
            let (aggregated, combined) = {
                // Not held across an await below: the validator is not Send.
                let validate = evaluate::validator(self.validation.clone());
                let ctx = RoundContext {
                    rounds: self.rounds,
                    validate: &validate,
                };
                if let Some(mut stream) = got.stream.take() {
                    for c in late {
                        let client = c.client;
                        if let Err(e) = self
                            .strategy
                            .complete(c, &global)
                            .and_then(|c| stream.add(c))
                        {
                            tracing::warn!(round, client, "late result set aside: {e}");
                        }
                    }
                    let s = stream.finish();
                    self.note_verdicts(round, &s.combined);
                    got.results = s.results;
                    let a = tokio::task::block_in_place(|| {
                        self.strategy
                            .aggregate_sum(round, &mut next, &s.sum, &got.results, &ctx)
                    });
                    (a, s.combined)
                } else {
                    // Arrival order varies from run to run; summing in client order keeps runs reproducible.
                    got.results.sort_by_key(|c| c.client);
                    got.results.extend(late);
                    // In the global model's coordinates (split learning: the front with its back).
                    got.results = std::mem::take(&mut got.results)
                        .into_iter()
                        .filter_map(|c| {
                            let client = c.client;
                            self.strategy
                                .complete(c, &global)
                                .map_err(|e| tracing::warn!(round, client, "result set aside: {e}"))
                                .ok()
                        })
                        .collect();
                    if got.results.is_empty() {
                        retries += 1;
                        tracing::warn!(round, "no result could be completed; retrying the round");
                        continue;
                    }
                    // The record keeps who contributed what (not the vectors); the layer takes the vectors.
                    let summary: Vec<Contribution> = got
                        .results
                        .iter()
                        .map(|c| Contribution {
                            values: Vec::new(),
                            metrics: c.metrics.clone(),
                            ..*c
                        })
                        .collect();
                    let judged =
                        self.judge(round, &start, std::mem::replace(&mut got.results, summary));
                    let (robust_results, combined) = match judged {
                        Ok(r) => r,
                        Err(e) => {
                            retries += 1;
                            tracing::error!(
                                round,
                                "robust aggregation failed, retrying the round: {e}"
                            );
                            continue;
                        }
                    };
                    let a = tokio::task::block_in_place(|| {
                        self.strategy
                            .aggregate(round, &mut next, &robust_results, &ctx)
                    });
                    (a, combined)
                }
            };
            let aggregate_time = aggregating.elapsed();
            let outcome = match aggregated {
                Ok(mut o) => {
                    o.metrics.extend(robust::round_metrics(&combined));
                    if self.late_results == LateResults::NextRound {
                        o.metrics
                            .insert(keys::LATE_RESULTS.into(), late_count as f64);
                    }
                    got.waits.sort();
                    let pct = |p: f64| {
                        got.waits
                            .get(((got.waits.len() as f64 - 1.0) * p).round() as usize)
                            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
                    };
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    o.metrics.extend([
                        (keys::SERVER_STREAMED.to_string(), streamed as u8 as f64),
                        (keys::SERVER_SEND_MS.to_string(), ms(send_time)),
                        (keys::SERVER_FOLD_MS.to_string(), ms(got.fold)),
                        (keys::SERVER_AGGREGATE_MS.to_string(), ms(aggregate_time)),
                        (keys::SERVER_RESULT_WAIT_P50_MS.to_string(), pct(0.5)),
                        (keys::SERVER_RESULT_WAIT_P99_MS.to_string(), pct(0.99)),
                    ]);
                    o
                }
                Err(e) => {
                    retries += 1;
                    tracing::error!(round, "aggregation failed, retrying the round: {e}");
                    continue;
                }
            };
            let eval = evaluate::on(&next, &self.test).await.unwrap_or_else(|e| {
                tracing::error!(round, "evaluating the global model failed: {e}");
                Default::default()
            });
            let record = {
                let mut hub = self.hub.lock().unwrap();
                let tally = RoundTally {
                    round,
                    seconds: started.elapsed().as_secs_f64(),
                    sampled,
                    dropped: got.dropped,
                    rejected: got.rejected,
                    retries,
                };
                // The model the clients trained this round (a strategy may shrink it after).
                let backend_of = |id| {
                    hub.client(id)
                        .map(|c| c.device.backend.to_string())
                        .unwrap_or_default()
                };
                let record = RoundRecord::new(
                    tally,
                    &got.results,
                    eval,
                    &global.arch,
                    hub.round_bytes(),
                    backend_of,
                    outcome,
                );
                hub.record(record.clone());
                record
            };
            *self.global.lock().unwrap() = next;
            tracing::info!(
                round,
                accuracy = format!("{:.4}", record.test_accuracy),
                loss = format!("{:.4}", record.test_loss),
                results = record.results,
                up = record.bytes_up,
                down = record.bytes_down,
                "round done"
            );
            self.save();
            retries = 0;
            round += 1;
        }
        let stopped = self.hub.lock().unwrap().control().stop;
        let (phase, reason) = if stopped {
            (Phase::Stopped, "run stopped from the dashboard")
        } else {
            (Phase::Done, "run finished")
        };
        if let Some(edges) = &self.edges {
            edges.finish(reason).await;
        }
        self.say_bye(phase, round - 1, reason);
        self.save();
        self.goodbye().await;
        tracing::info!("run finished: {}", self.run_dir.display());
    }

    /// A round run by the edges: announced, then their partials merged as they come. `None`
    /// when the run cannot go on across edges (a strategy that needs every update).
    async fn from_edges(
        &mut self,
        round: u32,
        global: &ModelState,
        tasks: Vec<(u64, Task)>,
        deadline_ms: u64,
        stream: Option<StreamRound>,
    ) -> Option<(Collected, usize, Duration)> {
        let (Some(fold), Some(stream)) = (self.strategy.fold(), stream) else {
            tracing::error!(
                round,
                "this strategy needs every update in one place this round; it cannot run across edges (see the README, \"Beyond one server\"): stopping"
            );
            self.hub.lock().unwrap().stop();
            return None;
        };
        let phase = self.strategy.phase();
        let edges = self.edges.as_mut().expect("checked");
        match edges
            .run_round(
                round,
                global,
                tasks,
                deadline_ms,
                phase,
                fold,
                &self.robust,
                stream,
            )
            .await
        {
            Ok(g) => Some((
                Collected {
                    results: Vec::new(),
                    stream: Some(g.stream),
                    dropped: g.dropped,
                    rejected: g.rejected,
                    fold: g.merge,
                    waits: Vec::new(),
                },
                g.sampled,
                g.send,
            )),
            Err(e) => {
                tracing::error!(round, "the round could not run on the edges: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                // No results: the loop retries the round.
                Some((
                    Collected {
                        results: Vec::new(),
                        stream: None,
                        dropped: 0,
                        rejected: 0,
                        fold: Duration::ZERO,
                        waits: Vec::new(),
                    },
                    0,
                    Duration::ZERO,
                ))
            }
        }
    }

    /// The run is over: every client is told why, and each session's writer sends the Bye, then
    /// closes. (Then [`RoundLoop::goodbye`] waits for them.)
    pub(crate) fn say_bye(&self, phase: Phase, round: u32, reason: &str) {
        let mut hub = self.hub.lock().unwrap();
        hub.set_phase(phase, round);
        hub.broadcast(&ServerMsg::Bye {
            reason: reason.into(),
        });
        hub.close_all();
    }

    /// Waits (up to `goodbye`) until every client's session has sent its Bye and ended, so a
    /// server that exits when done does not cut anyone's Bye off.
    pub(crate) async fn goodbye(&mut self) {
        let until = Instant::now() + self.goodbye;
        loop {
            let left = self.hub.lock().unwrap().connected();
            if left == 0 {
                return;
            }
            if Instant::now() >= until {
                tracing::warn!(left, "clients still connected after Bye; exiting anyway");
                return;
            }
            // Keep draining messages, so nothing blocks a session that is ending.
            let _ = timeout(Duration::from_millis(20), self.incoming.recv()).await;
        }
    }

    /// Late results accepted since the last aggregation, rebased onto this round's model; those
    /// that no longer fit it (a pruned model changed shape) are dropped.
    fn take_carried(&mut self, round: u32, start: &[f32]) -> Vec<Contribution> {
        let mut out = Vec::new();
        for (mut c, old) in std::mem::take(&mut self.carried) {
            if c.values.len() != start.len() || old.len() != start.len() {
                tracing::warn!(
                    round,
                    client = c.client,
                    "late result no longer fits the model; dropped"
                );
                continue;
            }
            if c.kind == canopy_core::strategy::UploadKind::Weights {
                // Trained weights minus where they started, added to where this round starts.
                for ((v, o), s) in c.values.iter_mut().zip(old.iter()).zip(start) {
                    *v = *v - o + s;
                }
            }
            out.push(c);
        }
        out.sort_by_key(|c| c.client);
        out
    }

    /// At a round boundary: holds while the dashboard paused the run, then says whether round
    /// `round` should run (not stopped, and within the round count, which the dashboard can change).
    async fn proceed(&mut self, round: u32) -> bool {
        loop {
            {
                let mut hub = self.hub.lock().unwrap();
                self.rounds = hub.planned_rounds();
                let c = hub.control();
                if c.stop || round > self.rounds {
                    return false;
                }
                if !c.paused && !c.held {
                    return true;
                }
                hub.set_phase(Phase::Paused, round - 1);
            }
            if let Ok(Some(msg)) = timeout(Duration::from_millis(200), self.incoming.recv()).await {
                self.stray(msg, None, false);
            }
        }
    }

    /// The dashboard's "clients per round": offer the strategy a random subset of that size.
    fn cap_clients(&self, mut views: Vec<ClientView>, rng: &mut StdRng) -> Vec<ClientView> {
        if let Some(n) = self.hub.lock().unwrap().control().clients_per_round
            && views.len() > n
        {
            views.shuffle(rng);
            views.truncate(n.max(1));
            views.sort_by_key(|c| c.id);
        }
        views
    }

    /// Waits until `min_clients` are connected and idle; meanwhile handles stray messages.
    /// Returns no clients when the dashboard paused or stopped the run meanwhile.
    async fn wait_for_clients(&mut self, round: u32) -> Vec<ClientView> {
        self.hub
            .lock()
            .unwrap()
            .set_phase(Phase::WaitingForClients, round);
        let mut said = false;
        let since = Instant::now();
        loop {
            {
                let hub = self.hub.lock().unwrap();
                if hub.control().paused || hub.control().stop {
                    return Vec::new();
                }
                let (idle, settled) = match &self.edges {
                    // Edges' reports from before now may show last round's clients still busy:
                    // wait (up to the edge timeout) until every live edge has reported again.
                    Some(e) => hub.edge_idle_since(e.timeout, Some(since)),
                    None => (hub.idle_clients(), true),
                };
                let settled = settled
                    || self
                        .edges
                        .as_ref()
                        .is_some_and(|e| since.elapsed() >= e.timeout);
                if idle.len() >= self.min_clients.max(1) && settled {
                    return idle;
                }
                if !said {
                    tracing::info!(
                        round,
                        connected = hub.connected(),
                        needed = self.min_clients,
                        "waiting for clients"
                    );
                    said = true;
                }
            }
            if let Ok(Some(msg)) = timeout(Duration::from_millis(200), self.incoming.recv()).await {
                self.stray(msg, None, false);
            }
        }
    }

    pub(crate) fn send_tasks(
        &mut self,
        round: u32,
        tasks: Vec<(u64, Task)>,
    ) -> BTreeMap<u64, Task> {
        let mut hub = self.hub.lock().unwrap();
        hub.begin_round(round, self.strategy.phase());
        let mut pending = BTreeMap::new();
        // Requests within the round may come as soon as the first task is out.
        self.desk.open(
            round,
            self.strategy.exchange(),
            tasks.iter().map(|(id, _)| *id),
        );
        // Each distinct model is encoded once (twice with a mask: in full, and with only its
        // version for clients that hold it) and shared by every frame that carries it.
        let mut encoded: BTreeMap<(usize, bool), Bytes> = BTreeMap::new();
        for (id, task) in tasks {
            // The mask travels once: a client that holds this version gets only its number.
            let cached = matches!(&task.model.mask, Some(MaskSpec::Full { version, .. }) if hub.mask_version(id) == Some(*version));
            let key = (Arc::as_ptr(&task.model) as usize, cached);
            let model = encoded
                .entry(key)
                .or_insert_with(|| {
                    if cached {
                        let version = task.model.mask.as_ref().map_or(0, |m| m.version());
                        let wire = ModelPayload {
                            mask: Some(MaskSpec::Cached { version }),
                            ..(*task.model).clone()
                        };
                        encode_model_part(&wire).into()
                    } else {
                        encode_model_part(&task.model).into()
                    }
                })
                .clone();
            let frame = Frame::from_parts(vec![
                encode_task_head(&task).into(),
                model,
                encode_task_tail(&task).into(),
            ]);
            if hub.send_frame(id, frame) > 0 {
                hub.task_sent(id, round);
                pending.insert(id, task);
            } else {
                self.desk.close_client(id);
            }
        }
        for c in hub.idle_clients() {
            hub.send(
                c.id,
                &ServerMsg::Wait {
                    round,
                    reason: "not sampled this round".into(),
                },
            );
        }
        pending
    }

    /// Collects results until every sampled client answered, vanished or the deadline passed.
    /// A streamed round folds each accepted result at once, in the global model's coordinates
    /// (`Strategy::complete`; a result that cannot be completed is rejected).
    pub(crate) async fn collect(
        &mut self,
        round: u32,
        mut pending: BTreeMap<u64, Task>,
        deadline: Duration,
        start: &Arc<Vec<f32>>,
        global: &ModelState,
        stream: Option<StreamRound>,
    ) -> Collected {
        let until = tokio::time::Instant::now() + deadline;
        let mut got = Collected {
            results: Vec::new(),
            stream,
            dropped: 0,
            rejected: 0,
            fold: Duration::ZERO,
            waits: Vec::new(),
        };
        while !pending.is_empty() {
            let msg = tokio::select! {
                m = self.incoming.recv() => match m { Some(m) => m, None => break },
                _ = sleep_until(until) => {
                    let what = if self.late_results == LateResults::NextRound { "counting them in the next round" } else { "they will be dropped" };
                    tracing::warn!(round, late = pending.len(), "deadline passed; late clients stay busy until their results come ({what})");
                    got.dropped += pending.len();
                    // Still busy (status Training): not sampled again until the result or a disconnect.
                    for (id, task) in std::mem::take(&mut pending) {
                        self.desk.close_client(id);
                        self.late.insert(id, Late { task, start: start.clone() });
                    }
                    break;
                }
            };
            match msg {
                Incoming::Result { client, result, at }
                    if pending.contains_key(&client) && result.round == round =>
                {
                    let folding = Instant::now();
                    let task = pending.remove(&client).expect("checked");
                    self.desk.close_client(client);
                    let mut hub = self.hub.lock().unwrap();
                    hub.set_status(client, Status::Idle);
                    let mask_version = result.mask_version;
                    let accepted = accept(client, &task, result, hub.train_samples(client));
                    // Folded (its vector dropped) when the round streams, kept otherwise.
                    let accepted = match (accepted, &mut got.stream) {
                        (Ok(c), Some(stream)) => {
                            let samples_per_sec = c.metrics.samples_per_sec;
                            self.strategy
                                .complete(c, global)
                                .and_then(|c| stream.add(c))
                                .map(|_| (samples_per_sec, ()))
                        }
                        (Ok(c), None) => {
                            let samples_per_sec = c.metrics.samples_per_sec;
                            got.results.push(c);
                            Ok((samples_per_sec, ()))
                        }
                        (Err(e), _) => Err(e),
                    };
                    got.fold += folding.elapsed();
                    got.waits.push(at.elapsed());
                    match accepted {
                        Ok((samples_per_sec, ())) => {
                            hub.result_accepted(client, samples_per_sec, mask_version);
                        }
                        Err(why) => {
                            got.rejected += 1;
                            tracing::warn!(round, client, "rejected result: {why}");
                            hub.send(
                                client,
                                &ServerMsg::Error {
                                    code: ErrorCode::Rejected,
                                    message: format!("result rejected: {why}"),
                                },
                            );
                        }
                    }
                }
                Incoming::Failed {
                    client,
                    round: Some(r),
                    message,
                } if r == round && pending.remove(&client).is_some() => {
                    tracing::warn!(round, client, "client could not finish its task: {message}");
                    self.desk.close_client(client);
                    self.hub.lock().unwrap().task_failed(client);
                    got.dropped += 1;
                }
                Incoming::Gone { client } if pending.remove(&client).is_some() => {
                    tracing::warn!(round, client, "client left mid-round");
                    got.dropped += 1;
                }
                other => {
                    let busy = match &other {
                        Incoming::Result { client, .. }
                        | Incoming::Failed { client, .. }
                        | Incoming::Gone { client } => pending.contains_key(client),
                    };
                    self.stray(other, Some(round), busy)
                }
            }
        }
        got
    }

    /// The robust layer: what the strategy aggregates, and each client's verdict (logged, and
    /// counted in the client table's suspicion columns).
    /// `reference` is the (masked) global model the round's tasks started from.
    fn judge(
        &self,
        round: u32,
        reference: &[f32],
        results: Vec<Contribution>,
    ) -> Result<(Vec<Contribution>, robust::Combined), String> {
        let (out, combined) =
            tokio::task::block_in_place(|| robust::apply(&self.robust, reference, results))?;
        self.note_verdicts(round, &combined);
        Ok((out, combined))
    }

    /// Each client's verdict into the hub's suspicion counts; what the layer acted on is logged.
    fn note_verdicts(&self, round: u32, combined: &robust::Combined) {
        let mut hub = self.hub.lock().unwrap();
        for v in &combined.verdicts {
            hub.judged(v);
            if v.rejected || v.down_weighted || v.clipped {
                tracing::warn!(
                    round,
                    client = v.client,
                    norm_ratio = format!("{:.2}", v.norm_ratio),
                    scale = format!("{:.3}", v.scale),
                    "update {}",
                    v.action()
                );
            }
        }
    }

    /// Messages that belong to no task pending in this round. `busy`: the client has a task
    /// pending in the current round, so this message must not make it idle.
    pub(crate) fn stray(&mut self, msg: Incoming, round: Option<u32>, busy: bool) {
        match msg {
            Incoming::Result { client, result, .. } => {
                let late = self
                    .late
                    .get(&client)
                    .is_some_and(|l| l.task.round == result.round);
                let late = if late {
                    self.late.remove(&client)
                } else {
                    None
                };
                if let Some(l) = late {
                    // The straggler is free again, whatever becomes of its result.
                    let mut hub = self.hub.lock().unwrap();
                    if !busy {
                        hub.set_status(client, Status::Idle);
                    }
                    let counted = self.late_results == LateResults::NextRound;
                    match accept(client, &l.task, result, hub.train_samples(client)) {
                        Ok(c) if counted => {
                            tracing::info!(
                                client,
                                round = l.task.round,
                                "late result accepted for the next aggregation"
                            );
                            self.carried.retain(|(o, _)| o.client != client);
                            self.carried.push((c, l.start));
                        }
                        Ok(_) => {
                            let why = format!(
                                "result for round {} came after its deadline; late results are dropped",
                                l.task.round
                            );
                            tracing::warn!(client, "{why}");
                            hub.send(
                                client,
                                &ServerMsg::Error {
                                    code: ErrorCode::Rejected,
                                    message: why,
                                },
                            );
                        }
                        Err(why) => {
                            tracing::warn!(client, "rejected late result: {why}");
                            hub.send(
                                client,
                                &ServerMsg::Error {
                                    code: ErrorCode::Rejected,
                                    message: format!("result rejected: {why}"),
                                },
                            );
                        }
                    }
                    return;
                }
                let why = match round {
                    Some(r) if r == result.round => {
                        format!("this client has no task pending in round {r}")
                    }
                    Some(r) => format!(
                        "result for round {} arrived during round {r}; it answers no task",
                        result.round
                    ),
                    None => format!(
                        "result for round {} arrived between rounds; it answers no task",
                        result.round
                    ),
                };
                tracing::warn!(client, "rejected result: {why}");
                let mut hub = self.hub.lock().unwrap();
                // Only a result for the task a client is busy with frees it, never an old one.
                if !busy && !self.late.contains_key(&client) {
                    hub.set_status(client, Status::Idle);
                }
                hub.send(
                    client,
                    &ServerMsg::Error {
                        code: ErrorCode::Rejected,
                        message: why,
                    },
                );
            }
            Incoming::Failed {
                client,
                round: r,
                message,
            } => {
                tracing::warn!(client, "client error: {message}");
                let answers_late = self
                    .late
                    .get(&client)
                    .is_some_and(|l| r.is_none_or(|r| r == l.task.round));
                if answers_late {
                    self.late.remove(&client);
                }
                if !busy && (answers_late || !self.late.contains_key(&client)) {
                    self.hub.lock().unwrap().set_status(client, Status::Idle);
                }
            }
            Incoming::Gone { client } => {
                self.late.remove(&client);
            }
        }
    }

    /// Metrics, model and checkpoint into the run folder.
    fn save(&self) {
        let global = self.global.lock().unwrap().clone();
        let (json, rows) = {
            let hub = self.hub.lock().unwrap();
            (
                crate::hub::snapshot::snapshot(&hub, &self.config_json, &global.arch),
                hub.rounds().to_vec(),
            )
        };
        if let Err(e) = record::write(&self.run_dir, &json, &rows) {
            tracing::error!("writing metrics to {}: {e}", self.run_dir.display());
        }
        let done = rows.last().map_or(0, |r| r.round);
        if let Err(e) = checkpoint::save(
            &self.run_dir,
            &Checkpoint {
                round: done,
                global,
                strategy: self.strategy.save_state(),
            },
        ) {
            tracing::error!("{e}");
        }
    }
}
