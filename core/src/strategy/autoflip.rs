//! AutoFLIP: federated loss exploration, then one global informed pruning mask, then masked
//! training with compressed updates and FedAvgM on the server (METHODS.md, section 1).
//!
//! Round 1 is the exploration: sampled clients train from the same base for up to
//! `explore_epochs` (early stopping on the training loss) and send their deviation. Their mean
//! squared deviation, min-max scaled within each tensor, is the guidance map G; the lowest-G
//! fraction q of all parameters is pruned. Later rounds train under the mask, clients upload only
//! kept entries (int8, optionally top-k with error feedback), and the server keeps an EMA of the
//! squared deltas so it can re-prune towards a target sparsity as training goes on.

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{
    ClientView, Contribution, Fold, Phase, RoundContext, RoundOutcome, RoundPlan, RunningSum,
    Settings, Strategy, StrategyConfig, UploadKind, aggregate_folded, parse_settings,
    sample_clients, task_on,
};
use crate::aggregate::momentum_step;
use crate::metric_keys as keys;
use crate::model::arch::Arch;
use crate::model::state::ModelState;
use crate::protocol::UploadSpec;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AutoflipConfig {
    /// Fraction of connected clients that explore.
    pub explore_fraction: f64,
    /// Upper bound on exploration epochs (the paper's code: 150).
    pub explore_epochs: u32,
    /// Early stopping patience on the training loss (the paper's code: 40).
    pub explore_patience: u32,
    /// Fraction of all parameters pruned after exploration (the paper: 0.3).
    pub q: f64,
    /// Choose q automatically: the largest q on a grid whose pruned model keeps the validation
    /// loss within `q_tolerance` (relative) of the unpruned one.
    pub auto_q: bool,
    /// With `auto_q`: how much worse (relative) the pruned model's validation loss may be.
    pub q_tolerance: f64,
    /// Start federated training from the exploration-trained weights (the paper) rather than θ₀.
    pub start_from_explored: bool,
    /// Upload kept entries as int8 with one scale per tensor.
    pub int8: bool,
    /// Exploration deltas as int8 too (4× fewer bytes, but many small entries quantise to 0 and
    /// tie at G = 0; ties are broken at random, seeded, either way).
    pub explore_int8: bool,
    /// Upload only this fraction of the kept entries, the largest first (1: all).
    pub top_k: f32,
    /// Carry what top-k and int8 leave out into the next round's upload.
    pub error_feedback: bool,
    /// Re-prune every this many rounds (0: never) towards `target_sparsity` by the last round.
    pub reprune_every: u32,
    /// With `reprune_every`: the fraction of parameters pruned by the last round.
    pub target_sparsity: f64,
    /// Decay of the moving average of squared deltas that guides re-pruning.
    pub ema: f64,
    /// Client learning rate multiplier per round (the paper: 0.99).
    pub lr_decay: f64,
}

impl Default for AutoflipConfig {
    fn default() -> Self {
        AutoflipConfig {
            explore_fraction: 1.0,
            explore_epochs: 20,
            explore_patience: 5,
            q: 0.3,
            auto_q: false,
            q_tolerance: 0.05,
            start_from_explored: true,
            int8: true,
            explore_int8: true,
            top_k: 1.0,
            error_feedback: true,
            reprune_every: 0,
            target_sparsity: 0.0,
            ema: 0.9,
            lr_decay: 0.99,
        }
    }
}

pub struct AutoFlip {
    config: StrategyConfig,
    settings: AutoflipConfig,
    /// Round in which exploration was aggregated (0: not yet).
    explored_in: u32,
    base: Vec<f32>,
    velocity: Vec<f32>,
    /// Moving average of squared client deltas from normal rounds, per parameter (empty until
    /// the first normal round: the exploration's many-epoch Δ² would dominate it for long).
    ema: Vec<f32>,
    /// Sparsity right after exploration (start of the re-pruning schedule).
    q0: f64,
}

