//! Strategies: how a round is configured and how results become the next global model.
//!
//! The server's round loop and the client runtime only know this trait. A strategy is one file;
//! [`build`] maps a name from the config to one.

mod autoflip;
mod fedavg;
mod fedavgm;
mod structured;

pub use autoflip::{AutoFlip, AutoflipConfig};
pub use structured::{Structured, StructuredConfig, UnitScore};
pub use fedavg::FedAvg;
pub use fedavgm::{FedAvgM, FedavgmConfig};

use std::collections::BTreeMap;

use rand::{rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

use crate::client::compact;
use crate::codec::decode_sparse;
use crate::protocol::{Bits, Blob, ClientMetrics, MaskSpec, ModelPayload, Task, TaskKind, TaskResult, Update, UploadSpec};
use crate::train::{Eval, TrainSpec};
use crate::state::ModelState;
use crate::train::Optimizer;

/// What a strategy knows about a connected client.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientView {
    pub id: u64,
    /// Size of the client's training split.
    pub samples: u64,
}

/// Settings every strategy reads; method-specific ones sit in `extra`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StrategyConfig {
    /// Fraction C of connected clients sampled per round.
    pub fraction: f64,
    /// Never sample fewer than this many clients.
    pub min_fit: usize,
    pub epochs: u32,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: Optimizer,
    /// Round deadline in milliseconds.
    pub deadline_ms: u64,
    /// Server momentum β (FedAvgM).
    pub server_momentum: f32,
    /// Server learning rate (FedAvgM).
    pub server_lr: f32,
    pub seed: u64,
    /// FedAvgM's settings (`[strategy.fedavgm]`).
    pub fedavgm: FedavgmConfig,
    /// AutoFLIP's settings (`[strategy.autoflip]`).
    pub autoflip: AutoflipConfig,
    /// Structured pruning's settings (`[strategy.structured]`).
    pub structured: StructuredConfig,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig {
            fraction: 1.0,
            min_fit: 1,
            epochs: 1,
            batch_size: 32,
            lr: 0.05,
            optimizer: Optimizer::Sgd { momentum: 0.0 },
            deadline_ms: 120_000,
            server_momentum: 0.9,
            server_lr: 1.0,
            seed: 1,
            fedavgm: FedavgmConfig::default(),
            autoflip: AutoflipConfig::default(),
            structured: StructuredConfig::default(),
        }
    }
}

/// What a strategy reports about one aggregation, besides the new model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundOutcome {
    /// Method-specific figures (sparsity, exploration cost...), logged and charted by name.
    pub metrics: BTreeMap<String, f64>,
}

/// What the server offers a strategy while it aggregates.
pub struct RoundContext<'a> {
    /// Rounds in the whole run.
    pub rounds: u32,
    /// Loss and accuracy of a model on the server's validation split (never the test set).
    pub validate: &'a dyn Fn(&ModelState) -> Eval,
}

/// A validated result, decoded to a full-length vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution {
    pub client: u64,
    pub samples: u64,
    /// Trained parameters (`Weights`) or trained minus starting ones (`Delta`, `Sparse`).
    pub kind: UploadKind,
    pub values: Vec<f32>,
    pub metrics: ClientMetrics,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadKind {
    Weights,
    Delta,
}

pub trait Strategy: Send {
    fn name(&self) -> &'static str;

    /// Picks clients and gives each a task. `clients` are the ones connected and idle.
    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> Vec<(u64, Task)>;

    /// Folds validated, decoded results into `global`.
    fn aggregate(
        &mut self,
        round: u32,
        global: &mut ModelState,
        results: &[Contribution],
        ctx: &RoundContext,
    ) -> Result<RoundOutcome, String>;

    /// The phase to show on dashboards ("training", "exploring"...).
    fn phase(&self) -> &'static str {
        "training"
    }

    /// The strategy's own state between rounds (server momentum, pruning stage...), saved with
    /// every checkpoint so a restarted server resumes where it stopped.
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }

    fn load_state(&mut self, _bytes: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// Method-specific messages within a round (split learning's per-batch traffic).
    fn exchange(&mut self, _round: u32, _client: u64, _payload: &Blob) -> Result<Option<Blob>, String> {
        Err(format!("strategy {} takes no in-round messages", self.name()))
    }
}

/// Names [`build`] accepts.
pub const NAMES: &[&str] = &["fedavg", "fedavgm", "autoflip", "structured"];

pub fn build(name: &str, config: &StrategyConfig) -> Result<Box<dyn Strategy>, String> {
    match name {
        "fedavg" => Ok(Box::new(FedAvg::new(config.clone()))),
        "fedavgm" => Ok(Box::new(FedAvgM::new(config.clone()))),
        "autoflip" => Ok(Box::new(AutoFlip::new(config.clone())?)),
        "structured" => Ok(Box::new(Structured::new(config.clone())?)),
        other => Err(format!("unknown strategy '{other}' (known: {})", NAMES.join(", "))),
    }
}

