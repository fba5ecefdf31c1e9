//! FedAvg: θ ← Σ_k (n_k / n) θ_k over the sampled clients.

use rand::rngs::StdRng;

use super::{
    ClientView, Contribution, Fold, RoundContext, RoundOutcome, RoundPlan, RunningSum, Settings,
    Strategy, StrategyConfig, UploadKind, aggregate_folded, parse_settings, plain_round,
};
use crate::model::state::ModelState;
use crate::protocol::UploadSpec;

pub struct FedAvg {
    config: StrategyConfig,
}

impl FedAvg {
    pub fn new(config: StrategyConfig) -> Self {
        FedAvg { config }
    }
}

/// FedAvg has no settings of its own: a `[strategy.fedavg]` section must be empty.
pub fn build(
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    let NoSettings {} = parse_settings("fedavg", settings)?;
    Ok(Box::new(FedAvg::new(config)))
}

#[derive(Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NoSettings {}

impl Strategy for FedAvg {
    /// Each task trains the model it was sent and each result is a plain update, so a buffered
    /// step is one of its rounds.
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
        let tasks = plain_round(
            round,
            global,
            &self.config,
            clients,
            rng,
            UploadSpec::Weights,
        );
        RoundPlan::streamed(tasks, Fold::default())
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
        if results.iter().any(|c| c.kind != UploadKind::Weights) {
            return Err("fedavg expects weights".into());
        }
        global.params = sum.mean()?;
        Ok(RoundOutcome::default())
    }
}
