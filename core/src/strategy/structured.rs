//! Automatic structured pruning (METHODS.md, section 2): FedAvg on the current architecture, and
//! after each aggregation while pruning is active, every hidden dense or conv layer loses the
//! units whose L1 norm falls outside μ ± λσ of its layer. The model physically shrinks: the next
//! tasks carry the narrower architecture and every client rebuilds it.

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{ClientView, Contribution, RoundContext, RoundOutcome, Settings, Strategy, StrategyConfig, UploadKind, parse_settings, plain_round, weighted_values};
use crate::metric_keys as keys;
use crate::protocol::{Task, UploadSpec};
use crate::state::ModelState;
use crate::surgery::{keep_within_bounds, shrink, unit_scores};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StructuredConfig {
    /// Width of the keep band in standard deviations (the paper: 2.2 for FEMNIST, 2.0 for CelebA).
    pub lambda: f32,
    /// Never prune a layer below this many units.
    pub min_units: usize,
    /// Stop pruning after this many consecutive rounds in which the model did not shrink.
    pub patience: u32,
    /// No pruning after this round (the paper: 50).
    pub prune_until: u32,
    /// Re-initialise the smaller model instead of copying the surviving weights (the paper's code).
    pub reinit: bool,
    /// Prune the high tail too (the paper). Without it only weak units go: the strongest units
    /// carry most of what the model has learned, and removing them every round can undo it.
    pub upper_tail: bool,
}

impl Default for StructuredConfig {
    fn default() -> Self {
        StructuredConfig { lambda: 2.2, min_units: 4, patience: 3, prune_until: 50, reinit: false, upper_tail: true }
    }
}

pub struct Structured {
    config: StrategyConfig,
    settings: StructuredConfig,
    stale: u32,
    stopped: bool,
}

impl Structured {
    pub fn new(config: StrategyConfig, settings: StructuredConfig) -> Result<Self, String> {
        if !(settings.lambda >= 0.0) {
            return Err("structured lambda must be ≥ 0".into());
        }
        Ok(Structured { config, settings, stale: 0, stopped: false })
    }
}

/// Settings: `[strategy.structured]` ([`StructuredConfig`]).
pub fn build(config: StrategyConfig, settings: Option<&Settings>) -> Result<Box<dyn Strategy>, String> {
    Ok(Box::new(Structured::new(config, parse_settings("structured", settings)?)?))
}

impl Strategy for Structured {
    fn configure_round(&mut self, round: u32, global: &ModelState, clients: &[ClientView], rng: &mut StdRng) -> Vec<(u64, Task)> {
        plain_round(round, global, &self.config, clients, rng, UploadSpec::Weights)
    }

    fn save_state(&self) -> Vec<u8> {
        postcard::to_allocvec(&(self.stale, self.stopped)).expect("encoding")
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        (self.stale, self.stopped) = postcard::from_bytes(bytes).map_err(|e| format!("structured state: {e}"))?;
        Ok(())
    }

    fn aggregate(&mut self, round: u32, global: &mut ModelState, results: &[Contribution], _ctx: &RoundContext) -> Result<RoundOutcome, String> {
        if results.iter().any(|c| c.kind != UploadKind::Weights) {
            return Err("structured pruning expects weights".into());
        }
        global.params = weighted_values(results)?;
        let s = &self.settings;
        let mut outcome = RoundOutcome::default();
        let active = !self.stopped && round <= s.prune_until;
        if active {
            let keep: Vec<Option<Vec<usize>>> = unit_scores(global)
                .into_iter()
                .map(|scores| scores.map(|sc| keep_within_bounds(&sc, s.lambda, s.min_units, s.upper_tail)))
                .collect();
            let before = global.arch.num_params();
            let smaller = shrink(global, &keep);
            if smaller.arch.num_params() < before {
                let removed: usize = global.arch.widths().iter().sum::<usize>() - smaller.arch.widths().iter().sum::<usize>();
                outcome.metrics.insert(keys::PRUNED_UNITS.into(), removed as f64);
                *global = if s.reinit { ModelState::init(smaller.arch, self.config.seed ^ round as u64) } else { smaller };
                self.stale = 0;
            } else {
                self.stale += 1;
                if self.stale >= s.patience {
                    self.stopped = true;
                }
            }
        }
        outcome.metrics.insert("pruning_active".into(), (!self.stopped && round < s.prune_until) as u8 as f64);
        for (i, w) in global.arch.widths().iter().enumerate() {
            outcome.metrics.insert(keys::width(i), *w as f64);
        }
        for p in global.arch.params() {
            *outcome.metrics.entry(keys::layer_bytes(p.layer)).or_default() += 4.0 * p.len as f64;
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Arch;

    #[test]
    fn prunes_outliers_then_stops_after_patience() {
        let settings = StructuredConfig { lambda: 1.0, patience: 2, ..Default::default() };
        let mut s = Structured::new(StrategyConfig::default(), settings).unwrap();
        let arch = Arch::preset("mlp", [1, 4, 4], 3).unwrap();
        let mut global = ModelState::init(arch, 1);
        let validate = |_: &ModelState| crate::train::Eval::default();
        let ctx = RoundContext { rounds: 10, validate: &validate };
        let w = |g: &ModelState| Contribution { client: 0, samples: 5, kind: UploadKind::Weights, values: g.params.clone(), metrics: Default::default(), encoding: Default::default() };
        let before = global.arch.num_params();
        let r = [w(&global)];
        let out = s.aggregate(1, &mut global, &r, &ctx).unwrap();
        assert!(global.arch.num_params() < before, "λ = 1 prunes the tails of random weights");
        assert!(out.metrics["pruned_units"] > 0.0);
        assert_eq!(global.params.len(), global.arch.num_params());
        assert_eq!(*global.arch.widths().last().unwrap(), 3, "the output layer keeps every class");
        // With λ huge nothing falls outside the band: patience runs out and pruning stops.
        s.settings.lambda = 100.0;
        let n = global.arch.num_params();
        let r = [w(&global)];
        s.aggregate(2, &mut global, &r, &ctx).unwrap();
        let r = [w(&global)];
        let out = s.aggregate(3, &mut global, &r, &ctx).unwrap();
        assert_eq!(global.arch.num_params(), n);
        assert_eq!(out.metrics["pruning_active"], 0.0);
        s.settings.lambda = 0.1;
        let r = [w(&global)];
        s.aggregate(4, &mut global, &r, &ctx).unwrap();
        assert_eq!(global.arch.num_params(), n, "stopped for good");
    }
}