impl AutoFlip {
    pub fn new(config: StrategyConfig, settings: AutoflipConfig) -> Result<Self, String> {
        let a = &settings;
        if !(0.0..1.0).contains(&a.q) || !(0.0..1.0).contains(&a.target_sparsity) {
            return Err("autoflip q and target_sparsity must lie in [0, 1)".into());
        }
        if !(a.top_k > 0.0 && a.top_k <= 1.0) {
            return Err("autoflip top_k must lie in (0, 1]".into());
        }
        Ok(AutoFlip {
            config,
            settings,
            explored_in: 0,
            base: Vec::new(),
            velocity: Vec::new(),
            ema: Vec::new(),
            q0: 0.0,
        })
    }

    /// `sum`: the clients' deltas, sample-weighted, and their squares (one vote per client).
    fn explore(
        &mut self,
        global: &mut ModelState,
        sum: &RunningSum,
        results: &[Contribution],
        ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        let a = self.settings.clone();
        let n = global.params.len();
        let sq = sum.mean_squares()?;
        let g = guidance(&global.arch, &sq);
        let mean_delta = sum.mean()?;
        let start: Vec<f32> = if a.start_from_explored {
            self.base
                .iter()
                .zip(&mean_delta)
                .map(|(b, d)| b + d)
                .collect()
        } else {
            self.base.clone()
        };
        let mut outcome = RoundOutcome::default();
        let q = if a.auto_q {
            let q = choose_q(global, &start, &g, a.q_tolerance, ctx, &mut outcome)?;
            outcome.metrics.insert(keys::Q_AUTO.into(), q);
            q
        } else {
            a.q
        };
        global.params = start;
        global.set_mask(prune_lowest(&g, q, None, self.config.seed));
        self.q0 = global.sparsity();
        self.ema = Vec::new();
        self.velocity = vec![0.0; n];
        let epochs: f64 =
            results.iter().map(|c| c.metrics.epochs as f64).sum::<f64>() / results.len() as f64;
        outcome.metrics.insert(keys::Q.into(), q);
        outcome
            .metrics
            .insert(keys::EXPLORE_CLIENTS.into(), results.len() as f64);
        outcome
            .metrics
            .insert(keys::EXPLORE_EPOCHS_MEAN.into(), epochs);
        Ok(outcome)
    }

    fn train(
        &mut self,
        round: u32,
        global: &mut ModelState,
        sum: &RunningSum,
        ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        let a = self.settings.clone();
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
        let mask = global
            .mask
            .clone()
            .unwrap_or_else(|| vec![true; global.params.len()]);
        for ((p, v), k) in global
            .params
            .iter_mut()
            .zip(self.velocity.iter_mut())
            .zip(&mask)
        {
            if !k {
                *p = 0.0;
                *v = 0.0;
            }
        }
        let sq = sum.mean_squares()?;
        if self.ema.len() != sq.len() {
            // The first normal round starts the average.
            self.ema = sq;
        } else {
            let beta = a.ema as f32;
            for (e, s) in self.ema.iter_mut().zip(sq) {
                *e = beta * *e + (1.0 - beta) * s;
            }
        }
        let mut outcome = RoundOutcome::default();
        let since = round - self.explored_in;
        if a.reprune_every > 0
            && since.is_multiple_of(a.reprune_every)
            && a.target_sparsity > global.sparsity()
        {
            // Linear schedule from the post-exploration sparsity to the target at the last round.
            let span = (ctx.rounds - self.explored_in).max(1) as f64;
            let want = self.q0 + (a.target_sparsity - self.q0) * (since as f64 / span).min(1.0);
            if want > global.sparsity() {
                let g = guidance(&global.arch, &self.ema);
                global.set_mask(prune_lowest(
                    &g,
                    want,
                    Some(&mask),
                    self.config.seed ^ round as u64,
                ));
                for (v, k) in self.velocity.iter_mut().zip(global.mask.as_ref().unwrap()) {
                    if !k {
                        *v = 0.0;
                    }
                }
                outcome.metrics.insert(keys::REPRUNED.into(), 1.0);
            }
        }
        Ok(outcome)
    }
}

