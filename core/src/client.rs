//! The client runtime shared by browser tabs (client-wasm) and native simulated clients.
//!
//! It executes whatever a [`Task`] says (train, evaluate, what to upload) and knows no strategy.

use burn::tensor::Device;

use crate::codec::{encode_sparse, kept_indices};
use crate::protocol::{Blob, ClientMetrics, ClientMsg, DeviceInfo, Hello, MaskSpec, PROTOCOL_VERSION, RunInfo, ServerMsg, Task, TaskKind, TaskResult, Update, UploadSpec};
use crate::partition::Shard;
use crate::train::{Host, Progress, evaluate, train_local};

/// Receives what the runtime wants to tell the outside world while it works.
pub trait ClientHost: Host {
    /// A message to send to the server now (progress during training).
    fn send(&mut self, msg: ClientMsg);
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
    pub last_model: Option<(crate::arch::Arch, Vec<f32>)>,
    /// The pruning mask last received, with its version: the server sends it only once.
    pub mask: Option<(u64, Vec<bool>)>,
    /// Error-feedback residual of top-k uploads, carried from round to round.
    pub residual: Option<Vec<f32>>,
}

/// Forwards training progress to the server, tagged with the round.
struct RoundHost<'a, H: ClientHost> {
    inner: &'a mut H,
    round: u32,
}

impl<H: ClientHost> Host for RoundHost<'_, H> {
    fn now_ms(&self) -> f64 {
        self.inner.now_ms()
    }

    async fn progress(&mut self, p: &Progress) {
        self.inner.send(ClientMsg::Progress { round: self.round, progress: p.clone() });
        self.inner.progress(p).await;
    }
}

impl<H: ClientHost> ClientRuntime<H> {
    pub fn new(host: H, device: Device, info: DeviceInfo, name: String) -> Self {
        ClientRuntime { host, device, info, name, client_id: None, run: None, shard: None, last_model: None, mask: None, residual: None }
    }

    pub fn hello(&self) -> ClientMsg {
        ClientMsg::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            name: self.name.clone(),
            device: self.info.clone(),
            resume: self.client_id,
            mask_version: self.mask.as_ref().map(|(v, _)| *v),
        })
    }

    /// Handles one server message; returns the reply, if any.
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
                    Err(message) => ClientMsg::Error { round: Some(round), message },
                })
            }
            ServerMsg::Wait { .. } | ServerMsg::Error { .. } | ServerMsg::Exchange { .. } | ServerMsg::Bye { .. } => None,
        }
    }

    pub async fn run_task(&mut self, task: Task) -> Result<TaskResult, String> {
        let arch = &task.model.arch;
        arch.validate().map_err(|e| e.to_string())?;
        let mask = self.resolve_mask(task.model.mask.as_ref(), arch.num_params())?;
        let start = expand(&task.model.params.to_f32().map_err(|e| e.to_string())?, mask.as_deref(), arch.num_params())?;
        self.last_model = Some((arch.clone(), start.clone()));
        let shard = self.shard.as_ref().ok_or("task before welcome: no data shard yet")?;
        let mut host = RoundHost { inner: &mut self.host, round: task.round };
        let (update, samples, mut metrics, trained) = match task.kind {
            TaskKind::Evaluate => (Update::None, 0, ClientMetrics::default(), None),
            TaskKind::Train => {
                let t = train_local(arch, &start, mask.as_deref(), &shard.train, &task.train, &self.device, &mut host).await?;
                let pruned_nonzero = mask.as_ref().map_or(0, |m| t.params.iter().zip(m).filter(|(v, k)| !**k && **v != 0.0).count() as u64);
                let metrics = ClientMetrics {
                    train_loss: t.mean_loss,
                    epochs: t.epochs,
                    pruned_nonzero,
                    steps: t.steps,
                    train_seconds: t.seconds,
                    samples_per_sec: t.samples_per_sec(),
                    ..Default::default()
                };
                let delta = || -> Vec<f32> { t.params.iter().zip(&start).map(|(a, b)| a - b).collect() };
                let update = match task.upload {
                    UploadSpec::Weights => Update::Weights(Blob::from_f32(&t.params)),
                    UploadSpec::Delta => Update::Delta(Blob::from_f32(&delta())),
                    UploadSpec::Sparse { int8, top_k, error_feedback } => {
                        let residual = if error_feedback { Some(self.residual.get_or_insert_with(Vec::new)) } else { None };
                        Update::Sparse(encode_sparse(arch, &delta(), mask.as_deref(), int8, top_k, residual))
                    }
                };
                (update, shard.train.len() as u64, metrics, Some(t.params))
            }
        };
        // The local test split measures the model this client ends the task with.
        let model = trained.as_deref().unwrap_or(&start);
        if !shard.test.is_empty() {
            metrics.local_test = evaluate(arch, model, &shard.test, &self.device).await?;
        }
        let mask_version = self.mask.as_ref().map(|(v, _)| *v);
        Ok(TaskResult { round: task.round, samples, update, metrics, mask_version })
    }

    /// The task's mask: sent in full (and cached), or named by a version this client holds.
    fn resolve_mask(&mut self, spec: Option<&MaskSpec>, len: usize) -> Result<Option<Vec<bool>>, String> {
        match spec {
            None => Ok(None),
            Some(MaskSpec::Full { version, bits }) => {
                let m = bits.unpack().map_err(|e| e.to_string())?;
                if m.len() != len {
                    return Err(format!("mask has {} entries, the model {len}", m.len()));
                }
                self.mask = Some((*version, m.clone()));
                Ok(Some(m))
            }
            Some(MaskSpec::Cached { version }) => match &self.mask {
                Some((v, m)) if v == version && m.len() == len => Ok(Some(m.clone())),
                _ => {
                    self.mask = None;
                    Err(format!("mask version {version} is not cached here; please resend it"))
                }
            },
        }
    }
}

/// Spreads the kept values over a full-length vector (zeros elsewhere).
pub fn expand(values: &[f32], mask: Option<&[bool]>, len: usize) -> Result<Vec<f32>, String> {
    let kept = kept_indices(mask, len);
    if values.len() != kept.len() {
        return Err(format!("model has {} values, expected {} (of {len} parameters)", values.len(), kept.len()));
    }
    let mut full = vec![0f32; len];
    for (&i, v) in kept.iter().zip(values) {
        full[i as usize] = *v;
    }
    Ok(full)
}

/// Only the kept entries, in order: what a masked model sends down.
pub fn compact(values: &[f32], mask: Option<&[bool]>) -> Vec<f32> {
    match mask {
        None => values.to_vec(),
        Some(m) => values.iter().zip(m).filter(|(_, k)| **k).map(|(v, _)| *v).collect(),
    }
}
