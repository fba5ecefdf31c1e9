//! FedAvgM: FedAvg with server momentum on the mean client delta (β = 0.9 by default), and
//! optionally the client learning-rate decay AutoFLIP uses, so the two compare fairly.

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{
    ClientView, Contribution, Fold, RoundContext, RoundOutcome, RoundPlan, RunningSum, Settings,
    Strategy, StrategyConfig, UploadKind, aggregate_folded, parse_settings, plain_round,
};
use crate::aggregate::momentum_step;
use crate::model::state::ModelState;
use crate::protocol::UploadSpec;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FedavgmConfig {
    /// Client learning rate multiplier per round: round r trains with lr · lr_decay^(r−1)
    /// (AutoFLIP's code: 0.99; 1 keeps it constant).
    pub lr_decay: f64,
}

impl Default for FedavgmConfig {
    fn default() -> Self {
        FedavgmConfig { lr_decay: 1.0 }
    }
}

pub struct FedAvgM {
    config: StrategyConfig,
    own: FedavgmConfig,
    velocity: Vec<f32>,
}

impl FedAvgM {
    pub fn new(config: StrategyConfig, own: FedavgmConfig) -> Self {
        FedAvgM {
            config,
            own,
            velocity: Vec::new(),
        }
    }
}

/// FedAvgM reads the shared `server_momentum` and `server_lr`, and `[strategy.fedavgm]`.
pub fn build(
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    let own: FedavgmConfig = parse_settings("fedavgm", settings)?;
    if !(own.lr_decay > 0.0) {
        return Err("fedavgm lr_decay must be > 0".into());
    }
    Ok(Box::new(FedAvgM::new(config, own)))
}

impl Strategy for FedAvgM {
    /// Each task trains the model it was sent and each result is a plain update, so a buffered
    /// step is one of its rounds (momentum carries from step to step).
    fn check_buffered(&self) -> Result<(), String> {
        Ok(())
    }

    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> RoundPlan {
        let mut config = self.config.clone();
        config.lr *= self.own.lr_decay.powi(round as i32 - 1);
        let tasks = plain_round(round, global, &config, clients, rng, UploadSpec::Delta);
        RoundPlan::streamed(tasks, Fold::default())
    }

    fn save_state(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.velocity).expect("encoding")
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.velocity = postcard::from_bytes(bytes).map_err(|e| format!("fedavgm state: {e}"))?;
        Ok(())
    }

    fn aggregate(
        &mut self,
        round: u32,
        global: &mut ModelState,
        results: &[Contribution],
        ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        aggregate_folded(self, Fold::default(), round, global, results, ctx)
    }

    fn aggregate_sum(
        &mut self,
        _round: u32,
        global: &mut ModelState,
        sum: &RunningSum,
        results: &[Contribution],
        _ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        if results.iter().any(|c| c.kind != UploadKind::Delta) {
            return Err("fedavgm expects deltas".into());
        }
        let mean_delta = sum.mean()?;
        if self.velocity.len() != global.params.len() {
            self.velocity = vec![0.0; global.params.len()];
        }
        momentum_step(
            &mut global.params,
            &mut self.velocity,
            &mean_delta,
            self.config.server_momentum,
            self.config.server_lr,
        );
        let speed = crate::aggregate::robust::l2_distance(&self.velocity, None);
        let mut outcome = RoundOutcome::default();
        outcome
            .metrics
            .insert(crate::metric_keys::SERVER_VELOCITY_NORM.into(), speed);
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Arch;
    use rand::SeedableRng;

    #[test]
    fn learning_rate_decays_per_round() {
        let mut cfg = StrategyConfig::default();
        cfg.lr = 0.1;
        let mut s = FedAvgM::new(cfg, FedavgmConfig { lr_decay: 0.5 });
        let global = ModelState::init(Arch::preset("mlp", [1, 2, 2], 2).unwrap(), 1);
        let clients = [ClientView { id: 0, samples: 4 }];
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            s.configure_round(1, &global, &clients, &mut rng).tasks[0]
                .1
                .train
                .lr,
            0.1
        );
        assert_eq!(
            s.configure_round(3, &global, &clients, &mut rng).tasks[0]
                .1
                .train
                .lr,
            0.025
        );
    }
}
