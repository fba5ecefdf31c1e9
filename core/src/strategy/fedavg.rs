//! FedAvg: θ ← Σ_k (n_k / n) θ_k over the sampled clients.

use rand::rngs::StdRng;

use super::{ClientView, RoundOutcome, Strategy, StrategyConfig, dense_updates, sample_clients, train_task};
use crate::aggregate::weighted_mean;
use crate::protocol::{Task, TaskResult, UploadSpec};
use crate::state::ModelState;

pub struct FedAvg {
    config: StrategyConfig,
}

impl FedAvg {
    pub fn new(config: StrategyConfig) -> Self {
        FedAvg { config }
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn configure_round(&mut self, round: u32, global: &ModelState, clients: &[ClientView], rng: &mut StdRng) -> Vec<(u64, Task)> {
        sample_clients(clients, self.config.fraction, self.config.min_fit, rng)
            .into_iter()
            .map(|c| (c.id, train_task(round, global, &self.config, c.id, UploadSpec::Weights)))
            .collect()
    }

    fn aggregate(&mut self, _round: u32, global: &mut ModelState, results: &[(u64, TaskResult)]) -> Result<RoundOutcome, String> {
        let updates = dense_updates(results)?;
        let items: Vec<(&[f32], u64)> = updates.iter().map(|(v, n)| (v.as_slice(), *n)).collect();
        global.params = weighted_mean(&items);
        Ok(RoundOutcome::default())
    }
}
