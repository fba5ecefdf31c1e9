//! The round loop. It knows the [`Strategy`] trait only: which method runs is the strategy's
//! business, as are the tasks it hands out and how results become the next global model. Each
//! round runs as the strategy's [`RoundPlan`] says (its tasks, whether it streams, its phase,
//! its exchange), through [`RoundLoop::run_plan`], the seam an edge runs the root's rounds
//! through too.
//! Records, checkpoints and evaluation live beside it (`metrics`, `checkpoint`, `evaluate`);
//! in-round requests are answered by the [`Desk`], never here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use canopy_core::aggregate::robust::{self, RobustConfig};
use canopy_core::aggregate::stream::{Prior, StreamRound};
use canopy_core::data::Dataset;
use canopy_core::metric_keys as keys;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::{
    MaskSpec, ModelPayload, ServerMsg, Task, encode_model_part, encode_task_head, encode_task_tail,
};
use canopy_core::strategy::{
    ClientView, Contribution, RoundContext, RoundOutcome, RoundPlan, Strategy, accept,
};
use canopy_core::train::Eval;
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{sleep_until, timeout};

use crate::config::LateResults;
use crate::hub::{Hub, Phase, Refusal, Status};
use crate::round::checkpoint::{self, Checkpoint};
use crate::round::evaluate;
use crate::round::exchange::Desk;
use crate::round::inbox::Incoming;
use crate::round::record::{self, RoundRecord, RoundTally};
use crate::serve::outbox::Frame;

#[cfg(test)]
mod tests;

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
    /// What the last aggregated round left for the next one's norm bound (its median update
    /// norm; under `clip = "centred"` its combined update too) and the model length it was
    /// measured on (`None`: the next streamed round finds its own bound).
    pub norm_prior: Option<(usize, Prior)>,
}

/// A task whose deadline passed before its result came.
pub struct Late {
    pub task: Task,
    /// The (masked) global model the task started from.
    pub start: Arc<Vec<f32>>,
}

/// What came back from one round's clients ([`RoundLoop::run_plan`], or the edges' partials).
pub struct Collected {
    /// Buffered results (when the round does not stream).
    pub results: Vec<Contribution>,
    /// The round's running sums, when the plan and the robust rule allow streaming.
    pub stream: Option<StreamRound>,
    /// The (masked) global model the round's tasks started from.
    pub start: Arc<Vec<f32>>,
    /// Clients whose task went out.
    pub sampled: usize,
    pub dropped: usize,
    pub rejected: usize,
    /// On a root: results the edges carried into their partials from the round before (their
    /// `late_results = "next_round"`), already in the sums.
    pub late: usize,
    /// Time spent queueing the task frames (or announcing the round to the edges).
    pub send: Duration,
    /// Time spent validating and folding results, and how long each waited between its
    /// session reading it and the loop having folded (or buffered) it.
    pub fold: Duration,
    pub waits: Vec<Duration>,
}

impl Collected {
    /// Results that came back (buffered or folded).
    pub fn count(&self) -> usize {
        self.stream
            .as_ref()
            .map_or(self.results.len(), |s| s.results())
    }

    /// Nothing came back (the round could not be run; the loop retries it).
    pub(crate) fn none(start: Arc<Vec<f32>>) -> Collected {
        Collected {
            results: Vec::new(),
            stream: None,
            start,
            sampled: 0,
            dropped: 0,
            rejected: 0,
            late: 0,
            send: Duration::ZERO,
            fold: Duration::ZERO,
            waits: Vec::new(),
        }
    }
}

/// How one attempt at a round ended, for [`RoundLoop::run`].
enum Attempt {
    /// Aggregated, recorded and saved: on to the next round.
    Done,
    /// Too few results, or aggregation failed: the same round again, counted as a retry.
    Retry,
    /// No clients or no tasks this time: the same round again, not counted.
    Again,
    /// The run cannot go on.
    Stop,
}

/// A round's aggregation: the next global model, what the strategy reported and what the robust
/// layer did.
struct Aggregated {
    next: ModelState,
    outcome: Result<RoundOutcome, String>,
    combined: robust::Combined,
}

