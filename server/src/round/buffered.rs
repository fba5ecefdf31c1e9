//! The buffered driver (FedBuff, Nguyen et al., AISTATS 2022): the round loop's asynchronous
//! sibling, chosen by `[buffered]` in the config. There are no rounds in lock-step. Whenever a
//! client is idle (and fewer than `concurrency` are training) the strategy plans it a task on
//! the current model version; its result, whenever it comes, is accepted as in a round
//! (`strategy::accept`), put onto the newest model with its update scaled by its staleness
//! (`aggregate::staleness`), and added to the buffer, which streams through the same robust
//! layer a round does. Every K results the buffer is aggregated, evaluated, recorded and saved
//! exactly as a round ends ([`RoundLoop::conclude`]), and the version goes up by one. A slow tab
//! holds nobody up, and a tab that closes mid-task costs only its own update.
//!
//! Shared with the round loop: acceptance, the robust layer (streamed or buffered), the
//! strategy's `aggregate_sum`/`aggregate`, records, checkpoints (a version is a round in the run
//! folder, so `--resume` continues from the last step) and the end of the run. Not used: the
//! desk (a strategy that runs here takes no in-round requests), late results (a late result is
//! just a stale one) and `run.min_results` (a step takes K).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_core::aggregate::staleness::{BufferedConfig, rebase};
use canopy_core::aggregate::stream::{Fold, StreamRound};
use canopy_core::metric_keys as keys;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::Task;
use canopy_core::strategy::{self, ClientView, Contribution, accept};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use tokio::time::timeout;

use crate::hub::{BufferFill, Phase, Refusal, Status};
use crate::round::inbox::Incoming;
use crate::round::run::{Collected, RoundLoop};

#[cfg(test)]
mod tests;

/// What the dashboard calls a buffered run at work.
const PHASE: &str = "buffering";

/// Runs the whole run asynchronously, then ends it as the round loop does.
pub async fn run(round_loop: RoundLoop, config: BufferedConfig) {
    let version = round_loop.first_round;
    // Seeded as the round loop seeds its rounds: a resumed run draws reproducibly from its resume point.
    let rng = StdRng::seed_from_u64(round_loop.seed ^ (version as u64 - 1));
    let model = round_loop.global.lock().unwrap().clone();
    let mut driver = Driver {
        start: Arc::new(model.masked_params()),
        model,
        rl: round_loop,
        config,
        version,
        out: BTreeMap::new(),
        fold: None,
        buffer: None,
        tally: Tally::default(),
        since: Instant::now(),
        stale_dropped: 0,
        rng,
    };
    driver.drive().await;
    let version = driver.version;
    driver.rl.end(version).await;
}

/// A task out with a client.
struct Out {
    task: Task,
    /// The (masked) model of the version the task was sent on: where the client started.
    start: Arc<Vec<f32>>,
    sent: Instant,
}

/// Why a result did not join the buffer.
#[derive(Debug)]
enum NotTaken {
    /// Staler than `max_staleness`: dropped, not held against the client.
    Stale(String),
    /// Malformed or not what its task asked for.
    Rejected(String),
}

impl From<String> for NotTaken {
    fn from(why: String) -> NotTaken {
        NotTaken::Rejected(why)
    }
}

/// An accepted result for the task `out`, arriving while the buffer makes `version`: its
/// staleness τ (versions made since its task was sent) and the result put onto `start`, the
/// newest model, with its update scaled by s(τ); or, past `max_staleness`, why it is dropped.
fn weigh(
    config: &BufferedConfig,
    version: u32,
    out: &Out,
    start: &[f32],
    mut c: Contribution,
) -> Result<(Contribution, u32), NotTaken> {
    let tau = version.saturating_sub(out.task.round);
    let weight = config.weight(tau).ok_or_else(|| {
        NotTaken::Stale(format!(
            "result trained on version {} came {tau} versions later, past max_staleness = {}; dropped",
            out.task.round, config.max_staleness
        ))
    })?;
    rebase(&mut c, &out.start, start, weight)?;
    Ok((c, tau))
}

/// The results of the step being filled.
enum Buffer {
    /// Folded into running sums as they come (the plan's fold and the robust rule allow it).
    Streamed(Box<StreamRound>),
    /// Kept whole, for a rule that needs every update (at most K of them).
    Kept(Vec<Contribution>),
}

impl Buffer {
    fn len(&self) -> usize {
        match self {
            Buffer::Streamed(s) => s.results(),
            Buffer::Kept(k) => k.len(),
        }
    }
}

/// What happened since the last step, for its record.
#[derive(Default)]
struct Tally {
    sent: usize,
    dropped: usize,
    rejected: usize,
    stale: usize,
    /// Staleness of each result in the buffer.
    staleness: Vec<u32>,
    send: Duration,
    fold: Duration,
    waits: Vec<Duration>,
}