/// Settings: `[strategy.autoflip]` ([`AutoflipConfig`]), plus the shared server momentum.
pub fn build(
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    Ok(Box::new(AutoFlip::new(
        config,
        parse_settings("autoflip", settings)?,
    )?))
}

/// AutoFLIP needs the deltas' weighted mean and their mean squares: both are running sums.
const FOLD: Fold = Fold {
    squares: true,
    ..Fold::PLAIN
};

impl Strategy for AutoFlip {
    fn needs_validation(&self) -> bool {
        self.settings.auto_q
    }

    fn save_state(&self) -> Vec<u8> {
        postcard::to_allocvec(&(self.explored_in, &self.velocity, &self.ema, self.q0))
            .expect("encoding")
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        let (explored_in, velocity, ema, q0): (u32, Vec<f32>, Vec<f32>, f64) =
            postcard::from_bytes(bytes).map_err(|e| format!("autoflip state: {e}"))?;
        (self.explored_in, self.velocity, self.ema, self.q0) = (explored_in, velocity, ema, q0);
        Ok(())
    }

    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> RoundPlan {
        let a = &self.settings;
        let exploring = self.explored_in == 0;
        let (fraction, upload) = if exploring {
            self.base = global.params.clone();
            (
                a.explore_fraction,
                UploadSpec::Sparse {
                    int8: a.explore_int8,
                    top_k: 1.0,
                    error_feedback: false,
                },
            )
        } else {
            (
                self.config.fraction,
                UploadSpec::Sparse {
                    int8: a.int8,
                    top_k: a.top_k,
                    error_feedback: a.error_feedback,
                },
            )
        };
        let mut config = self.config.clone();
        if exploring {
            config.epochs = a.explore_epochs;
        } else {
            config.lr *= a.lr_decay.powi((round - self.explored_in - 1) as i32);
        }
        // One encoded model, shared by every sampled client's task.
        let model = std::sync::Arc::new(crate::codec::encode_model(global));
        let tasks = sample_clients(clients, fraction, self.config.min_fit, rng)
            .into_iter()
            .map(|c| {
                let mut task = task_on(round, model.clone(), &config, c.id, upload);
                if exploring {
                    task.train.patience = a.explore_patience;
                }
                (c.id, task)
            })
            .collect();
        let plan = RoundPlan::streamed(tasks, FOLD);
        if exploring {
            plan.with_phase(Phase::Own("exploring".into()))
        } else {
            plan
        }
    }

    fn aggregate(
        &mut self,
        round: u32,
        global: &mut ModelState,
        results: &[Contribution],
        ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        aggregate_folded(self, FOLD, round, global, results, ctx)
    }

    fn aggregate_sum(
        &mut self,
        round: u32,
        global: &mut ModelState,
        sum: &RunningSum,
        results: &[Contribution],
        ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        if results.iter().any(|c| c.kind != UploadKind::Delta) {
            return Err("autoflip expects deltas".into());
        }
        let mut outcome = if self.explored_in == 0 {
            let o = self.explore(global, sum, results, ctx)?;
            self.explored_in = round;
            o
        } else {
            self.train(round, global, sum, ctx)?
        };
        mask_metrics(global, &mut outcome);
        Ok(outcome)
    }
}

/// G: per tensor, the values min-max scaled to [0, 1] (a constant tensor maps to 0).
pub fn guidance(arch: &Arch, sq_mean: &[f32]) -> Vec<f32> {
    let mut g = sq_mean.to_vec();
    for p in arch.params() {
        let t = &mut g[p.offset..p.offset + p.len];
        let (lo, hi) = t
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), v| {
                (l.min(*v), h.max(*v))
            });
        let span = hi - lo;
        for v in t.iter_mut() {
            *v = if span > 0.0 { (*v - lo) / span } else { 0.0 };
        }
    }
    g
}