impl RoundLoop {
    pub async fn run(mut self) {
        // Seeded from the run's seed and the first round: a resumed run samples reproducibly for
        // its resume point, but from a new stream, not the draws the uninterrupted run would make.
        let mut rng = StdRng::seed_from_u64(self.seed ^ (self.first_round as u64 - 1));
        let mut round = self.first_round;
        let mut retries = 0;
        while self.proceed(round).await {
            match self.attempt(round, retries, &mut rng).await {
                Attempt::Done => {
                    retries = 0;
                    round += 1;
                }
                Attempt::Retry => retries += 1,
                Attempt::Again => {}
                Attempt::Stop => break,
            }
        }
        self.end(round).await;
    }

    /// One attempt at round `round`: clients, the strategy's plan, the round on the clients (or
    /// the edges), aggregation, evaluation, the record and the save.
    async fn attempt(&mut self, round: u32, retries: u32, rng: &mut StdRng) -> Attempt {
        let views = self.wait_for_clients(round).await;
        if views.is_empty() {
            return Attempt::Again; // paused or stopped while waiting: proceed() decides
        }
        let views = self.cap_clients(views, rng);
        let global = self.global.lock().unwrap().clone();
        let started = Instant::now();
        // A strategy may compute here (HideNseek's SynFlow): off the async workers' backs.
        let plan = tokio::task::block_in_place(|| {
            self.strategy.configure_round(round, &global, &views, rng)
        });
        if plan.tasks.is_empty() {
            tracing::warn!(round, "strategy configured no tasks; waiting");
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Attempt::Again;
        }
        let deadline = plan.deadline_ms().unwrap_or(60_000);
        let mut got = if self.edges.is_some() {
            match self.on_edges(round, &global, plan, deadline).await {
                Some(g) => g,
                None => return Attempt::Stop,
            }
        } else {
            let configured = started.elapsed();
            let robust = self.robust.clone();
            let mut got = self.run_plan(round, plan, &global, deadline, &robust).await;
            // The send time counts configuring the round too.
            got.send += configured;
            got
        };
        if self.too_few(round, &got) {
            return Attempt::Retry;
        }
        match self
            .conclude(round, retries, started, &global, &mut got, Vec::new())
            .await
        {
            true => Attempt::Done,
            false => Attempt::Retry,
        }
    }

    /// What came back becomes the next global model: aggregated (with `extra` added to the
    /// outcome's figures), evaluated on the test set, recorded and saved. A round of this loop
    /// ends here, and so does a step of the buffered driver (`round/buffered.rs`). `started`:
    /// when the round (or the step's buffer) began. `false` (said why): nothing was aggregated.
    pub(crate) async fn conclude(
        &mut self,
        round: u32,
        retries: u32,
        started: Instant,
        global: &ModelState,
        got: &mut Collected,
        extra: Vec<(String, f64)>,
    ) -> bool {
        self.hub
            .lock()
            .unwrap()
            .set_phase(Phase::Aggregating, round);
        let Some((next, mut outcome)) = self.aggregate(round, global, got) else {
            return false;
        };
        outcome.metrics.extend(extra);
        let eval = evaluate::on(&next, &self.test).await.unwrap_or_else(|e| {
            tracing::error!(round, "evaluating the global model failed: {e}");
            Default::default()
        });
        let tally = RoundTally {
            round,
            seconds: started.elapsed().as_secs_f64(),
            sampled: got.sampled,
            dropped: got.dropped,
            rejected: got.rejected,
            retries,
        };
        self.record_and_save(tally, &got.results, eval, global, next, outcome);
        true
    }

