//! The client runtime shared by browser tabs (client-wasm) and native simulated clients.
//!
//! It executes whatever a [`Task`] says (how to train, what to upload) and knows no strategy.
//! Payloads are encoded and decoded by [`crate::codec`]; what a client keeps between tasks
//! (its data shard, the mask it holds, the top-k residual, what its learners keep) lives here,
//! in one place, and survives reconnects of the same tab.

use burn::tensor::Device;

use crate::codec::{self, MaskCache, Model};
use crate::data::partition::Shard;
use crate::protocol::{
    Blob, ClientMetrics, ClientMsg, DeviceInfo, Hello, PROTOCOL_VERSION, RunInfo, ServerMsg, Task,
    TaskResult,
};
use crate::train::step::{Frozen, Given, Learners};
use crate::train::{Host, Progress, Trained, evaluate, train};

/// The outside world of the runtime: a clock, progress, frames to the server, and the
/// in-round exchange.
pub trait ClientHost: Host {
    /// A message to send to the server now (progress during training).
    fn send(&mut self, msg: ClientMsg);
    /// Sends exchange request `seq` of `round` and awaits the server's reply to it (matched by
    /// round and sequence number; an `ExchangeFailed` reply is an error).
    fn request(
        &mut self,
        round: u32,
        seq: u32,
        payload: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Blob, String>>;
}

/// What a client keeps from task to task.
#[derive(Default)]
pub struct ClientState {
    /// The pruning mask last received, with its version: the server sends it only once.
    pub mask: MaskCache,
    /// Error-feedback residual of top-k uploads, carried from round to round.
    pub residual: Option<Vec<f32>>,
    /// What each kind of learning keeps between tasks (e.g. a supermask's own scores): opaque
    /// here, see [`crate::train::step::Learner`].
    pub learners: Learners,
}

pub struct ClientRuntime<H: ClientHost> {
    pub host: H,
    pub device: Device,
    pub info: DeviceInfo,
    pub name: String,
    pub client_id: Option<u64>,
    pub run: Option<RunInfo>,
    pub shard: Option<Shard>,
    /// The last global model received (before local training), for "try the model" panels.
    pub last_model: Option<(crate::model::arch::Arch, Vec<f32>)>,
    pub state: ClientState,
}

/// The host as one task's training sees it: progress tagged with the round, requests too.
struct RoundHost<'a, H: ClientHost> {
    inner: &'a mut H,
    round: u32,
    /// Milliseconds spent awaiting exchange replies.
    waited_ms: f64,
}

impl<H: ClientHost> Host for RoundHost<'_, H> {
    fn now_ms(&self) -> f64 {
        self.inner.now_ms()
    }

    async fn progress(&mut self, p: &Progress) {
        self.inner.send(ClientMsg::Progress {
            round: self.round,
            progress: p.clone(),
        });
        self.inner.progress(p).await;
    }

    async fn exchange(&mut self, seq: u32, request: Vec<u8>) -> Result<Blob, String> {
        let t0 = self.inner.now_ms();
        let reply = self.inner.request(self.round, seq, request).await;
        self.waited_ms += self.inner.now_ms() - t0;
        reply
    }
}

impl<H: ClientHost> ClientRuntime<H> {
    pub fn new(host: H, device: Device, info: DeviceInfo, name: String) -> Self {
        ClientRuntime {
            host,
            device,
            info,
            name,
            client_id: None,
            run: None,
            shard: None,
            last_model: None,
            state: ClientState::default(),
        }
    }

