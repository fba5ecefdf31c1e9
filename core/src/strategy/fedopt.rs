//! Adaptive server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
//! Algorithm 2): FedAdagrad, FedAdam and FedYogi. Clients train with SGD at η_l (the shared
//! `[strategy] lr`) and upload deltas; the server treats the mean delta Δ as a pseudo-gradient:
//!
//! ```text
//! m ← β₁·m + (1 − β₁)·Δ
//! v ← v + Δ²                              FedAdagrad
//! v ← β₂·v + (1 − β₂)·Δ²                  FedAdam
//! v ← v − (1 − β₂)·Δ²·sign(v − Δ²)        FedYogi
//! x ← x + η·m / (√v + τ)
//! ```
//!
//! with m₋₁ = 0 and v₋₁ = τ², as the paper's algorithm states (no bias correction). They fold
//! the same running sum FedAvg does, so they stream and run across edges; m and v are saved
//! with every checkpoint.

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{
    ClientView, Contribution, Fold, RoundContext, RoundOutcome, RoundPlan, RunningSum, Settings,
    Strategy, StrategyConfig, UploadKind, aggregate_folded, parse_settings, plain_round,
};
use crate::model::state::ModelState;
use crate::protocol::UploadSpec;

/// Which second-moment rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adaptive {
    Adagrad,
    Adam,
    Yogi,
}

impl Adaptive {
    fn name(self) -> &'static str {
        match self {
            Adaptive::Adagrad => "fedadagrad",
            Adaptive::Adam => "fedadam",
            Adaptive::Yogi => "fedyogi",
        }
    }
}

/// `[strategy.fedadam]` (or `fedadagrad`, `fedyogi`): the paper's η, β₁, β₂ and τ. η_l is the
/// shared `[strategy] lr`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FedoptConfig {
    /// Server learning rate η: about how far each coordinate moves per round early on.
    pub eta: f32,
    /// First-moment decay β₁ (0: no server momentum).
    pub beta1: f32,
    /// Second-moment decay β₂ (FedAdam, FedYogi; FedAdagrad sums instead).
    pub beta2: f32,
    /// Adaptivity τ: added to √v, and v starts at τ².
    pub tau: f32,
}

