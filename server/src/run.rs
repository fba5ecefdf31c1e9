//! The round loop. It knows the [`Strategy`] trait only: which method runs is the strategy's
//! business, as are the tasks it hands out and how results become the next global model.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use canopy_core::data::Dataset;
use canopy_core::protocol::{Blob, ErrorCode, MaskSpec, ServerMsg, Task, TaskResult, encode};
use canopy_core::robust::{self, RobustConfig};
use canopy_core::state::ModelState;
use canopy_core::strategy::{ClientView, Contribution, RoundContext, Strategy, accept};
use canopy_core::train::evaluate;
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{sleep_until, timeout};

use crate::hub::{Hub, Phase, Status};
use crate::metrics::{self, RoundRecord};

/// What WebSocket sessions pass to the round loop.
pub enum Incoming {
    Result { client: u64, result: TaskResult },
    /// The client reported that it could not do its task.
    Failed { client: u64, round: Option<u32>, message: String },
    Exchange { client: u64, round: u32, payload: Blob },
    Gone { client: u64 },
}

pub struct RoundLoop {
    pub hub: Arc<Mutex<Hub>>,
    pub incoming: UnboundedReceiver<Incoming>,
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
}

/// What a run folder's `checkpoint.bin` holds: enough to resume after a server restart.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Rounds completed.
    pub round: u32,
    pub global: ModelState,
    pub strategy: Vec<u8>,
}

