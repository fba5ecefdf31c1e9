//! Automatic structured pruning (METHODS.md, section 2): FedAvg on the current architecture, and
//! after each aggregation while pruning is active, every hidden dense or conv layer loses the
//! units whose score falls outside μ ± λσ of its layer. The model physically shrinks: the next
//! tasks carry the narrower architecture and every client rebuilds it.
//!
//! Two modes. The paper's: the score is each unit's L1 norm, both tails go, and the smaller model
//! is re-initialised after every cut (`reinit = true`), so removing well-trained units does no
//! lasting harm. Canopy's: the surviving weights are kept, so the score must not simply reward
//! training (an L1 norm mostly measures how much a unit has trained); see [`UnitScore`].

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{
    ClientView, Contribution, RoundContext, RoundOutcome, RoundPlan, Settings, Strategy,
    StrategyConfig, UploadKind, parse_settings, plain_round, weighted_values,
};
use crate::metric_keys as keys;
use crate::model::arch::Layer;
use crate::model::state::ModelState;
use crate::model::surgery::{keep_within_bounds, shrink, unit_norms};
use crate::protocol::UploadSpec;

/// What a unit's score measures.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum UnitScore {
    /// L1 norm of the unit's incoming weights (the paper).
    L1,
    /// L1 norm of how far the unit's incoming weights moved since the last surgery (since the
    /// start before the first): a unit that stopped learning moves little. Canopy's default.
    #[default]
    Movement,
    /// L1 norm of the unit's weights over the L1 norm of the same weights at initialisation:
    /// growth relative to where the unit started, so the init's own spread does not count.
    InitRelative,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StructuredConfig {
    /// Width of the keep band in standard deviations (the paper: 2.2 for FEMNIST, 2.0 for CelebA).
    pub lambda: f32,
    /// Never prune a layer below this many units (the paper: 1).
    pub min_units: usize,
    /// Stop pruning after this many consecutive rounds in which the model did not shrink.
    pub patience: u32,
    /// No pruning before this round: a warm-up in which the full model learns first (the
    /// paper: 1, pruning from the first round). With movement scores the first cut then sees
    /// how far each unit moved over the whole warm-up.
    pub prune_from: u32,
    /// No pruning after this round (the paper: 50).
    pub prune_until: u32,
    /// Re-initialise the smaller model instead of copying the surviving weights (the paper's code).
    pub reinit: bool,
    /// Prune the high tail too (the paper). Without it only weak units go.
    pub upper_tail: bool,
    /// The unit score the band is computed on.
    pub score: UnitScore,
    /// In a model with conv layers, prune conv filters only; hidden dense layers keep their
    /// width (the paper prunes only its CNN's filters). A model without convs (the MLP) prunes
    /// its dense units either way.
    pub conv_only: bool,
    /// Take the band on the logarithm of the scores: scores such as movement are skewed to the
    /// right (a few units move a lot), which widens σ until the low tail is empty; in log space
    /// the low tail is as wide as the high one.
    pub log_scores: bool,
}

impl Default for StructuredConfig {
    fn default() -> Self {
        // Canopy's mode (measured in docs/src/benchmarks/tables/compare-structured-*.md): weights kept, units scored by
        // their movement since the last surgery, low tail only, in log space. The paper's mode:
        // `score = "l1"`, `upper_tail = true`, `log_scores = false`, `reinit = true`,
        // `min_units = 1` (and `conv_only = true` on its CNN).
        StructuredConfig {
            lambda: 2.2,
            min_units: 4,
            patience: 3,
            prune_from: 1,
            prune_until: 50,
            reinit: false,
            upper_tail: false,
            score: UnitScore::Movement,
            conv_only: false,
            log_scores: true,
        }
    }
}

pub struct Structured {
    config: StrategyConfig,
    settings: StructuredConfig,
    stale: u32,
    stopped: bool,
    /// Parameters right after the last surgery (the start before the first): movement's origin.
    reference: Vec<f32>,
    /// The surviving parameters' values at initialisation, cut along with the model.
    init: Vec<f32>,
}

impl Structured {
    pub fn new(config: StrategyConfig, settings: StructuredConfig) -> Result<Self, String> {
        if !(settings.lambda >= 0.0) {
            return Err("structured lambda must be ≥ 0".into());
        }
        Ok(Structured {
            config,
            settings,
            stale: 0,
            stopped: false,
            reference: Vec::new(),
            init: Vec::new(),
        })
    }