    /// Runs one round on this server's own clients, as `plan` says: sends its tasks (the
    /// dashboard showing its phase, the desk answering in-round requests with its exchange),
    /// then collects results until every sampled client answered, vanished or `deadline_ms`
    /// passed. Each accepted result is folded into running sums as it comes, bounded by
    /// `robust` one at a time, when the plan's fold and the rule allow streaming; otherwise it
    /// is kept whole. The single-server loop runs every round through here; an edge runs each
    /// round the root announces.
    pub async fn run_plan(
        &mut self,
        round: u32,
        plan: RoundPlan,
        global: &ModelState,
        deadline_ms: u64,
        robust: &RobustConfig,
    ) -> Collected {
        let sending = Instant::now();
        let start = Arc::new(global.masked_params());
        // Streaming: each accepted result is folded into running sums and dropped.
        let prior = self.prior(start.len());
        let expected = plan.tasks.len();
        let stream = StreamRound::start(robust, plan.fold, start.clone(), expected, &prior);
        let pending = self.send_tasks(round, plan);
        let send = sending.elapsed();
        let sampled = pending.len();
        let mut got = Collected {
            stream,
            sampled,
            send,
            ..Collected::none(start)
        };
        self.collect(
            round,
            pending,
            Duration::from_millis(deadline_ms),
            global,
            &mut got,
        )
        .await;
        self.desk.close();
        got
    }

    /// What the previous round left for the norm bound, if it was measured on a model of `len`
    /// values.
    pub(crate) fn prior(&self, len: usize) -> Prior {
        match &self.norm_prior {
            Some((l, p)) if *l == len => p.clone(),
            _ => Prior::default(),
        }
    }

    /// Keeps what a round's robust layer found (on a model of `len` values) for the next
    /// round's bound: its median norm and, under `clip = "centred"`, its combined update.
    pub(crate) fn remember(&mut self, len: usize, combined: &robust::Combined) {
        if !(combined.median_norm > 0.0 && combined.median_norm.is_finite()) {
            return;
        }
        let uses = self.robust.clip == robust::Clip::Centred
            || self.robust.rule == robust::Rule::DropFarthest;
        let centre =
            (uses && combined.delta.len() == len && combined.delta.iter().all(|x| x.is_finite()))
                .then(|| Arc::new(combined.delta.clone()));
        self.norm_prior = Some((
            len,
            Prior {
                median_norm: Some(combined.median_norm),
                centre,
            },
        ));
    }

    /// Too few results to aggregate: the round is retried.
    fn too_few(&self, round: u32, got: &Collected) -> bool {
        let few = got.count() < self.min_results.min(got.sampled) || got.count() == 0;
        if few {
            tracing::warn!(
                round,
                results = got.count(),
                needed = self.min_results,
                "too few results; retrying the round"
            );
        }
        few
    }

    /// The round's results, with the late ones carried into it, become the next global model:
    /// from the running sums when the round streamed, through the robust layer and
    /// `Strategy::aggregate` when it did not. `None` (said why): the round is retried.
    fn aggregate(
        &mut self,
        round: u32,
        global: &ModelState,
        got: &mut Collected,
    ) -> Option<(ModelState, RoundOutcome)> {
        let aggregating = Instant::now();
        let late = self.take_carried(round, &got.start);
        let late_count = late.len() + got.late;
        let streamed = got.stream.is_some();
        let Aggregated {
            next,
            outcome,
            combined,
        } = {
            // Not held across an await below: the validator is not Send.
            let validate = evaluate::validator(self.validation.clone());
            let ctx = RoundContext {
                rounds: self.rounds,
                validate: &validate,
            };
            match got.stream.take() {
                Some(stream) => self.aggregate_streamed(round, global, stream, late, got, &ctx),
                None => self.aggregate_buffered(round, global, late, got, &ctx)?,
            }
        };
        let aggregate_time = aggregating.elapsed();
        let mut o = outcome
            .map_err(|e| tracing::error!(round, "aggregation failed, retrying the round: {e}"))
            .ok()?;
        o.metrics.extend(robust::round_metrics(&combined));
        self.remember(got.start.len(), &combined);
        if self.late_results == LateResults::NextRound || late_count > 0 {
            o.metrics
                .insert(keys::LATE_RESULTS.into(), late_count as f64);
        }
        o.metrics.extend(timings(got, streamed, aggregate_time));
        Some((next, o))
    }