impl RoundLoop {
    pub async fn run(mut self) {
        // The sampling stream continues where a resumed run left it.
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
            let tasks = self.strategy.configure_round(round, &global, &views, &mut rng);
            if tasks.is_empty() {
                tracing::warn!(round, "strategy configured no tasks; waiting");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let started = Instant::now();
            let deadline = tasks.iter().map(|(_, t)| t.deadline_ms).max().unwrap_or(60_000);
            let pending = self.send_tasks(round, tasks);
            let sampled = pending.len();
            let (mut results, dropped, rejected) = self.collect(round, pending, Duration::from_millis(deadline)).await;
            // Arrival order varies from run to run; summing in client order keeps runs reproducible.
            results.sort_by_key(|c| c.client);
            if results.len() < self.min_results.min(sampled) || results.is_empty() {
                retries += 1;
                tracing::warn!(round, results = results.len(), needed = self.min_results, "too few results; retrying the round");
                continue;
            }
            self.set_phase(Phase::Aggregating, round);
            let (robust_results, combined) = match self.judge(round, &global, &results) {
                Ok(r) => r,
                Err(e) => {
                    retries += 1;
                    tracing::error!(round, "robust aggregation failed, retrying the round: {e}");
                    continue;
                }
            };
            let mut next = global.clone();
            let aggregated = {
                let validation = self.validation.clone();
                let validate = move |m: &ModelState| {
                    pollster::block_on(evaluate(&m.arch, &m.masked_params(), &validation, &Device::flex())).unwrap_or_default()
                };
                let ctx = RoundContext { rounds: self.rounds, validate: &validate };
                tokio::task::block_in_place(|| self.strategy.aggregate(round, &mut next, &robust_results, &ctx))
            };
            let outcome = match aggregated {
                Ok(mut o) => {
                    o.metrics.extend(robust::round_metrics(&combined));
                    o
                }
                Err(e) => {
                    retries += 1;
                    tracing::error!(round, "aggregation failed, retrying the round: {e}");
                    continue;
                }
            };
            let eval = {
                let (arch, params, test) = (next.arch.clone(), next.masked_params(), self.test.clone());
                tokio::task::spawn_blocking(move || pollster::block_on(evaluate(&arch, &params, &test, &Device::flex())))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
            };
            let eval = match eval {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(round, "evaluating the global model failed: {e}");
                    Default::default()
                }
            };
            let record = {
                let mut hub = self.hub.lock().unwrap();
                let total: u64 = results.iter().map(|c| c.samples).sum();
                let record = RoundRecord {
                    round,
                    seconds: started.elapsed().as_secs_f64(),
                    sampled,
                    results: results.len(),
                    dropped,
                    rejected,
                    retries,
                    test_accuracy: eval.accuracy,
                    test_loss: eval.loss,
                    train_loss: (results.iter().map(|c| c.metrics.train_loss as f64 * c.samples as f64).sum::<f64>() / total.max(1) as f64) as f32,
                    local_accuracy: (results.iter().map(|c| c.metrics.local_test.accuracy as f64).sum::<f64>() / results.len() as f64) as f32,
                    samples: total,
                    bytes_up: hub.round_bytes_up,
                    bytes_down: hub.round_bytes_down,
                    // The model the clients trained this round (a strategy may shrink it after).
                    params: global.arch.num_params(),
                    flops_per_sample: global.arch.flops_per_sample(),
                    step_ms: results.iter().map(|c| 1000.0 * c.metrics.train_seconds / c.metrics.steps.max(1) as f64).sum::<f64>() / results.len() as f64,
                    backends: results.iter().map(|c| hub.clients.get(&c.client).map(|cl| cl.device.backend.to_string()).unwrap_or_default()).collect(),
                    participants: results.iter().map(|c| c.client).collect(),
                    extra: outcome.metrics,
                };
                hub.rounds.push(record.clone());
                record
            };
            *self.global.lock().unwrap() = next;
            tracing::info!(
                round, accuracy = format!("{:.4}", record.test_accuracy), loss = format!("{:.4}", record.test_loss),
                results = record.results, up = record.bytes_up, down = record.bytes_down, "round done"
            );
            self.save();
            retries = 0;
            round += 1;
        }
        let stopped = self.hub.lock().unwrap().control.stop;
        let (phase, reason) = if stopped { (Phase::Stopped, "run stopped from the dashboard") } else { (Phase::Done, "run finished") };
        self.set_phase(phase, round - 1);
        self.hub.lock().unwrap().broadcast(&ServerMsg::Bye { reason: reason.into() });
        self.save();
        tracing::info!("run finished: {}", self.run_dir.display());
    }

    /// At a round boundary: holds while the dashboard paused the run, then says whether round
    /// `round` should run (not stopped, and within the round count, which the dashboard can change).
    async fn proceed(&mut self, round: u32) -> bool {
        loop {
            {
                let mut hub = self.hub.lock().unwrap();
                self.rounds = hub.info.rounds;
                if hub.control.stop || round > self.rounds {
                    return false;
                }
                if !hub.control.paused && !hub.control.held {
                    return true;
                }
                hub.phase = Phase::Paused;
                hub.round = round - 1;
            }
            if let Ok(Some(msg)) = timeout(Duration::from_millis(200), self.incoming.recv()).await {
                self.stray(msg, None);
            }
        }
    }

    /// The dashboard's "clients per round": offer the strategy a random subset of that size.
    fn cap_clients(&self, mut views: Vec<ClientView>, rng: &mut StdRng) -> Vec<ClientView> {
        if let Some(n) = self.hub.lock().unwrap().control.clients_per_round
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
        self.set_phase(Phase::WaitingForClients, round);
        let mut said = false;
        loop {
            {
                let hub = self.hub.lock().unwrap();
                if hub.control.paused || hub.control.stop {
                    return Vec::new();
                }
                let idle = hub.idle_clients();
                if idle.len() >= self.min_clients.max(1) {
                    return idle.iter().map(|c| ClientView { id: c.id, samples: c.train_samples }).collect();
                }
                if !said {
                    tracing::info!(round, connected = hub.connected(), needed = self.min_clients, "waiting for clients");
                    said = true;
                }
            }
            if let Ok(Some(msg)) = timeout(Duration::from_millis(200), self.incoming.recv()).await {
                self.stray(msg, None);
            }
        }
    }

    fn send_tasks(&mut self, round: u32, tasks: Vec<(u64, Task)>) -> BTreeMap<u64, Task> {
        let mut hub = self.hub.lock().unwrap();
        hub.round = round;
        hub.round_bytes_up = 0;
        hub.round_bytes_down = 0;
        let mut pending = BTreeMap::new();
        let phase = self.strategy.phase();
        hub.phase = if phase == "exploring" { Phase::Exploring } else { Phase::Training };
        for (id, task) in tasks {
            // The mask travels once: a client that holds this version gets only its number.
            let mut wire = task.clone();
            if let Some(MaskSpec::Full { version, .. }) = &wire.model.mask
                && hub.clients.get(&id).is_some_and(|c| c.mask_version == Some(*version))
            {
                wire.model.mask = Some(MaskSpec::Cached { version: *version });
            }
            if hub.send_frame(id, encode(&ServerMsg::Task(wire))) > 0 {
                hub.set_status(id, Status::Training);
                if let Some(c) = hub.clients.get_mut(&id) {
                    c.last_round = Some(round);
                }
                pending.insert(id, task);
            }
        }
        let idle: Vec<u64> = hub.idle_clients().iter().map(|c| c.id).collect();
        for id in idle {
            hub.send(id, &ServerMsg::Wait { round, reason: "not sampled this round".into() });
        }
        pending
    }

    /// Collects results until every sampled client answered, vanished or the deadline passed.
    async fn collect(&mut self, round: u32, mut pending: BTreeMap<u64, Task>, deadline: Duration) -> (Vec<Contribution>, usize, usize) {
        let until = tokio::time::Instant::now() + deadline;
        let (mut results, mut dropped, mut rejected) = (Vec::new(), 0, 0);
        while !pending.is_empty() {
            let msg = tokio::select! {
                m = self.incoming.recv() => match m { Some(m) => m, None => break },
                _ = sleep_until(until) => {
                    tracing::warn!(round, late = pending.len(), "deadline passed; dropping late clients' results");
                    let mut hub = self.hub.lock().unwrap();
                    for id in pending.keys() {
                        hub.set_status(*id, Status::Idle);
                    }
                    dropped += pending.len();
                    break;
                }
            };
            match msg {
                Incoming::Result { client, result } if pending.contains_key(&client) && result.round == round => {
                    let task = pending.remove(&client).expect("checked");
                    let shard_samples = self.hub.lock().unwrap().clients.get(&client).map(|c| c.train_samples).unwrap_or(0);
                    let mut hub = self.hub.lock().unwrap();
                    hub.set_status(client, Status::Idle);
                    let mask_version = result.mask_version;
                    match accept(client, &task, result, shard_samples) {
                        Ok(contribution) => {
                            if let Some(c) = hub.clients.get_mut(&client) {
                                c.rounds_done += 1;
                                c.samples_per_sec = contribution.metrics.samples_per_sec;
                                c.mask_version = mask_version;
                            }
                            results.push(contribution);
                        }
                        Err(why) => {
                            rejected += 1;
                            tracing::warn!(round, client, "rejected result: {why}");
                            hub.send(client, &ServerMsg::Error { code: ErrorCode::Rejected, message: format!("result rejected: {why}") });
                        }
                    }
                }
                Incoming::Failed { client, round: Some(r), message } if r == round && pending.remove(&client).is_some() => {
                    tracing::warn!(round, client, "client could not finish its task: {message}");
                    let mut hub = self.hub.lock().unwrap();
                    hub.set_status(client, Status::Idle);
                    // It may have lost its cached mask: send it in full next time.
                    if let Some(c) = hub.clients.get_mut(&client) {
                        c.mask_version = None;
                    }
                    dropped += 1;
                }
                Incoming::Gone { client } if pending.remove(&client).is_some() => {
                    tracing::warn!(round, client, "client left mid-round");
                    dropped += 1;
                }
                other => self.stray(other, Some(round)),
            }
        }
        (results, dropped, rejected)
    }

    /// The robust layer: what the strategy aggregates, and each client's verdict (logged, and
    /// counted in the client table's suspicion columns).
    fn judge(&self, round: u32, global: &ModelState, results: &[Contribution]) -> Result<(Vec<Contribution>, robust::Combined), String> {
        let reference = global.masked_params();
        let (out, combined) = tokio::task::block_in_place(|| robust::apply(&self.robust, &reference, results.to_vec()))?;
        let mut hub = self.hub.lock().unwrap();
        for v in &combined.verdicts {
            if let Some(c) = hub.clients.get_mut(&v.client) {
                c.suspicion.record(v);
            }
            if v.rejected || v.down_weighted || v.clipped {
                tracing::warn!(round, client = v.client, norm_ratio = format!("{:.2}", v.norm_ratio), scale = format!("{:.3}", v.scale), "update {}", v.action());
            }
        }
        Ok((out, combined))
    }

    /// Messages that belong to no pending task.
    fn stray(&mut self, msg: Incoming, round: Option<u32>) {
        match msg {
            Incoming::Result { client, result } => {
                let why = match round {
                    Some(r) if r == result.round => format!("this client has no task pending in round {r}"),
                    Some(r) => format!("result for round {} arrived during round {r}; late results are dropped", result.round),
                    None => format!("result for round {} arrived between rounds; late results are dropped", result.round),
                };
                tracing::warn!(client, "rejected result: {why}");
                let mut hub = self.hub.lock().unwrap();
                hub.set_status(client, Status::Idle);
                hub.send(client, &ServerMsg::Error { code: ErrorCode::Rejected, message: why });
            }
            Incoming::Failed { client, message, .. } => {
                tracing::warn!(client, "client error: {message}");
                self.hub.lock().unwrap().set_status(client, Status::Idle);
            }
            Incoming::Exchange { client, round, payload } => {
                let reply = self.strategy.exchange(round, client, &payload);
                let mut hub = self.hub.lock().unwrap();
                match reply {
                    Ok(Some(p)) => {
                        hub.send(client, &ServerMsg::Exchange { round, payload: p });
                    }
                    Ok(None) => {}
                    Err(e) => {
                        hub.send(client, &ServerMsg::Error { code: ErrorCode::Rejected, message: e });
                    }
                }
            }
            Incoming::Gone { .. } => {}
        }
    }

    fn set_phase(&self, phase: Phase, round: u32) {
        let mut hub = self.hub.lock().unwrap();
        hub.phase = phase;
        hub.round = round;
    }

    fn save(&self) {
        let arch = self.global.lock().unwrap().arch.clone();
        let json = crate::web::metrics_json(&self.hub.lock().unwrap(), &self.config_json, &arch);
        let rows = self.hub.lock().unwrap().rounds.clone();
        if let Err(e) = metrics::write(&self.run_dir, &json, &rows) {
            tracing::error!("writing metrics to {}: {e}", self.run_dir.display());
        }
        let global = self.global.lock().unwrap().clone();
        let model = postcard::to_allocvec(&global).expect("encoding the model");
        if let Err(e) = std::fs::write(self.run_dir.join("model.bin"), model) {
            tracing::error!("writing the model: {e}");
        }
        let done = self.hub.lock().unwrap().rounds.last().map_or(0, |r| r.round);
        let ckpt = Checkpoint { round: done, global, strategy: self.strategy.save_state() };
        let tmp = self.run_dir.join("checkpoint.bin.tmp");
        let written = std::fs::write(&tmp, postcard::to_allocvec(&ckpt).expect("encoding the checkpoint"))
            .and_then(|_| std::fs::rename(&tmp, self.run_dir.join("checkpoint.bin")));
        if let Err(e) = written {
            tracing::error!("writing the checkpoint: {e}");
        }
    }
}