    pub fn hello(&self) -> ClientMsg {
        ClientMsg::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            name: self.name.clone(),
            device: self.info.clone(),
            resume: self.client_id,
            mask_version: self.state.mask.version(),
        })
    }

    /// Handles one server message; returns the reply, if any. Exchange replies are the host's
    /// business: it routes them to the request awaiting them.
    pub async fn handle(&mut self, msg: ServerMsg) -> Option<ClientMsg> {
        match msg {
            ServerMsg::Welcome(w) => {
                self.client_id = Some(w.client_id);
                self.run = Some(w.run);
                self.shard = Some(w.shard);
                None
            }
            ServerMsg::Task(task) => {
                let round = task.round;
                Some(match self.run_task(task).await {
                    Ok(result) => ClientMsg::Result(result),
                    Err(message) => ClientMsg::Error {
                        round: Some(round),
                        message,
                    },
                })
            }
            ServerMsg::Wait { .. }
            | ServerMsg::Error { .. }
            | ServerMsg::Exchange { .. }
            | ServerMsg::ExchangeFailed { .. }
            | ServerMsg::Bye { .. } => None,
        }
    }

    pub async fn run_task(&mut self, task: Task) -> Result<TaskResult, String> {
        let model = codec::decode_model(&task.model, &mut self.state.mask, true)?;
        let (arch, mask) = (&model.arch, model.mask.as_deref());
        self.last_model = Some((arch.clone(), model.params.clone()));
        let shard = self
            .shard
            .as_ref()
            .ok_or("task before welcome: no data shard yet")?;
        if shard.train.is_empty() {
            // A tab on its own data before it labelled any: nothing to train on, say so
            // rather than send an update computed from nothing.
            return Err("no training examples in this client yet".into());
        }
        let mut host = RoundHost {
            inner: &mut self.host,
            round: task.round,
            waited_ms: 0.0,
        };
        let (t, moved) = learn(
            &model,
            &mut self.state.learners,
            &shard.train,
            &task,
            &self.device,
            &mut host,
        )
        .await?;
        let pruned_nonzero = mask.map_or(0, |m| {
            t.params
                .iter()
                .zip(m)
                .filter(|(v, k)| !**k && **v != 0.0)
                .count() as u64
        });
        let mut metrics = ClientMetrics {
            train_loss: t.mean_loss,
            epochs: t.epochs,
            pruned_nonzero,
            steps: t.steps,
            train_seconds: t.seconds,
            samples_per_sec: t.samples_per_sec(),
            exchange_seconds: host.waited_ms / 1000.0,
            ..Default::default()
        };
        let update = codec::encode_update(
            task.upload,
            arch,
            &model.params,
            &t.params,
            mask,
            &mut self.state.residual,
            moved.as_deref(),
            task.train.seed,
        );
        // The local test split measures the model this client ends the task with (a split
        // learning front alone outputs activations, not classes: nothing to measure).
        if !shard.test.is_empty() && arch.classes == shard.test.classes {
            metrics.local_test = evaluate(arch, &t.params, &shard.test, &self.device).await?;
        }
        let samples = shard.train.len() as u64;
        Ok(TaskResult {
            round: task.round,
            samples,
            update,
            metrics,
            mask_version: self.state.mask.version(),
        })
    }
}

/// Trains as the task's step says, starting from what the task's learner makes of the model and
/// this client's kept state; returns the trained weights the model computes with (for a
/// supermask, the effective weights of the learned scores, which stay with the learner) and,
/// when what was learned is not the weights, how far training moved it.
async fn learn<H: crate::train::Host>(
    model: &Model,
    learners: &mut Learners,
    data: &crate::data::Dataset,
    task: &Task,
    device: &Device,
    host: &mut H,
) -> Result<(Trained, Option<Vec<f32>>), String> {
    let given = Given {
        params: &model.params,
        mask: model.mask.as_deref(),
        supermask: model.supermask.as_ref().map(|sm| {
            let frozen = Frozen {
                kind: sm.kind,
                theta0: &sm.theta0,
            };
            (frozen, sm.bits.as_slice())
        }),
    };
    let learn = task.train.step.learn;
    let learner = learners.get(learn);
    let start = learner.start(learn, given)?;
    let mut t = train(
        &model.arch,
        &start.learned,
        given.mask,
        start.frozen,
        data,
        &task.train,
        device,
        host,
    )
    .await?;
    let moved = start.frozen.is_some().then(|| {
        t.params
            .iter()
            .zip(start.learned.iter())
            .map(|(a, b)| a - b)
            .collect()
    });
    t.params = learner.finish(given, std::mem::take(&mut t.params));
    Ok((t, moved))
}