    /// Whether round `round` may prune: before patience ran out, from `prune_from` to
    /// `prune_until` inclusive.
    pub fn pruning_active(&self, round: u32) -> bool {
        !self.stopped && (self.settings.prune_from..=self.settings.prune_until).contains(&round)
    }

    /// Per prunable layer, the score of each unit (its logarithm with `log_scores`).
    fn scores(&self, global: &ModelState) -> Vec<Option<Vec<f32>>> {
        let raw = self.raw_scores(global);
        if !self.settings.log_scores {
            return raw;
        }
        raw.into_iter()
            .map(|layer| {
                layer.map(|sc| {
                    // A unit that did not move at all sits far below the others, not at −∞.
                    let floor = 1e-6 * sc.iter().sum::<f32>() / sc.len().max(1) as f32;
                    sc.iter()
                        .map(|v| v.max(floor).max(f32::MIN_POSITIVE).ln())
                        .collect()
                })
            })
            .collect()
    }

    fn raw_scores(&self, global: &ModelState) -> Vec<Option<Vec<f32>>> {
        let s = &self.settings;
        let arch = &global.arch;
        let conv_only = s.conv_only && arch.layers.iter().any(|l| matches!(l, Layer::Conv { .. }));
        match s.score {
            UnitScore::L1 => unit_norms(arch, &global.params, conv_only),
            UnitScore::Movement => {
                let moved: Vec<f32> = global
                    .params
                    .iter()
                    .zip(&self.reference)
                    .map(|(p, r)| p - r)
                    .collect();
                unit_norms(arch, &moved, conv_only)
            }
            UnitScore::InitRelative => {
                let now = unit_norms(arch, &global.params, conv_only);
                let then = unit_norms(arch, &self.init, conv_only);
                now.into_iter()
                    .zip(then)
                    .map(|(n, t)| Some(n?.iter().zip(t?).map(|(a, b)| a / b.max(1e-12)).collect()))
                    .collect()
            }
        }
    }
}

/// `values` (in `state`'s layout) cut to the units `keep` keeps, like the model itself.
fn cut(state: &ModelState, values: &[f32], keep: &[Option<Vec<usize>>]) -> Vec<f32> {
    shrink(
        &ModelState {
            arch: state.arch.clone(),
            params: values.to_vec(),
            mask: None,
            mask_version: 0,
        },
        keep,
    )
    .params
}

/// Settings: `[strategy.structured]` ([`StructuredConfig`]).
pub fn build(
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    Ok(Box::new(Structured::new(
        config,
        parse_settings("structured", settings)?,
    )?))
}

impl Strategy for Structured {
    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> RoundPlan {
        // Surgery needs every client's weights together: the round does not stream.
        RoundPlan::buffered(plain_round(
            round,
            global,
            &self.config,
            clients,
            rng,
            UploadSpec::Weights,
        ))
    }

    fn save_state(&self) -> Vec<u8> {
        postcard::to_allocvec(&(self.stale, self.stopped, &self.reference, &self.init))
            .expect("encoding")
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        (self.stale, self.stopped, self.reference, self.init) =
            postcard::from_bytes(bytes).map_err(|e| format!("structured state: {e}"))?;
        Ok(())
    }