    /// A streamed round: late results folded into its sums too, then the strategy aggregates
    /// the sums. `got.results` become the summaries (no vectors) the record keeps.
    fn aggregate_streamed(
        &mut self,
        round: u32,
        global: &ModelState,
        mut stream: StreamRound,
        late: Vec<Contribution>,
        got: &mut Collected,
        ctx: &RoundContext,
    ) -> Aggregated {
        self.fold_late(round, global, &mut stream, late);
        let s = match stream.finish() {
            Ok(s) => s,
            Err(e) => {
                return Aggregated {
                    next: global.clone(),
                    outcome: Err(e),
                    combined: robust::Combined {
                        delta: Vec::new(),
                        verdicts: Vec::new(),
                        median_norm: 0.0,
                    },
                };
            }
        };
        self.note_verdicts(round, &s.combined);
        if !s.set_aside.is_empty() {
            // Across edges: partials far from every other (book: docs/src/operating/scale-out.md).
            tracing::warn!(
                round,
                partials = ?s.set_aside,
                "partials left out by the root's defence: each far from every other partial"
            );
        }
        got.results = s.results;
        let mut next = global.clone();
        let outcome = tokio::task::block_in_place(|| {
            self.strategy
                .aggregate_sum(round, &mut next, &s.sum, &got.results, ctx)
        });
        let left_out = s.set_aside.len();
        let outcome = outcome.map(|mut o| {
            if left_out > 0 {
                o.metrics
                    .insert(keys::PARTIALS_LEFT_OUT.into(), left_out as f64);
            }
            o
        });
        Aggregated {
            next,
            outcome,
            combined: s.combined,
        }
    }

    /// Late results (from [`RoundLoop::take_carried`]) completed and folded into a streamed
    /// round's sums, as a single server does before it aggregates and an edge before it
    /// publishes its partial. Returns how many went in; one that does not is set aside, said why.
    pub(crate) fn fold_late(
        &mut self,
        round: u32,
        global: &ModelState,
        stream: &mut StreamRound,
        late: Vec<Contribution>,
    ) -> usize {
        let mut folded = 0;
        for c in late {
            let client = c.client;
            match self
                .strategy
                .complete(c, global)
                .and_then(|c| stream.add(c))
            {
                Ok(_) => folded += 1,
                Err(e) => tracing::warn!(round, client, "late result set aside: {e}"),
            }
        }
        folded
    }