impl Default for FedoptConfig {
    fn default() -> Self {
        FedoptConfig {
            eta: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

pub struct FedOpt {
    config: StrategyConfig,
    own: FedoptConfig,
    rule: Adaptive,
    moments: Moments,
}

impl FedOpt {
    pub fn new(config: StrategyConfig, own: FedoptConfig, rule: Adaptive) -> Self {
        FedOpt {
            config,
            own,
            rule,
            moments: Moments::default(),
        }
    }

    /// One server step on `x` with the pseudo-gradient `delta`.
    fn step(&mut self, x: &mut [f32], delta: &[f32]) {
        let FedoptConfig {
            eta,
            beta1,
            beta2,
            tau,
        } = self.own;
        let Moments { m, v } = &mut self.moments;
        if m.len() != x.len() {
            *m = vec![0.0; x.len()];
            *v = vec![tau * tau; x.len()];
        }
        for (((xi, mi), vi), &d) in x.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(delta) {
            *mi = beta1 * *mi + (1.0 - beta1) * d;
            let d2 = d * d;
            *vi = match self.rule {
                Adaptive::Adagrad => *vi + d2,
                Adaptive::Adam => beta2 * *vi + (1.0 - beta2) * d2,
                // sign(0) = 0: v stays where it is when it equals Δ².
                Adaptive::Yogi => *vi - (1.0 - beta2) * d2 * sign(*vi - d2),
            };
            *xi += eta * *mi / (vi.sqrt() + tau);
        }
    }
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

fn build(
    rule: Adaptive,
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    let own: FedoptConfig = parse_settings(rule.name(), settings)?;
    let unit = |x: f32| (0.0..1.0).contains(&x);
    let positive = |x: f32| x > 0.0 && x.is_finite();
    if !(positive(own.eta) && positive(own.tau)) {
        return Err(format!(
            "[strategy.{}]: eta and tau must be > 0",
            rule.name()
        ));
    }
    if !unit(own.beta1) || !unit(own.beta2) {
        return Err(format!(
            "[strategy.{}]: beta1 and beta2 must be in [0, 1)",
            rule.name()
        ));
    }
    Ok(Box::new(FedOpt::new(config, own, rule)))
}

pub fn build_adagrad(c: StrategyConfig, s: Option<&Settings>) -> Result<Box<dyn Strategy>, String> {
    build(Adaptive::Adagrad, c, s)
}

pub fn build_adam(c: StrategyConfig, s: Option<&Settings>) -> Result<Box<dyn Strategy>, String> {
    build(Adaptive::Adam, c, s)
}

pub fn build_yogi(c: StrategyConfig, s: Option<&Settings>) -> Result<Box<dyn Strategy>, String> {
    build(Adaptive::Yogi, c, s)
}

impl Strategy for FedOpt {
    /// Each task trains the model it was sent and each result is a plain update, so a buffered
    /// step is one of its rounds (the moments carry from step to step).
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
        let tasks = plain_round(round, global, &self.config, clients, rng, UploadSpec::Delta);
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
        if results.iter().any(|c| c.kind != UploadKind::Delta) {
            return Err(format!("{} expects deltas", self.rule.name()));
        }
        let delta = sum.mean()?;
        if delta.len() != global.params.len() {
            return Err(format!(
                "{} values for a model of {}",
                delta.len(),
                global.params.len()
            ));
        }
        self.step(&mut global.params, &delta);
        let mut outcome = RoundOutcome::default();
        outcome.metrics.insert(
            crate::metric_keys::SERVER_VELOCITY_NORM.into(),
            crate::aggregate::robust::l2_distance(&self.moments.m, None),
        );
        Ok(outcome)
    }

    fn save_state(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.moments).expect("encoding")
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.moments =
            postcard::from_bytes(bytes).map_err(|e| format!("{} state: {e}", self.rule.name()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(rule: Adaptive) -> FedOpt {
        let own = FedoptConfig {
            eta: 0.1,
            beta1: 0.5,
            beta2: 0.75,
            tau: 0.5,
        };
        FedOpt::new(StrategyConfig::default(), own, rule)
    }

    fn close(a: &[f32], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 2e-6, "{a:?} vs {b:?}");
        }
    }

    // Two rounds by hand, x₀ = (1, −2), Δ₀ = (0.2, −0.4), Δ₁ = (−0.1, 1.0); η = 0.1, β₁ = 0.5,
    // β₂ = 0.75, τ = 0.5, so m₋₁ = 0 and v₋₁ = 0.25.
    // Round 0: m = (0.1, −0.2); Δ² = (0.04, 0.16).
    // Round 1: m = (0.5·0.1 − 0.05, 0.5·(−0.2) + 0.5) = (0, 0.4); Δ² = (0.01, 1).
    #[test]
    fn fedadagrad_steps_as_computed_by_hand() {
        let mut s = opt(Adaptive::Adagrad);
        let mut x = vec![1.0f32, -2.0];
        s.step(&mut x, &[0.2, -0.4]);
        // v = (0.29, 0.41)
        let x0 = [
            1.0 + 0.1 * 0.1 / (0.29f64.sqrt() + 0.5),
            -2.0 - 0.1 * 0.2 / (0.41f64.sqrt() + 0.5),
        ];
        close(&x, &x0);
        s.step(&mut x, &[-0.1, 1.0]);
        // v = (0.30, 1.41), m = (0, 0.4)
        close(&x, &[x0[0], x0[1] + 0.1 * 0.4 / (1.41f64.sqrt() + 0.5)]);
    }

    #[test]
    fn fedadam_steps_as_computed_by_hand() {
        let mut s = opt(Adaptive::Adam);
        let mut x = vec![1.0f32, -2.0];
        s.step(&mut x, &[0.2, -0.4]);
        // v = 0.75·0.25 + 0.25·Δ² = (0.1975, 0.2275)
        let x0 = [
            1.0 + 0.1 * 0.1 / (0.1975f64.sqrt() + 0.5),
            -2.0 - 0.1 * 0.2 / (0.2275f64.sqrt() + 0.5),
        ];
        close(&x, &x0);
        s.step(&mut x, &[-0.1, 1.0]);
        // v = (0.75·0.1975 + 0.0025, 0.75·0.2275 + 0.25) = (0.150625, 0.420625)
        close(&x, &[x0[0], x0[1] + 0.1 * 0.4 / (0.420625f64.sqrt() + 0.5)]);
        assert!((s.moments.v[0] as f64 - 0.150625).abs() < 1e-7);
    }

    #[test]
    fn fedyogi_steps_as_computed_by_hand() {
        let mut s = opt(Adaptive::Yogi);
        let mut x = vec![1.0f32, -2.0];
        s.step(&mut x, &[0.2, -0.4]);
        // v − Δ² = (0.21, 0.09) > 0, so v = v − 0.25·Δ² = (0.24, 0.21)
        let x0 = [
            1.0 + 0.1 * 0.1 / (0.24f64.sqrt() + 0.5),
            -2.0 - 0.1 * 0.2 / (0.21f64.sqrt() + 0.5),
        ];
        close(&x, &x0);
        s.step(&mut x, &[-0.1, 1.0]);
        // v − Δ² = (0.23, −0.79): v = (0.24 − 0.0025, 0.21 + 0.25) = (0.2375, 0.46). Where Δ²
        // exceeds v, Yogi adds (1 − β₂)·Δ² without first shrinking v, as Adam would.
        close(&x, &[x0[0], x0[1] + 0.1 * 0.4 / (0.46f64.sqrt() + 0.5)]);
        assert!((s.moments.v[0] as f64 - 0.2375).abs() < 1e-7);
        assert!((s.moments.v[1] as f64 - 0.46).abs() < 1e-7);
    }

    #[test]
    fn moments_survive_a_checkpoint_and_settings_are_checked() {
        let mut a = opt(Adaptive::Adam);
        let mut x = vec![1.0f32, -2.0];
        a.step(&mut x, &[0.2, -0.4]);
        let mut b = opt(Adaptive::Adam);
        b.load_state(&a.save_state()).unwrap();
        let (mut xa, mut xb) = (x.clone(), x);
        a.step(&mut xa, &[-0.1, 1.0]);
        b.step(&mut xb, &[-0.1, 1.0]);
        assert_eq!(xa, xb);
        assert!(b.load_state(&[1, 2, 3]).is_err());
        let bad = serde_json::json!({ "beta2": 1.0 });
        assert!(build_yogi(StrategyConfig::default(), Some(&bad)).is_err());
        let typo = serde_json::json!({ "lr": 0.1 });
        let e = build_adam(StrategyConfig::default(), Some(&typo))
            .err()
            .unwrap();
        assert!(e.contains("[strategy.fedadam]"), "{e}");
    }
}
