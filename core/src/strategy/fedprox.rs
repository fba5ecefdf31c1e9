//! FedProx (Li et al., MLSys 2020): FedAvg whose clients minimise their loss plus the proximal
//! term μ/2·‖w − w_global‖², so local training on a skewed shard cannot drift far from the
//! model it was sent. Aggregation is FedAvg's (it streams, and runs across edges); only the
//! task's step differs ([`Penalty::Proximal`]), so tabs and native clients train it alike.

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{
    ClientView, Contribution, FedAvg, RoundContext, RoundOutcome, RoundPlan, RunningSum, Settings,
    Strategy, StrategyConfig, parse_settings,
};
use crate::model::state::ModelState;
use crate::train::step::Penalty;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FedproxConfig {
    /// μ, the proximal term's weight (the paper tries 0.001 to 1; 0 is FedAvg exactly).
    pub mu: f32,
}

impl Default for FedproxConfig {
    fn default() -> Self {
        FedproxConfig { mu: 0.01 }
    }
}

pub struct FedProx {
    fedavg: FedAvg,
    own: FedproxConfig,
}

/// FedProx reads `[strategy.fedprox]` (μ) besides the shared settings.
pub fn build(
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    let own: FedproxConfig = parse_settings("fedprox", settings)?;
    Penalty::Proximal { mu: own.mu }
        .check()
        .map_err(|e| format!("[strategy.fedprox]: {e}"))?;
    Ok(Box::new(FedProx {
        fedavg: FedAvg::new(config),
        own,
    }))
}

impl Strategy for FedProx {
    /// The proximal term pulls towards the model each task was sent, whatever its version.
    fn check_buffered(&self) -> Result<(), String> {
        self.fedavg.check_buffered()
    }

    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> RoundPlan {
        let mut plan = self.fedavg.configure_round(round, global, clients, rng);
        for (_, task) in &mut plan.tasks {
            task.train.step.penalty = Penalty::Proximal { mu: self.own.mu };
        }
        plan
    }

    fn aggregate(
        &mut self,
        round: u32,
        global: &mut ModelState,
        results: &[Contribution],
        ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        self.fedavg.aggregate(round, global, results, ctx)
    }

    fn aggregate_sum(
        &mut self,
        round: u32,
        global: &mut ModelState,
        sum: &RunningSum,
        results: &[Contribution],
        ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        self.fedavg.aggregate_sum(round, global, sum, results, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;
    use crate::model::arch::Arch;
    use crate::train::{Host, Progress, train_local};
    use burn::tensor::Device;
    use rand::{RngExt, SeedableRng};

    struct Quiet;
    impl Host for Quiet {
        fn now_ms(&self) -> f64 {
            0.0
        }
        async fn progress(&mut self, _: &Progress) {}
    }

    fn toy() -> (ModelState, Dataset) {
        let global = ModelState::init(Arch::preset("mlp", [1, 4, 4], 3).unwrap(), 3);
        let mut rng = StdRng::seed_from_u64(2);
        let labels: Vec<u8> = (0..64).map(|i| (i % 3) as u8).collect();
        // Each class brighter in its own third of the image, so there is something to learn.
        let images = labels
            .iter()
            .flat_map(|&y| (0..16).map(move |p| if p / 6 == y as usize { 200u8 } else { 20 }))
            .map(|v| v.saturating_add(rng.random_range(0..30)))
            .collect();
        let data = Dataset {
            shape: [1, 4, 4],
            classes: 3,
            images,
            labels,
        };
        (global, data)
    }

    async fn trained(mu: Option<f32>) -> Vec<f32> {
        let (global, data) = toy();
        let clients = [ClientView { id: 7, samples: 64 }];
        let mut rng = StdRng::seed_from_u64(1);
        let mut task = match mu {
            Some(mu) => {
                let own = serde_json::json!({ "mu": mu });
                let mut s = build(StrategyConfig::default(), Some(&own)).unwrap();
                s.configure_round(1, &global, &clients, &mut rng)
                    .tasks
                    .remove(0)
                    .1
            }
            None => {
                FedAvg::new(StrategyConfig::default())
                    .configure_round(1, &global, &clients, &mut rng)
                    .tasks
                    .remove(0)
                    .1
            }
        };
        task.train.epochs = 3;
        let t = train_local(
            &global.arch,
            &global.params,
            None,
            &data,
            &task.train,
            &Device::flex(),
            &mut Quiet,
        )
        .await
        .unwrap();
        t.params
    }

    #[test]
    fn mu_zero_trains_exactly_as_fedavg_and_a_large_mu_stays_near_the_global_model() {
        let (global, _) = toy();
        let plain = pollster::block_on(trained(None));
        assert_eq!(
            pollster::block_on(trained(Some(0.0))),
            plain,
            "μ = 0 is FedAvg"
        );
        let dist = |w: &[f32]| -> f64 {
            w.iter()
                .zip(&global.params)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let pulled = pollster::block_on(trained(Some(5.0)));
        assert!(
            dist(&pulled) < 0.7 * dist(&plain),
            "μ = 5 drifts {} against FedAvg's {}",
            dist(&pulled),
            dist(&plain)
        );
    }

    #[test]
    fn every_task_carries_the_proximal_term() {
        let (global, _) = toy();
        let clients: Vec<ClientView> = (0..3).map(|id| ClientView { id, samples: 10 }).collect();
        let own = serde_json::json!({ "mu": 0.1 });
        let mut s = build(StrategyConfig::default(), Some(&own)).unwrap();
        let plan = s.configure_round(1, &global, &clients, &mut StdRng::seed_from_u64(1));
        assert_eq!(plan.tasks.len(), 3);
        assert!(plan.fold.is_some(), "FedProx streams as FedAvg does");
        for (_, t) in &plan.tasks {
            assert_eq!(t.train.step.penalty, Penalty::Proximal { mu: 0.1 });
        }
        let bad = serde_json::json!({ "mu": -1.0 });
        assert!(build(StrategyConfig::default(), Some(&bad)).is_err());
    }
}
