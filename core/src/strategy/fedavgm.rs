//! FedAvgM: FedAvg with server momentum on the mean client delta (β = 0.9 by default).

use rand::rngs::StdRng;

use super::fedavg::NoSettings;
use super::{ClientView, Contribution, RoundContext, RoundOutcome, Settings, Strategy, StrategyConfig, UploadKind, parse_settings, plain_round, weighted_values};
use crate::aggregate::momentum_step;
use crate::protocol::{Task, UploadSpec};
use crate::state::ModelState;

pub struct FedAvgM {
    config: StrategyConfig,
    velocity: Vec<f32>,
}

impl FedAvgM {
    pub fn new(config: StrategyConfig) -> Self {
        FedAvgM { config, velocity: Vec::new() }
    }
}

/// FedAvgM's settings are the shared `server_momentum` and `server_lr`.
pub fn build(config: StrategyConfig, settings: Option<&Settings>) -> Result<Box<dyn Strategy>, String> {
    let NoSettings {} = parse_settings("fedavgm", settings)?;
    Ok(Box::new(FedAvgM::new(config)))
}

impl Strategy for FedAvgM {
    fn configure_round(&mut self, round: u32, global: &ModelState, clients: &[ClientView], rng: &mut StdRng) -> Vec<(u64, Task)> {
        plain_round(round, global, &self.config, clients, rng, UploadSpec::Delta)
    }

    fn save_state(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.velocity).expect("encoding")
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.velocity = postcard::from_bytes(bytes).map_err(|e| format!("fedavgm state: {e}"))?;
        Ok(())
    }

    fn aggregate(&mut self, _round: u32, global: &mut ModelState, results: &[Contribution], _ctx: &RoundContext) -> Result<RoundOutcome, String> {
        if results.iter().any(|c| c.kind != UploadKind::Delta) {
            return Err("fedavgm expects deltas".into());
        }
        let mean_delta = weighted_values(results)?;
        if self.velocity.len() != global.params.len() {
            self.velocity = vec![0.0; global.params.len()];
        }
        momentum_step(&mut global.params, &mut self.velocity, &mean_delta, self.config.server_momentum, self.config.server_lr);
        let speed = (self.velocity.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()).sqrt();
        let mut outcome = RoundOutcome::default();
        outcome.metrics.insert("server_velocity_norm".into(), speed);
        Ok(outcome)
    }
}
