//! The client runtime shared by browser tabs (client-wasm) and native simulated clients.
//!
//! It executes whatever a [`Task`] says (train, evaluate, what to upload) and knows no strategy.

use burn::tensor::Device;

use crate::protocol::{Blob, ClientMetrics, ClientMsg, DeviceInfo, Hello, PROTOCOL_VERSION, RunInfo, ServerMsg, Task, TaskKind, TaskResult, Update, UploadSpec};
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
        ClientRuntime { host, device, info, name, client_id: None, run: None, shard: None, last_model: None }
    }

    pub fn hello(&self) -> ClientMsg {
        ClientMsg::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            name: self.name.clone(),
            device: self.info.clone(),
            resume: self.client_id,
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
        let shard = self.shard.as_ref().ok_or("task before welcome: no data shard yet")?;
        let arch = &task.model.arch;
        arch.validate().map_err(|e| e.to_string())?;
        let start = task.model.params.to_f32().map_err(|e| e.to_string())?;
        if start.len() != arch.num_params() {
            return Err(format!("model has {} values, architecture needs {}", start.len(), arch.num_params()));
        }
        let mask = task.model.mask.as_ref().map(|b| b.unpack()).transpose().map_err(|e| e.to_string())?;
        if mask.as_ref().is_some_and(|m| m.len() != start.len()) {
            return Err("mask length does not match the model".into());
        }
        self.last_model = Some((arch.clone(), start.clone()));
        let mut host = RoundHost { inner: &mut self.host, round: task.round };
        let (update, samples, mut metrics, trained) = match task.kind {
            TaskKind::Evaluate => (Update::None, 0, ClientMetrics::default(), None),
            TaskKind::Train => {
                let t = train_local(arch, &start, mask.as_deref(), &shard.train, &task.train, &self.device, &mut host).await?;
                let metrics = ClientMetrics {
                    train_loss: t.mean_loss,
                    steps: t.steps,
                    train_seconds: t.seconds,
                    samples_per_sec: t.samples_per_sec(),
                    ..Default::default()
                };
                let update = match task.upload {
                    UploadSpec::Weights => Update::Weights(Blob::from_f32(&t.params)),
                    UploadSpec::Delta => {
                        let d: Vec<f32> = t.params.iter().zip(&start).map(|(a, b)| a - b).collect();
                        Update::Delta(Blob::from_f32(&d))
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
        Ok(TaskResult { round: task.round, samples, update, metrics })
    }
}

/// Checks a result against the task it answers; the server rejects results that fail.
pub fn validate_result(task: &Task, result: &TaskResult, shard_samples: u64) -> Result<(), String> {
    if result.round != task.round {
        return Err(format!("result for round {} but the task was round {}", result.round, task.round));
    }
    let expected = task.model.arch.num_params();
    let values = match &result.update {
        Update::None if task.kind == TaskKind::Evaluate => return Ok(()),
        Update::None => return Err("training task answered without an update".into()),
        Update::Weights(b) | Update::Delta(b) => b.to_f32().map_err(|e| e.to_string())?,
    };
    let wanted = matches!(
        (&result.update, task.upload),
        (Update::Weights(_), UploadSpec::Weights) | (Update::Delta(_), UploadSpec::Delta)
    );
    if !wanted {
        return Err(format!("update kind does not match the requested {:?}", task.upload));
    }
    if values.len() != expected {
        return Err(format!("update has {} values, the model has {expected}", values.len()));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("update value {i} is {} (not finite)", values[i]));
    }
    if result.samples == 0 || result.samples > shard_samples {
        return Err(format!("claims {} samples, the client's shard has {shard_samples}", result.samples));
    }
    Ok(())
}
