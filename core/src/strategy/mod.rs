//! Strategies: how a round is configured and how results become the next global model.
//!
//! The server's round loop and the client runtime only know this trait. A strategy is one file;
//! [`build`] maps a name from the config to one.

mod fedavg;
mod fedavgm;

pub use fedavg::FedAvg;
pub use fedavgm::FedAvgM;

use std::collections::BTreeMap;

use rand::{rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

use crate::protocol::{Bits, Blob, ModelPayload, Task, TaskKind, TaskResult, Update, UploadSpec};
use crate::train::TrainSpec;
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
        }
    }
}

/// What a strategy reports about one aggregation, besides the new model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundOutcome {
    /// Method-specific figures (sparsity, exploration cost...), logged and charted by name.
    pub metrics: BTreeMap<String, f64>,
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

    /// Folds validated results (client id, result) into `global`.
    fn aggregate(
        &mut self,
        round: u32,
        global: &mut ModelState,
        results: &[(u64, TaskResult)],
    ) -> Result<RoundOutcome, String>;

    /// Method-specific messages within a round (split learning's per-batch traffic).
    fn exchange(&mut self, _round: u32, _client: u64, _payload: &Blob) -> Result<Option<Blob>, String> {
        Err(format!("strategy {} takes no in-round messages", self.name()))
    }
}

/// Names [`build`] accepts.
pub const NAMES: &[&str] = &["fedavg", "fedavgm"];

pub fn build(name: &str, config: &StrategyConfig) -> Result<Box<dyn Strategy>, String> {
    match name {
        "fedavg" => Ok(Box::new(FedAvg::new(config.clone()))),
        "fedavgm" => Ok(Box::new(FedAvgM::new(config.clone()))),
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

/// A plain training task on the whole global model (masked if the model has a mask).
pub fn train_task(round: u32, global: &ModelState, config: &StrategyConfig, client: u64, upload: UploadSpec) -> Task {
    Task {
        round,
        kind: TaskKind::Train,
        model: ModelPayload {
            arch: global.arch.clone(),
            params: Blob::from_f32(&global.params),
            mask: global.mask.as_deref().map(Bits::pack),
        },
        train: TrainSpec {
            epochs: config.epochs,
            batch_size: config.batch_size,
            lr: config.lr,
            optimizer: config.optimizer.clone(),
            // Different per client and round, reproducible per run.
            seed: config.seed ^ ((round as u64) << 32) ^ client,
        },
        upload,
        deadline_ms: config.deadline_ms,
    }
}

/// The f32 vectors and weights of results that carry `Update::Weights` or `Update::Delta`.
pub fn dense_updates(results: &[(u64, TaskResult)]) -> Result<Vec<(Vec<f32>, u64)>, String> {
    results
        .iter()
        .map(|(id, r)| match &r.update {
            Update::Weights(b) | Update::Delta(b) => {
                b.to_f32().map(|v| (v, r.samples)).map_err(|e| format!("client {id}: {e}"))
            }
            Update::None => Err(format!("client {id} sent no update")),
        })
        .collect()
}