struct Driver {
    rl: RoundLoop,
    config: BufferedConfig,
    /// The version the buffer will make (a round, in the records). Tasks sent now carry it
    /// and train the current model, the one the `version` − 1 steps before made.
    version: u32,
    /// The current global model, and its masked parameters (where tasks sent now start).
    model: ModelState,
    start: Arc<Vec<f32>>,
    out: BTreeMap<u64, Out>,
    /// The sums the strategy's plans ask for (`None`: it keeps every result).
    fold: Option<Fold>,
    buffer: Option<Buffer>,
    tally: Tally,
    /// When the step being filled began.
    since: Instant,
    stale_dropped: u64,
    rng: StdRng,
}

impl Driver {
    async fn drive(&mut self) {
        if !self.rl.proceed(self.version).await {
            return;
        }
        if self.rl.wait_for_clients(self.version).await.is_empty() && self.over() {
            return;
        }
        self.rl
            .hub
            .lock()
            .unwrap()
            .begin_round(self.version, strategy::Phase::named(PHASE));
        tracing::info!(
            version = self.version,
            buffer = self.config.buffer,
            max_staleness = self.config.max_staleness,
            "buffered run: a step every {} results",
            self.config.buffer
        );
        loop {
            if self.over() {
                return;
            }
            let paused = self.paused();
            if !paused {
                self.hand_out();
            }
            self.show(paused);
            match timeout(Duration::from_millis(200), self.rl.incoming.recv()).await {
                Ok(Some(msg)) => self.take(msg),
                Ok(None) => return,
                Err(_) => {}
            }
            // Paused: results still join the buffer, but no step is taken until Start.
            if !self.paused()
                && self
                    .buffer
                    .as_ref()
                    .is_some_and(|b| b.len() >= self.config.buffer)
            {
                self.step().await;
            }
        }
    }

    /// Stopped from the dashboard, or every planned version made.
    fn over(&mut self) -> bool {
        let hub = self.rl.hub.lock().unwrap();
        self.rl.rounds = hub.planned_rounds();
        hub.control().stop || self.version > self.rl.rounds
    }

    fn paused(&self) -> bool {
        let hub = self.rl.hub.lock().unwrap();
        hub.control().paused || hub.control().held
    }

    /// Gives every idle client a task on the current model, up to `concurrency` training at
    /// once (and the dashboard's clients per round). A strategy that samples a fraction of the
    /// clients offered is offered the rest again, so every idle client gets a task.
    fn hand_out(&mut self) {
        let (mut idle, cap) = {
            let hub = self.rl.hub.lock().unwrap();
            (hub.idle_clients(), hub.control().clients_per_round)
        };
        idle.retain(|c| !self.out.contains_key(&c.id));
        let limit = match self.config.concurrency {
            0 => usize::MAX,
            n => n,
        }
        .min(cap.unwrap_or(usize::MAX));
        for _ in 0..16 {
            // A task past its deadline no longer holds a place (its client stays busy until
            // its result, which may still count if it is fresh enough, or its departure).
            let training = self
                .out
                .values()
                .filter(|o| o.sent.elapsed() < Duration::from_millis(o.task.deadline_ms))
                .count();
            let free = limit.saturating_sub(training);
            if free == 0 || idle.is_empty() {
                return;
            }
            idle.shuffle(&mut self.rng);
            let mut offer: Vec<ClientView> = idle.iter().take(free).cloned().collect();
            offer.sort_by_key(|c| c.id);
            let plan = tokio::task::block_in_place(|| {
                self.rl
                    .strategy
                    .configure_round(self.version, &self.model, &offer, &mut self.rng)
            });
            if plan.tasks.is_empty() {
                return;
            }
            self.fold = plan.fold;
            let sending = Instant::now();
            let sent = {
                let mut hub = self.rl.hub.lock().unwrap();
                self.rl.send_frames(&mut hub, self.version, plan.tasks)
            };
            self.tally.send += sending.elapsed();
            let now = Instant::now();
            for (id, task) in sent {
                self.tally.sent += 1;
                self.out.insert(
                    id,
                    Out {
                        task,
                        start: self.start.clone(),
                        sent: now,
                    },
                );
            }
            idle.retain(|c| !self.out.contains_key(&c.id));
        }
    }

    /// The buffer's state on the dashboard, and the phase (buffering, or paused).
    fn show(&self, paused: bool) {
        let mut hub = self.rl.hub.lock().unwrap();
        let phase = if paused {
            Phase::Paused
        } else {
            Phase::Round(strategy::Phase::named(PHASE))
        };
        hub.set_phase(phase, self.version);
        hub.set_buffer(BufferFill {
            version: self.version,
            filled: self.buffer.as_ref().map_or(0, Buffer::len),
            size: self.config.buffer,
            in_flight: self.out.len(),
            stale_dropped: self.stale_dropped,
            max_staleness: self.config.max_staleness,
        });
    }