/// A mask pruning the `q` fraction of all entries with the lowest `g` (one global threshold).
/// Ties are broken in a random order drawn from `seed` (by index they would bias pruning toward
/// the first tensors and the first rows of an image). Entries `already` pruned stay pruned and
/// count towards q.
pub fn prune_lowest(g: &[f32], q: f64, already: Option<&[bool]>, seed: u64) -> Vec<bool> {
    let n = g.len();
    let target = ((q * n as f64).floor() as usize).min(n);
    let mut mask = already.map(|m| m.to_vec()).unwrap_or_else(|| vec![true; n]);
    let pruned = mask.iter().filter(|k| !**k).count();
    if target <= pruned {
        return mask;
    }
    let mut order: Vec<usize> = (0..n).filter(|&i| mask[i]).collect();
    let tie = |i: usize| splitmix64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.sort_by(|&a, &b| {
        g[a].total_cmp(&g[b])
            .then_with(|| tie(a).cmp(&tie(b)))
            .then(a.cmp(&b))
    });
    for &i in order.iter().take(target - pruned) {
        mask[i] = false;
    }
    mask
}

/// A well-mixed 64-bit hash (SplitMix64's finaliser).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The largest q on a 0.1 grid whose pruned model's validation loss stays within `tolerance`
/// (relative) of the unpruned model's; 0 when even q = 0.1 costs too much. An error when the
/// validation split cannot be evaluated: with no evidence every loss would read the same and the
/// largest q would win.
fn choose_q(
    global: &ModelState,
    start: &[f32],
    g: &[f32],
    tolerance: f64,
    ctx: &RoundContext,
    outcome: &mut RoundOutcome,
) -> Result<f64, String> {
    let validate = |m: &ModelState| {
        (ctx.validate)(m).map_err(|e| format!("autoflip cannot choose q automatically: {e}"))
    };
    let mut probe = ModelState {
        params: start.to_vec(),
        ..global.clone()
    };
    let dense = validate(&probe)?.loss as f64;
    outcome
        .metrics
        .insert(keys::Q_AUTO_DENSE_VAL_LOSS.into(), dense);
    for step in (1..=9).rev() {
        let q = step as f64 / 10.0;
        probe.params = start.to_vec();
        probe.mask = None;
        probe.set_mask(prune_lowest(g, q, None, 0));
        let loss = validate(&probe)?.loss as f64;
        if loss <= dense * (1.0 + tolerance) {
            outcome.metrics.insert(keys::Q_AUTO_VAL_LOSS.into(), loss);
            return Ok(q);
        }
    }
    Ok(0.0)
}