/// Samples ⌈C·K⌉ clients, at least `min_fit` (if that many are connected).
pub fn sample_clients(clients: &[ClientView], fraction: f64, min_fit: usize, rng: &mut StdRng) -> Vec<ClientView> {
    let k = clients.len();
    let m = ((fraction * k as f64).ceil() as usize).max(min_fit).min(k);
    let mut picked: Vec<ClientView> = clients.to_vec();
    picked.shuffle(rng);
    picked.truncate(m);
    picked.sort_by_key(|c| c.id);
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sampling_respects_fraction_and_minimum() {
        let clients: Vec<ClientView> = (0..20).map(|id| ClientView { id, samples: 10 }).collect();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(sample_clients(&clients, 0.25, 1, &mut rng).len(), 5);
        assert_eq!(sample_clients(&clients, 0.01, 3, &mut rng).len(), 3);
        assert_eq!(sample_clients(&clients[..2], 0.5, 3, &mut rng).len(), 2);
        let a = sample_clients(&clients, 0.25, 1, &mut StdRng::seed_from_u64(9));
        let b = sample_clients(&clients, 0.25, 1, &mut StdRng::seed_from_u64(9));
        assert_eq!(a, b);
    }

    #[test]
    fn unknown_strategy_is_an_error() {
        assert!(build("fedprox", &StrategyConfig::default()).is_err());
        assert_eq!(build("fedavgm", &StrategyConfig::default()).unwrap().name(), "fedavgm");
    }
}

/// Samples clients as `config` says and gives each the plain training task.
pub fn plain_round(round: u32, global: &ModelState, config: &StrategyConfig, clients: &[ClientView], rng: &mut StdRng, upload: UploadSpec) -> Vec<(u64, Task)> {
    sample_clients(clients, config.fraction, config.min_fit, rng)
        .into_iter()
        .map(|c| (c.id, train_task(round, global, config, c.id, upload)))
        .collect()
}

/// A plain training task on the whole global model (masked if the model has a mask).
pub fn train_task(round: u32, global: &ModelState, config: &StrategyConfig, client: u64, upload: UploadSpec) -> Task {
    Task {
        round,
        kind: TaskKind::Train,
        model: model_payload(global),
        train: TrainSpec {
            epochs: config.epochs,
            batch_size: config.batch_size,
            lr: config.lr,
            optimizer: config.optimizer.clone(),
            // Different per client and round, reproducible per run.
            seed: config.seed ^ ((round as u64) << 32) ^ client,
            patience: 0,
        },
        upload,
        deadline_ms: config.deadline_ms,
    }
}

/// The global model as a task carries it: with a mask, only the kept values (the server swaps
/// the mask for its version number when the client already holds it).
pub fn model_payload(global: &ModelState) -> ModelPayload {
    let mask = global.mask.as_deref();
    ModelPayload {
        arch: global.arch.clone(),
        params: Blob::from_f32(&compact(&global.params, mask)),
        mask: mask.map(|m| MaskSpec::Full { version: global.mask_version, bits: Bits::pack(m) }),
    }
}

/// Checks a result against the task it answers and decodes its update. The server calls this
/// for every result, so strategies only ever see well-formed, finite, full-length vectors.
pub fn accept(client: u64, task: &Task, result: TaskResult, shard_samples: u64) -> Result<Contribution, String> {
    if result.round != task.round {
        return Err(format!("result for round {} but the task was round {}", result.round, task.round));
    }
    let arch = &task.model.arch;
    let n = arch.num_params();
    let mask = match &task.model.mask {
        Some(MaskSpec::Full { bits, .. }) => Some(bits.unpack().map_err(|e| e.to_string())?),
        Some(MaskSpec::Cached { .. }) => return Err("internal: pending task lost its mask".into()),
        None => None,
    };
    let (kind, values) = match (&result.update, task.upload) {
        (Update::None, _) if task.kind == TaskKind::Evaluate => (UploadKind::Delta, vec![0.0; n]),
        (Update::None, _) => return Err("training task answered without an update".into()),
        (Update::Weights(b), UploadSpec::Weights) => (UploadKind::Weights, b.to_f32().map_err(|e| e.to_string())?),
        (Update::Delta(b), UploadSpec::Delta) => (UploadKind::Delta, b.to_f32().map_err(|e| e.to_string())?),
        (Update::Sparse(u), UploadSpec::Sparse { .. }) => (UploadKind::Delta, decode_sparse(arch, u, mask.as_deref())?),
        _ => return Err(format!("update kind does not match the requested {:?}", task.upload)),
    };
    if values.len() != n {
        return Err(format!("update has {} values, the model has {n}", values.len()));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("update value {i} is {} (not finite)", values[i]));
    }
    if result.metrics.pruned_nonzero > 0 {
        return Err(format!("the mask was not enforced: {} pruned parameters moved", result.metrics.pruned_nonzero));
    }
    if let Some(m) = &mask {
        // A masked task's update must keep pruned entries at exactly zero (weights) or unchanged.
        if let Some(i) = values.iter().zip(m).position(|(v, k)| !k && *v != 0.0) {
            return Err(format!("update changes pruned parameter {i}"));
        }
    }
    if task.kind == TaskKind::Train && (result.samples == 0 || result.samples > shard_samples) {
        return Err(format!("claims {} samples, the client's shard has {shard_samples}", result.samples));
    }
    Ok(Contribution { client, samples: result.samples, kind, values, metrics: result.metrics })
}

/// Sample-weighted mean of the contributions' vectors.
pub fn weighted_values(results: &[Contribution]) -> Result<Vec<f32>, String> {
    if results.is_empty() {
        return Err("nothing to aggregate".into());
    }
    let items: Vec<(&[f32], u64)> = results.iter().map(|c| (c.values.as_slice(), c.samples)).collect();
    Ok(crate::aggregate::weighted_mean(&items))
}