    /// A buffered round: every result (late ones too) completed into the global model's
    /// coordinates, judged together by the robust layer, then aggregated by the strategy.
    /// `got.results` become the summaries (no vectors) the record keeps. `None` (said why):
    /// nothing could be completed, or the robust layer failed.
    fn aggregate_buffered(
        &mut self,
        round: u32,
        global: &ModelState,
        late: Vec<Contribution>,
        got: &mut Collected,
        ctx: &RoundContext,
    ) -> Option<Aggregated> {
        // Arrival order varies from run to run; summing in client order keeps runs reproducible.
        got.results.sort_by_key(|c| c.client);
        got.results.extend(late);
        // In the global model's coordinates (split learning: the front with its back).
        got.results = std::mem::take(&mut got.results)
            .into_iter()
            .filter_map(|c| {
                let client = c.client;
                self.strategy
                    .complete(c, global)
                    .map_err(|e| tracing::warn!(round, client, "result set aside: {e}"))
                    .ok()
            })
            .collect();
        if got.results.is_empty() {
            tracing::warn!(round, "no result could be completed; retrying the round");
            return None;
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
        let start = got.start.clone();
        let judged = self.judge(round, &start, std::mem::replace(&mut got.results, summary));
        let (robust_results, combined) = judged
            .map_err(|e| {
                tracing::error!(round, "robust aggregation failed, retrying the round: {e}")
            })
            .ok()?;
        let mut next = global.clone();
        let outcome = tokio::task::block_in_place(|| {
            self.strategy
                .aggregate(round, &mut next, &robust_results, ctx)
        });
        Some(Aggregated {
            next,
            outcome,
            combined,
        })
    }

    /// The round's record into the hub, the next model into place, the run folder saved.
    fn record_and_save(
        &mut self,
        tally: RoundTally,
        results: &[Contribution],
        eval: Eval,
        global: &ModelState,
        next: ModelState,
        outcome: RoundOutcome,
    ) {
        let round = tally.round;
        let record = {
            let mut hub = self.hub.lock().unwrap();
            // The model the clients trained this round (a strategy may shrink it after).
            let backend_of = |id| {
                hub.client(id)
                    .map(|c| c.device.backend.to_string())
                    .unwrap_or_default()
            };
            let record = RoundRecord::new(
                tally,
                results,
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
    }

    /// The run is over (finished, or stopped from the dashboard): the edges and every client
    /// are told, the run folder saved, and clients given time to take their Bye.
    pub(crate) async fn end(&mut self, round: u32) {
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
    /// when the run cannot go on across edges (a round that needs every update in one place).
    async fn on_edges(
        &mut self,
        round: u32,
        global: &ModelState,
        plan: RoundPlan,
        deadline_ms: u64,
    ) -> Option<Collected> {
        let start = Arc::new(global.masked_params());
        let prior = self.prior(start.len());
        let stream = StreamRound::start(&self.robust, plan.fold, start.clone(), 0, &prior);
        let (Some(fold), Some(stream)) = (plan.fold, stream) else {
            tracing::error!(
                round,
                "this strategy needs every update in one place this round; it cannot run across edges (see the book, docs/src/operating/scale-out.md): stopping"
            );
            self.hub.lock().unwrap().stop();
            return None;
        };
        let edges = self.edges.as_mut().expect("checked");
        match edges
            .run_round(
                round,
                global,
                plan.tasks,
                deadline_ms,
                plan.phase,
                fold,
                &self.robust,
                stream,
            )
            .await
        {
            Ok(g) => Some(Collected {
                stream: Some(g.stream),
                sampled: g.sampled,
                dropped: g.dropped,
                rejected: g.rejected,
                late: g.late,
                send: g.send,
                fold: g.merge,
                ..Collected::none(start)
            }),
            Err(e) => {
                tracing::error!(round, "the round could not run on the edges: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                // No results: the loop retries the round.
                Some(Collected::none(start))
            }
        }
    }

    /// The run is over: every client is told why, and each session's writer sends the Bye, then
    /// closes. (Then [`RoundLoop::goodbye`] waits for them.)
    pub fn say_bye(&self, phase: Phase, round: u32, reason: &str) {
        let mut hub = self.hub.lock().unwrap();
        hub.set_phase(phase, round);
        hub.broadcast(&ServerMsg::Bye {
            reason: reason.into(),
        });
        hub.close_all();
    }

    /// Waits (up to `goodbye`) until every client's session has sent its Bye and ended, so a
    /// server that exits when done does not cut anyone's Bye off.
    pub async fn goodbye(&mut self) {
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
    pub(crate) fn take_carried(&mut self, round: u32, start: &[f32]) -> Vec<Contribution> {
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
    pub(crate) async fn proceed(&mut self, round: u32) -> bool {
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
                self.between_rounds(msg);
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
    pub(crate) async fn wait_for_clients(&mut self, round: u32) -> Vec<ClientView> {
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
                self.between_rounds(msg);
            }
        }
    }

    /// Sends the plan's tasks: the round begins (under the plan's phase), the desk opens to its
    /// exchange, each client gets its task frame and every idle one a Wait. The tasks that went
    /// out, by client.
    fn send_tasks(&mut self, round: u32, plan: RoundPlan) -> BTreeMap<u64, Task> {
        let RoundPlan {
            tasks,
            phase,
            exchange,
            ..
        } = plan;
        let mut hub = self.hub.lock().unwrap();
        hub.begin_round(round, phase);
        // Requests within the round may come as soon as the first task is out.
        self.desk
            .open(round, exchange, tasks.iter().map(|(id, _)| *id));
        let pending = self.send_frames(&mut hub, round, tasks);
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

    /// Writes each task's frame into its client's outbox and marks the client busy with it;
    /// the tasks that went out, by client.
    pub(crate) fn send_frames(
        &self,
        hub: &mut Hub,
        round: u32,
        tasks: Vec<(u64, Task)>,
    ) -> BTreeMap<u64, Task> {
        let mut pending = BTreeMap::new();
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
        pending
    }

    /// Collects results into `got` until every sampled client answered, vanished or the
    /// deadline passed. A streamed round (`got.stream`) folds each accepted result at once, in
    /// the global model's coordinates (`Strategy::complete`; a result that cannot be completed
    /// is rejected).
    async fn collect(
        &mut self,
        round: u32,
        mut pending: BTreeMap<u64, Task>,
        deadline: Duration,
        global: &ModelState,
        got: &mut Collected,
    ) {
        let until = tokio::time::Instant::now() + deadline;
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
                        self.late.insert(id, Late { task, start: got.start.clone() });
                    }
                    break;
                }
            };
            match msg {
                Incoming::Result {
                    client,
                    result,
                    at,
                    slot: _slot, // freed at the end of this arm, once the result is folded
                } if pending.contains_key(&client) && result.round == round => {
                    let folding = Instant::now();
                    let task = pending.remove(&client).expect("checked");
                    self.desk.close_client(client);
                    let shard = {
                        let mut hub = self.hub.lock().unwrap();
                        hub.set_status(client, Status::Idle);
                        hub.train_samples(client)
                    };
                    let mask_version = result.mask_version;
                    // Decoded, checked and folded without the hub's lock: the sessions take it
                    // too, and a fold is the longest step of a large round.
                    let accepted = accept(client, &task, result, shard);
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
                    let mut hub = self.hub.lock().unwrap();
                    match accepted {
                        Ok((samples_per_sec, ())) => {
                            hub.result_accepted(client, samples_per_sec, mask_version);
                        }
                        Err(why) => {
                            got.rejected += 1;
                            tracing::warn!(round, client, "rejected result: {why}");
                            hub.reject(client, Refusal::Invalid, format!("result rejected: {why}"));
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
        let centre = self.prior(reference.len()).centre;
        let (out, combined) = tokio::task::block_in_place(|| {
            robust::apply(
                &self.robust,
                reference,
                centre.as_deref().map(Vec::as_slice),
                results,
            )
        })?;
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

    /// A message that came between rounds (an edge waiting for the root's next round, the loop
    /// waiting for clients): a late result, a failure or a departure.
    pub fn between_rounds(&mut self, msg: Incoming) {
        self.stray(msg, None, false);
    }

    /// Messages that belong to no task pending in this round. `busy`: the client has a task
    /// pending in the current round, so this message must not make it idle.
    fn stray(&mut self, msg: Incoming, round: Option<u32>, busy: bool) {
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
                            hub.reject(client, Refusal::Late, why);
                        }
                        Err(why) => {
                            tracing::warn!(client, "rejected late result: {why}");
                            hub.reject(client, Refusal::Invalid, format!("result rejected: {why}"));
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
                hub.reject(client, Refusal::NoTask, why);
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

/// The loop's own figures for a round: whether it streamed, and where its time went.
fn timings(got: &mut Collected, streamed: bool, aggregate_time: Duration) -> Vec<(String, f64)> {
    got.waits.sort();
    let pct = |p: f64| {
        got.waits
            .get(((got.waits.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    vec![
        (keys::SERVER_STREAMED.to_string(), streamed as u8 as f64),
        (keys::SERVER_SEND_MS.to_string(), ms(got.send)),
        (keys::SERVER_FOLD_MS.to_string(), ms(got.fold)),
        (keys::SERVER_AGGREGATE_MS.to_string(), ms(aggregate_time)),
        (keys::SERVER_RESULT_WAIT_P50_MS.to_string(), pct(0.5)),
        (keys::SERVER_RESULT_WAIT_P99_MS.to_string(), pct(0.99)),
    ]
}