    fn aggregate(
        &mut self,
        round: u32,
        global: &mut ModelState,
        results: &[Contribution],
        ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        if results.iter().any(|c| c.kind != UploadKind::Weights) {
            return Err("structured pruning expects weights".into());
        }
        if self.reference.len() != global.params.len() {
            // First round (or a state that does not fit): the model the clients started from.
            self.reference = global.params.clone();
            self.init = global.params.clone();
        }
        global.params = weighted_values(results)?;
        let s = self.settings.clone();
        let mut outcome = RoundOutcome::default();
        // Both accuracies, on the server's validation split: the round's trained model, and the
        // model the next round starts from (after any surgery). They are only reported (no
        // decision rests on them), so without a split they are left out rather than read as 0.
        let trained = (ctx.validate)(global).ok();
        if let Some(t) = &trained {
            outcome
                .metrics
                .insert(keys::VAL_ACC_TRAINED.into(), t.accuracy as f64);
        }
        let active = self.pruning_active(round);
        let mut after = trained;
        if active {
            let keep: Vec<Option<Vec<usize>>> = self
                .scores(global)
                .into_iter()
                .map(|scores| {
                    scores.map(|sc| keep_within_bounds(&sc, s.lambda, s.min_units, s.upper_tail))
                })
                .collect();
            let before = global.arch.num_params();
            let smaller = shrink(global, &keep);
            if smaller.arch.num_params() < before {
                let removed: usize = global.arch.widths().iter().sum::<usize>()
                    - smaller.arch.widths().iter().sum::<usize>();
                outcome
                    .metrics
                    .insert(keys::PRUNED_UNITS.into(), removed as f64);
                if s.reinit {
                    *global = ModelState::init(smaller.arch, self.config.seed ^ round as u64);
                    self.init = global.params.clone();
                } else {
                    self.init = cut(global, &self.init, &keep);
                    *global = smaller;
                }
                self.reference = global.params.clone();
                self.stale = 0;
                after = (ctx.validate)(global).ok();
            } else {
                self.stale += 1;
                if self.stale >= s.patience {
                    self.stopped = true;
                }
            }
        }
        if let Some(a) = &after {
            outcome
                .metrics
                .insert(keys::VAL_ACC_AFTER_SURGERY.into(), a.accuracy as f64);
        }
        outcome
            .metrics
            .insert(keys::PRUNING_ACTIVE.into(), active as u8 as f64);
        outcome
            .metrics
            .insert(keys::PARAMS_NEXT.into(), global.arch.num_params() as f64);
        outcome.metrics.insert(
            keys::FLOPS_NEXT.into(),
            global.arch.flops_per_sample() as f64,
        );
        for (i, w) in global.arch.widths().iter().enumerate() {
            outcome.metrics.insert(keys::width(i), *w as f64);
        }
        for p in global.arch.params() {
            *outcome
                .metrics
                .entry(keys::layer_bytes(p.layer))
                .or_default() += 4.0 * p.len as f64;
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Arch;

    #[test]
    fn prunes_outliers_then_stops_after_patience() {
        let mut cfg = StructuredConfig::default();
        cfg.score = UnitScore::L1;
        cfg.upper_tail = true;
        cfg.log_scores = false;
        cfg.lambda = 1.0;
        cfg.patience = 2;
        let mut s = Structured::new(StrategyConfig::default(), cfg).unwrap();
        let arch = Arch::preset("mlp", [1, 4, 4], 3).unwrap();
        let mut global = ModelState::init(arch, 1);
        let validate = |_: &ModelState| Ok(crate::train::Eval::default());
        let ctx = RoundContext {
            rounds: 10,
            validate: &validate,
        };
        let w = |g: &ModelState| Contribution {
            client: 0,
            samples: 5,
            kind: UploadKind::Weights,
            values: g.params.clone(),
            metrics: Default::default(),
            encoding: Default::default(),
        };
        let before = global.arch.num_params();
        let r = [w(&global)];
        let out = s.aggregate(1, &mut global, &r, &ctx).unwrap();
        assert!(
            global.arch.num_params() < before,
            "λ = 1 prunes the tails of random weights"
        );
        assert!(out.metrics["pruned_units"] > 0.0);
        assert_eq!(global.params.len(), global.arch.num_params());
        assert_eq!(
            *global.arch.widths().last().unwrap(),
            3,
            "the output layer keeps every class"
        );
        // With λ huge nothing falls outside the band: patience runs out and pruning stops.
        s.settings.lambda = 100.0;
        let n = global.arch.num_params();
        let r = [w(&global)];
        s.aggregate(2, &mut global, &r, &ctx).unwrap();
        let r = [w(&global)];
        let out = s.aggregate(3, &mut global, &r, &ctx).unwrap();
        assert_eq!(global.arch.num_params(), n);
        assert_eq!(
            out.metrics["pruning_active"], 1.0,
            "round 3 still tried, and ran out of patience"
        );
        s.settings.lambda = 0.1;
        let r = [w(&global)];
        let out = s.aggregate(4, &mut global, &r, &ctx).unwrap();
        assert_eq!(global.arch.num_params(), n, "stopped for good");
        assert_eq!(out.metrics["pruning_active"], 0.0);
    }

    fn weights(g: &ModelState) -> Contribution {
        Contribution {
            client: 0,
            samples: 5,
            kind: UploadKind::Weights,
            values: g.params.clone(),
            metrics: Default::default(),
            encoding: Default::default(),
        }
    }

    /// L1 scores, both tails, λ = 1 (every round cuts something), patience 10, on a small MLP;
    /// `edit` sets the rest.
    fn cutting_every_round(edit: impl FnOnce(&mut StructuredConfig)) -> (Structured, ModelState) {
        let mut cfg = StructuredConfig {
            score: UnitScore::L1,
            upper_tail: true,
            log_scores: false,
            lambda: 1.0,
            patience: 10,
            ..Default::default()
        };
        edit(&mut cfg);
        (
            Structured::new(StrategyConfig::default(), cfg).unwrap(),
            ModelState::init(Arch::preset("mlp", [1, 4, 4], 3).unwrap(), 1),
        )
    }

    #[test]
    fn pruning_and_its_metric_agree_on_the_last_round() {
        let (mut s, mut global) = cutting_every_round(|c| c.prune_until = 2);
        let validate = |_: &ModelState| Ok(crate::train::Eval::default());
        let ctx = RoundContext {
            rounds: 10,
            validate: &validate,
        };
        let r = [weights(&global)];
        s.aggregate(1, &mut global, &r, &ctx).unwrap();
        // Round 2 = prune_until: pruning runs, and the metric says so.
        let before = global.arch.num_params();
        let r = [weights(&global)];
        let out = s.aggregate(2, &mut global, &r, &ctx).unwrap();
        assert_eq!(out.metrics["pruning_active"], 1.0);
        assert!(
            global.arch.num_params() < before,
            "λ = 1 still cuts the tails in round prune_until"
        );
        // Round 3: neither.
        let before = global.arch.num_params();
        let r = [weights(&global)];
        let out = s.aggregate(3, &mut global, &r, &ctx).unwrap();
        assert_eq!(out.metrics["pruning_active"], 0.0);
        assert_eq!(global.arch.num_params(), before);
        assert!(!s.pruning_active(3) && s.pruning_active(2));
    }

    #[test]
    fn nothing_is_pruned_before_prune_from() {
        let (mut s, mut global) = cutting_every_round(|c| c.prune_from = 3);
        let validate = |_: &ModelState| Ok(crate::train::Eval::default());
        let ctx = RoundContext {
            rounds: 10,
            validate: &validate,
        };
        let full = global.arch.num_params();
        for round in 1..=2 {
            let r = [weights(&global)];
            let out = s.aggregate(round, &mut global, &r, &ctx).unwrap();
            assert_eq!(out.metrics["pruning_active"], 0.0, "round {round}: warm-up");
            assert_eq!(global.arch.num_params(), full, "round {round}: warm-up");
        }
        // Round 3: λ = 1 cuts both tails, as it would have in round 1.
        let r = [weights(&global)];
        let out = s.aggregate(3, &mut global, &r, &ctx).unwrap();
        assert_eq!(out.metrics["pruning_active"], 1.0);
        assert!(global.arch.num_params() < full);
    }

    #[test]
    fn movement_prunes_the_unit_that_stopped_learning_and_keeps_trained_weights() {
        let mut cfg = StructuredConfig::default();
        cfg.log_scores = false;
        cfg.lambda = 1.0;
        cfg.upper_tail = false;
        cfg.score = UnitScore::Movement;
        let mut s = Structured::new(StrategyConfig::default(), cfg).unwrap();
        let arch = Arch::preset("mlp", [1, 4, 4], 3).unwrap();
        let mut global = ModelState::init(arch.clone(), 1);
        // Every unit of the first hidden layer moves by 0.1 per weight, except unit 7.
        let mut trained = global.clone();
        let w = &arch.params()[0];
        for i in 0..16 {
            for j in (0..200).filter(|&j| j != 7) {
                trained.params[w.offset + i * 200 + j] += 0.1;
            }
        }
        let validate = |m: &ModelState| {
            Ok(crate::train::Eval {
                accuracy: m.arch.num_params() as f32,
                ..Default::default()
            })
        };
        let ctx = RoundContext {
            rounds: 10,
            validate: &validate,
        };
        let out = s
            .aggregate(1, &mut global, &[weights(&trained)], &ctx)
            .unwrap();
        assert_eq!(
            global.arch.widths(),
            vec![199, 200, 3],
            "only the still unit goes; the unmoved layer keeps all"
        );
        // The trained values were kept (no re-initialisation): unit 8 is now column 7.
        assert_eq!(global.params[7], trained.params[8]);
        // Both accuracies are logged: before the cut (full model) and after it.
        assert_eq!(out.metrics["val_acc_trained"], arch.num_params() as f64);
        assert_eq!(
            out.metrics["val_acc_after_surgery"],
            global.arch.num_params() as f64
        );
        // Movement restarts from the cut model: nothing moved since, so nothing more goes.
        let r = [weights(&global)];
        s.aggregate(2, &mut global, &r, &ctx).unwrap();
        assert_eq!(global.arch.widths(), vec![199, 200, 3]);
    }

    #[test]
    fn log_scores_find_the_low_tail_of_a_skewed_layer() {
        // First hidden layer: 20 units move a lot, 179 a little, unit 0 hardly at all. The big
        // movers widen σ so far that μ − 2.2σ < 0: without logs nothing is an outlier.
        let arch = Arch::preset("mlp", [1, 4, 4], 3).unwrap();
        let w = arch.params()[0].clone();
        let run = |log: bool| {
            let mut cfg = StructuredConfig::default();
            cfg.score = UnitScore::Movement;
            cfg.upper_tail = false;
            cfg.log_scores = log;
            let mut s = Structured::new(StrategyConfig::default(), cfg).unwrap();
            let mut global = ModelState::init(arch.clone(), 1);
            let mut trained = global.clone();
            for i in 0..16 {
                for j in 0..200 {
                    trained.params[w.offset + i * 200 + j] += match j {
                        0 => 0.001,
                        1..=20 => 1.0,
                        _ => 0.1,
                    };
                }
            }
            let validate = |_: &ModelState| Ok(crate::train::Eval::default());
            let ctx = RoundContext {
                rounds: 10,
                validate: &validate,
            };
            s.aggregate(1, &mut global, &[weights(&trained)], &ctx)
                .unwrap();
            global.arch.widths()[0]
        };
        assert_eq!(run(false), 200);
        assert_eq!(run(true), 199);
    }

    #[test]
    fn init_relative_scores_ignore_the_spread_of_the_initial_norms() {
        let mut cfg = StructuredConfig::default();
        cfg.upper_tail = true;
        cfg.lambda = 1.0;
        cfg.score = UnitScore::InitRelative;
        let mut s = Structured::new(StrategyConfig::default(), cfg).unwrap();
        let mut global = ModelState::init(Arch::preset("mlp", [1, 4, 4], 3).unwrap(), 1);
        // Everything scaled by the same factor: every unit grew alike, nothing is an outlier.
        let mut trained = global.clone();
        trained.params.iter_mut().for_each(|v| *v *= 1.5);
        let validate = |_: &ModelState| Ok(crate::train::Eval::default());
        let ctx = RoundContext {
            rounds: 10,
            validate: &validate,
        };
        s.aggregate(1, &mut global, &[weights(&trained)], &ctx)
            .unwrap();
        assert_eq!(global.arch.widths(), vec![200, 200, 3]);
    }

    #[test]
    fn conv_only_leaves_dense_layers_alone() {
        let mut cfg = StructuredConfig::default();
        cfg.score = UnitScore::L1;
        cfg.upper_tail = true;
        cfg.log_scores = false;
        cfg.lambda = 0.5;
        cfg.conv_only = true;
        cfg.min_units = 1;
        let mut s = Structured::new(StrategyConfig::default(), cfg).unwrap();
        let mut global = ModelState::init(Arch::preset("cnn", [1, 8, 8], 3).unwrap(), 1);
        let validate = |_: &ModelState| Ok(crate::train::Eval::default());
        let ctx = RoundContext {
            rounds: 10,
            validate: &validate,
        };
        let r = [weights(&global)];
        s.aggregate(1, &mut global, &r, &ctx).unwrap();
        let w = global.arch.widths();
        assert!(w[0] < 32 && w[1] < 64, "{w:?}");
        assert_eq!(w[2], 512, "the hidden dense layer keeps its width");
    }
}