    /// One message from the sessions: a result for a task out, a failure, a departure, or
    /// something that answers no task (handled as between rounds).
    fn take(&mut self, msg: Incoming) {
        match msg {
            Incoming::Result {
                client,
                result,
                at,
                slot: _slot, // freed at the end of this arm, once the result is folded
            } if self
                .out
                .get(&client)
                .is_some_and(|o| o.task.round == result.round) =>
            {
                let out = self.out.remove(&client).expect("checked");
                let folding = Instant::now();
                let shard = {
                    let mut hub = self.rl.hub.lock().unwrap();
                    hub.set_status(client, Status::Idle);
                    hub.train_samples(client)
                };
                let mask_version = result.mask_version;
                let taken = accept(client, &out.task, result, shard)
                    .map_err(NotTaken::Rejected)
                    .and_then(|c| weigh(&self.config, self.version, &out, &self.start, c))
                    .and_then(|(c, tau)| {
                        let samples_per_sec = c.metrics.samples_per_sec;
                        let c = self.rl.strategy.complete(c, &self.model)?;
                        self.add(c)?;
                        self.tally.staleness.push(tau);
                        Ok(samples_per_sec)
                    });
                self.tally.fold += folding.elapsed();
                self.tally.waits.push(at.elapsed());
                let mut hub = self.rl.hub.lock().unwrap();
                let (refusal, why) = match taken {
                    Ok(samples_per_sec) => {
                        hub.result_accepted(client, samples_per_sec, mask_version);
                        return;
                    }
                    Err(NotTaken::Stale(why)) => {
                        self.tally.stale += 1;
                        self.stale_dropped += 1;
                        (Refusal::Stale, why)
                    }
                    Err(NotTaken::Rejected(why)) => {
                        self.tally.rejected += 1;
                        (Refusal::Invalid, why)
                    }
                };
                tracing::warn!(version = self.version, client, "result not taken: {why}");
                hub.reject(client, refusal, format!("result not taken: {why}"));
            }
            Incoming::Failed {
                client,
                round: Some(r),
                message,
            } if self.out.get(&client).is_some_and(|o| o.task.round == r) => {
                tracing::warn!(
                    client,
                    version = r,
                    "client could not finish its task: {message}"
                );
                self.out.remove(&client);
                self.rl.hub.lock().unwrap().task_failed(client);
                self.tally.dropped += 1;
            }
            Incoming::Gone { client } if self.out.remove(&client).is_some() => {
                // Nothing waits for it: its place goes to the next idle client.
                tracing::info!(client, "client left mid-task");
                self.tally.dropped += 1;
            }
            other => self.rl.between_rounds(other),
        }
    }

    /// An accepted result, on the newest model, into the buffer (started by the first one).
    fn add(&mut self, c: Contribution) -> Result<(), String> {
        if self.buffer.is_none() {
            let prior = self.rl.prior(self.start.len());
            let stream = StreamRound::start(
                &self.rl.robust,
                self.fold,
                self.start.clone(),
                self.config.buffer,
                &prior,
            );
            self.buffer = Some(match stream {
                Some(s) => Buffer::Streamed(Box::new(s)),
                None => Buffer::Kept(Vec::with_capacity(self.config.buffer)),
            });
        }
        match self.buffer.as_mut().expect("started") {
            Buffer::Streamed(s) => s.add(c),
            Buffer::Kept(k) => {
                k.push(c);
                Ok(())
            }
        }
    }

    /// K results are in: the step, as a round ends (aggregated, evaluated, recorded, saved),
    /// then the next version begins on the new model.
    async fn step(&mut self) {
        let tally = std::mem::take(&mut self.tally);
        let (results, stream) = match self.buffer.take() {
            Some(Buffer::Streamed(s)) => (Vec::new(), Some(*s)),
            Some(Buffer::Kept(k)) => (k, None),
            None => return,
        };
        let mut got = Collected {
            results,
            stream,
            sampled: tally.sent,
            dropped: tally.dropped,
            rejected: tally.rejected,
            send: tally.send,
            fold: tally.fold,
            waits: tally.waits,
            ..Collected::none(self.start.clone())
        };
        let n = tally.staleness.len().max(1) as f64;
        let extra = vec![
            (keys::BUFFER_SIZE.to_string(), self.config.buffer as f64),
            (
                keys::BUFFER_STALENESS_MEAN.to_string(),
                tally.staleness.iter().map(|&t| t as f64).sum::<f64>() / n,
            ),
            (
                keys::BUFFER_STALENESS_MAX.to_string(),
                tally.staleness.iter().copied().max().unwrap_or(0) as f64,
            ),
            (keys::BUFFER_STALE_DROPPED.to_string(), tally.stale as f64),
            (keys::BUFFER_IN_FLIGHT.to_string(), self.out.len() as f64),
        ];
        let model = self.model.clone();
        let stepped = self
            .rl
            .conclude(self.version, 0, self.since, &model, &mut got, extra)
            .await;
        if stepped {
            self.version += 1;
        } else {
            tracing::warn!(
                version = self.version,
                "the step failed (see above); its buffer is dropped and refilled"
            );
        }
        self.model = self.rl.global.lock().unwrap().clone();
        self.start = Arc::new(self.model.masked_params());
        self.since = Instant::now();
        self.rl
            .hub
            .lock()
            .unwrap()
            .begin_round(self.version, strategy::Phase::named(PHASE));
        // The dashboard (and, after the last step, metrics.json) shows the emptied buffer.
        self.show(false);
    }
}