/// Sparsity overall and per weight tensor, and FLOPs with pruned weights skipped.
pub fn mask_metrics(global: &ModelState, outcome: &mut RoundOutcome) {
    outcome
        .metrics
        .insert(keys::SPARSITY.into(), global.sparsity());
    let dense = global.arch.flops_per_sample() as f64;
    let effective = global.arch.effective_flops(global.mask.as_deref()) as f64;
    outcome
        .metrics
        .insert(keys::EFFECTIVE_FLOPS.into(), effective);
    outcome
        .metrics
        .insert(keys::FLOPS_RATIO.into(), effective / dense.max(1.0));
    if let Some(m) = &global.mask {
        for p in global.arch.params() {
            let pruned = m[p.offset..p.offset + p.len]
                .iter()
                .filter(|k| !**k)
                .count();
            outcome
                .metrics
                .insert(keys::tensor_sparsity(&p.name), pruned as f64 / p.len as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Layer;

    fn arch() -> Arch {
        Arch {
            input: [1, 1, 2],
            classes: 2,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 2,
                    units: 2,
                },
            ],
        }
    }

    #[test]
    fn guidance_is_min_max_per_tensor() {
        // Two clients' deltas on a 2×2 weight and a 2-entry bias.
        let d1 = [1.0f32, 0.0, 2.0, 0.0, 0.5, 0.5];
        let d2 = [1.0f32, 0.0, 0.0, 2.0, 0.5, 0.5];
        let sq: Vec<f32> = d1
            .iter()
            .zip(&d2)
            .map(|(a, b)| (a * a + b * b) / 2.0)
            .collect();
        assert_eq!(sq, vec![1.0, 0.0, 2.0, 2.0, 0.25, 0.25]);
        let g = guidance(&arch(), &sq);
        assert_eq!(
            g,
            vec![0.5, 0.0, 1.0, 1.0, 0.0, 0.0],
            "weights scaled within themselves; a flat bias maps to 0"
        );
    }

    #[test]
    fn one_global_threshold_prunes_the_lowest() {
        let g = [0.5f32, 0.0, 1.0, 1.0, 0.0, 0.2];
        assert_eq!(
            prune_lowest(&g, 0.5, None, 1),
            vec![true, false, true, true, false, false]
        );
        assert_eq!(prune_lowest(&g, 0.0, None, 1), vec![true; 6]);
        // Re-pruning keeps what is pruned and adds the next lowest.
        let m = prune_lowest(&g, 0.34, None, 1);
        assert_eq!(m, vec![true, false, true, true, false, true]);
        assert_eq!(
            prune_lowest(&g, 0.5, Some(&m), 1),
            vec![true, false, true, true, false, false]
        );
        assert_eq!(prune_lowest(&g, 0.1, Some(&m), 1), m, "never un-prunes");
    }

    #[test]
    fn ties_are_broken_at_random_not_by_index() {
        // 1,000 entries tied at G = 0 (int8 exploration deltas that rounded to zero), 10% pruned.
        let g = vec![0f32; 1000];
        let a = prune_lowest(&g, 0.1, None, 7);
        let pruned: Vec<usize> = (0..1000).filter(|&i| !a[i]).collect();
        assert_eq!(pruned.len(), 100);
        assert!(
            pruned.iter().filter(|&&i| i < 500).count() > 30
                && pruned.iter().filter(|&&i| i >= 500).count() > 30,
            "{pruned:?}"
        );
        assert_eq!(prune_lowest(&g, 0.1, None, 7), a, "reproducible for a seed");
        assert_ne!(
            prune_lowest(&g, 0.1, None, 8),
            a,
            "another seed, another draw"
        );
        // Ties never override the order of distinct values.
        let g: Vec<f32> = (0..10).map(|i| if i < 5 { 1.0 } else { 0.0 }).collect();
        assert!((0..10).all(|i| prune_lowest(&g, 0.5, None, 3)[i] == (i < 5)));
    }

    #[test]
    fn the_repruning_average_starts_from_normal_rounds() {
        let cfg = AutoflipConfig {
            q: 0.0,
            ..Default::default()
        };
        let validate = |_: &ModelState| Ok(crate::train::Eval::default());
        let (mut s, mut global, _) = explore_once(cfg, &validate);
        assert!(s.ema.is_empty(), "the exploration's Δ² does not seed it");
        let ctx = RoundContext {
            rounds: 5,
            validate: &validate,
        };
        let c = |v: f32| Contribution {
            client: 0,
            samples: 10,
            kind: UploadKind::Delta,
            values: vec![v; 22],
            metrics: Default::default(),
            encoding: Default::default(),
        };
        s.aggregate(2, &mut global, &[c(0.1)], &ctx).unwrap();
        assert!(s.ema.iter().all(|e| (e - 0.01).abs() < 1e-7), "{:?}", s.ema);
        s.aggregate(3, &mut global, &[c(0.0)], &ctx).unwrap();
        assert!(
            s.ema.iter().all(|e| (e - 0.009).abs() < 1e-7),
            "β = 0.9: {:?}",
            s.ema
        );
    }

    fn explore_once(
        cfg: AutoflipConfig,
        validate: &dyn Fn(&ModelState) -> Result<crate::train::Eval, String>,
    ) -> (AutoFlip, ModelState, RoundOutcome) {
        try_explore_once(cfg, validate).unwrap()
    }

    fn try_explore_once(
        cfg: AutoflipConfig,
        validate: &dyn Fn(&ModelState) -> Result<crate::train::Eval, String>,
    ) -> Result<(AutoFlip, ModelState, RoundOutcome), String> {
        let arch = Arch {
            input: [1, 2, 5],
            classes: 2,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 10,
                    units: 2,
                },
            ],
        };
        let mut s = AutoFlip::new(StrategyConfig::default(), cfg).unwrap();
        let mut global = ModelState::init(arch, 1);
        let clients = [ClientView { id: 0, samples: 10 }];
        let mut rng = rand::SeedableRng::seed_from_u64(1);
        s.configure_round(1, &global, &clients, &mut rng);
        let values: Vec<f32> = (0..22).map(|i| i as f32 * 0.01).collect();
        let c = Contribution {
            client: 0,
            samples: 10,
            kind: UploadKind::Delta,
            values,
            metrics: Default::default(),
            encoding: Default::default(),
        };
        let ctx = RoundContext {
            rounds: 5,
            validate,
        };
        let out = s.aggregate(1, &mut global, &[c], &ctx)?;
        Ok((s, global, out))
    }

    #[test]
    fn automatic_q_refuses_to_choose_without_validation() {
        let mut cfg = AutoflipConfig::default();
        cfg.auto_q = true;
        assert!(
            AutoFlip::new(StrategyConfig::default(), cfg.clone())
                .unwrap()
                .needs_validation()
        );
        // No evidence (the server's split is empty): an error, not 90% pruning on equal zeros.
        let none = |_: &ModelState| Err("the server's validation split is empty".to_string());
        let e = try_explore_once(cfg.clone(), &none)
            .err()
            .expect("no q chosen");
        assert!(e.contains("cannot choose q") && e.contains("empty"), "{e}");
        // A fixed q needs no validation.
        cfg.auto_q = false;
        assert!(
            !AutoFlip::new(StrategyConfig::default(), cfg.clone())
                .unwrap()
                .needs_validation()
        );
        let (_, global, out) = explore_once(cfg, &none);
        assert_eq!(out.metrics["q"], 0.3);
        assert!((global.sparsity() - 0.3).abs() < 0.05);
    }

    #[test]
    fn automatic_q_is_the_largest_within_tolerance() {
        let mut cfg = AutoflipConfig::default();
        cfg.auto_q = true;
        cfg.q_tolerance = 0.35;
        // Validation loss grows with sparsity: 1 + sparsity. Within 35% of the dense loss: q ≤ 0.3.
        let validate = |m: &ModelState| {
            Ok(crate::train::Eval {
                loss: 1.0 + m.sparsity() as f32,
                ..Default::default()
            })
        };
        let (_, global, out) = explore_once(cfg.clone(), &validate);
        assert_eq!(out.metrics["q_auto"], 0.3);
        assert!(
            (global.sparsity() - 0.3).abs() < 0.05,
            "{}",
            global.sparsity()
        );
        // When every q costs too much, nothing is pruned.
        cfg.q_tolerance = 0.01;
        let (_, global, out) = explore_once(cfg, &validate);
        assert_eq!(out.metrics["q_auto"], 0.0);
        assert_eq!(global.sparsity(), 0.0);
    }

    #[test]
    fn repruning_raises_sparsity_towards_the_target() {
        let mut cfg = AutoflipConfig::default();
        cfg.q = 0.2;
        cfg.reprune_every = 1;
        cfg.target_sparsity = 0.6;
        let validate = |_: &ModelState| Ok(crate::train::Eval::default());
        let (mut s, mut global, _) = explore_once(cfg, &validate);
        let before = global.mask.clone().unwrap();
        assert!((global.sparsity() - 0.2).abs() < 0.05);
        let ctx = RoundContext {
            rounds: 5,
            validate: &validate,
        };
        let c = Contribution {
            client: 0,
            samples: 10,
            kind: UploadKind::Delta,
            values: (0..22).map(|i| 0.01 * (22 - i) as f32).collect(),
            metrics: Default::default(),
            encoding: Default::default(),
        };
        let out = s
            .aggregate(2, &mut global, std::slice::from_ref(&c), &ctx)
            .unwrap();
        assert_eq!(out.metrics["repruned"], 1.0);
        let after = global.mask.clone().unwrap();
        // A quarter of the way from 0.2 to 0.6 after one of four remaining rounds.
        assert!(
            (global.sparsity() - 0.3).abs() < 0.05,
            "{}",
            global.sparsity()
        );
        assert!(
            before.iter().zip(&after).all(|(b, a)| *b || !*a),
            "pruned weights stay pruned"
        );
        assert_eq!(global.mask_version, 2);
        for r in 3..=5 {
            s.aggregate(r, &mut global, std::slice::from_ref(&c), &ctx)
                .unwrap();
        }
        assert!(
            (global.sparsity() - 0.6).abs() < 0.05,
            "{}",
            global.sparsity()
        );
    }

    #[test]
    fn masked_momentum_keeps_pruned_weights_at_zero() {
        let mut cfg = AutoflipConfig::default();
        cfg.q = 0.5;
        let mut s = AutoFlip::new(StrategyConfig::default(), cfg).unwrap();
        let mut global = ModelState::init(arch(), 1);
        let clients: Vec<ClientView> = (0..2).map(|id| ClientView { id, samples: 10 }).collect();
        let mut rng = rand::SeedableRng::seed_from_u64(1);
        let plan = s.configure_round(1, &global, &clients, &mut rng);
        assert_eq!(plan.phase, Phase::Own("exploring".into()));
        assert_eq!(plan.fold, Some(FOLD), "exploration streams too");
        let tasks = plan.tasks;
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks[0].1.train.epochs, 20);
        let contrib = |client, v: [f32; 6]| Contribution {
            client,
            samples: 10,
            kind: UploadKind::Delta,
            values: v.to_vec(),
            metrics: Default::default(),
            encoding: Default::default(),
        };
        let validate = |_: &ModelState| Ok(crate::train::Eval::default());
        let ctx = RoundContext {
            rounds: 5,
            validate: &validate,
        };
        let r = [
            contrib(0, [1.0, 0.0, 2.0, 0.0, 0.5, 0.1]),
            contrib(1, [1.0, 0.0, 0.0, 2.0, 0.5, 0.3]),
        ];
        let out = s.aggregate(1, &mut global, &r, &ctx).unwrap();
        assert_eq!(out.metrics["sparsity"], 0.5);
        let mask = global.mask.clone().unwrap();
        assert_eq!(mask.iter().filter(|k| !**k).count(), 3);
        assert!(
            global
                .params
                .iter()
                .zip(&mask)
                .all(|(p, k)| *k || *p == 0.0)
        );
        // A training round: the pruned entries stay zero after the server's momentum step.
        let plan = s.configure_round(2, &global, &clients, &mut rng);
        assert_eq!(plan.phase, Phase::Training);
        let tasks = plan.tasks;
        assert!(matches!(
            tasks[0].1.upload,
            UploadSpec::Sparse { int8: true, .. }
        ));
        let r = [contrib(0, [0.1; 6]), contrib(1, [0.2; 6])];
        s.aggregate(2, &mut global, &r, &ctx).unwrap();
        assert!(
            global
                .params
                .iter()
                .zip(&mask)
                .all(|(p, k)| *k || *p == 0.0)
        );
    }
}
