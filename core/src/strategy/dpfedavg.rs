//! DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
//! Language Models", ICLR 2018), user-level: each sampled client's update is clipped to L2 norm
//! C, the clipped updates are summed with one vote each, Gaussian noise of standard deviation
//! z·C is added to the sum, and the global model moves by the noisy sum over the number of
//! clients sampled (a fixed denominator: a client that drops out adds zero, not a smaller
//! count). ε for the configured δ is reported every round from the RDP accountant of the
//! sampled Gaussian mechanism ([`crate::aggregate::privacy`]), with q the round's sampled over
//! idle clients, as TensorFlow Privacy and Opacus account (they assume Poisson sampling; rounds
//! here sample a fixed number, the usual approximation).
//!
//! Clipping happens where the settings say, as Flower offers both: `server` (tabs upload plain
//! deltas and the server's fold clips them) or `client` (tasks ask for deltas clipped to C, and
//! a larger one is refused as malformed; the fold clips again, which changes nothing for an
//! honest tab). Both stream: the clip and the one vote each are part of the running sum's fold.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::{
    ClientView, Contribution, Fold, RoundContext, RoundOutcome, RoundPlan, RunningSum, Settings,
    Strategy, StrategyConfig, UploadKind, aggregate_folded, parse_settings, plain_round,
};
use crate::aggregate::privacy::Accountant;
use crate::aggregate::robust::{RobustConfig, Rule};
use crate::metric_keys as keys;
use crate::model::state::ModelState;
use crate::protocol::UploadSpec;

/// Where updates are clipped to C.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Clipping {
    Server,
    Client,
}

/// `[strategy.dpfedavg]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DpConfig {
    /// C: the L2 norm every update is clipped to.
    pub clip: f32,
    /// z: the noise's standard deviation is z·C (on the sum of clipped updates).
    pub noise: f32,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    pub clipping: Clipping,
    /// Seeds the noise (for reproducible comparisons). Without one the noise comes from the
    /// operating system's generator, so nobody who reads the config can subtract it.
    pub noise_seed: Option<u64>,
}

impl Default for DpConfig {
    fn default() -> Self {
        DpConfig {
            clip: 1.0,
            noise: 1.0,
            delta: 1e-5,
            clipping: Clipping::Server,
            noise_seed: None,
        }
    }
}

pub struct DpFedAvg {
    config: StrategyConfig,
    own: DpConfig,
    accountant: Accountant,
    /// This round's sampled clients and sampling rate (set when it is configured).
    sampled: usize,
    rate: f64,
}

impl DpFedAvg {
    pub fn new(config: StrategyConfig, own: DpConfig) -> Self {
        DpFedAvg {
            config,
            own,
            accountant: Accountant::default(),
            sampled: 0,
            rate: 0.0,
        }
    }

    fn fold(&self) -> Fold {
        Fold {
            clip: Some(self.own.clip),
            uniform: true,
            ..Fold::PLAIN
        }
    }

    /// Gaussian noise of standard deviation z·C, one draw per coordinate of a sum, in order
    /// (drawn as the step uses it: no model-sized buffer).
    fn noise(&self, round: u32) -> impl Iterator<Item = f64> {
        let sd = (self.own.noise * self.own.clip) as f64;
        let normal = Normal::new(0.0, sd).expect("a finite standard deviation");
        let rng: StdRng = match self.own.noise_seed {
            Some(seed) => StdRng::seed_from_u64(seed ^ ((round as u64) << 32)),
            None => rand::make_rng(),
        };
        normal.sample_iter(rng)
    }
}

pub fn build(
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    let own: DpConfig = parse_settings("dpfedavg", settings)?;
    if !(own.clip > 0.0 && own.clip.is_finite()) {
        return Err("[strategy.dpfedavg]: clip must be > 0".into());
    }
    if !(own.noise >= 0.0 && own.noise.is_finite()) {
        return Err("[strategy.dpfedavg]: noise must be ≥ 0".into());
    }
    if !(own.delta > 0.0 && own.delta < 1.0) {
        return Err("[strategy.dpfedavg]: delta must be in (0, 1)".into());
    }
    Ok(Box::new(DpFedAvg::new(config, own)))
}

impl Strategy for DpFedAvg {
    /// The accountant counts rounds of clients sampled at rate q; a buffered run has neither.
    fn check_buffered(&self) -> Result<(), String> {
        Err("its privacy accountant counts rounds of clients sampled at a known rate, which a buffered run does not have (asynchronous DP is not built)".into())
    }

    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> RoundPlan {
        let upload = match self.own.clipping {
            Clipping::Server => UploadSpec::Delta,
            Clipping::Client => UploadSpec::ClippedDelta {
                norm: self.own.clip,
            },
        };
        let tasks = plain_round(round, global, &self.config, clients, rng, upload);
        self.sampled = tasks.len();
        self.rate = tasks.len() as f64 / clients.len().max(1) as f64;
        RoundPlan::streamed(tasks, self.fold())
    }

    fn aggregate(
        &mut self,
        round: u32,
        global: &mut ModelState,
        results: &[Contribution],
        ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        aggregate_folded(self, self.fold(), round, global, results, ctx)
    }

    fn aggregate_sum(
        &mut self,
        round: u32,
        global: &mut ModelState,
        sum: &RunningSum,
        results: &[Contribution],
        _ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        if results.iter().any(|c| c.kind != UploadKind::Delta) {
            return Err("dpfedavg expects deltas".into());
        }
        if sum.fold.clip != Some(self.own.clip) || !sum.fold.uniform {
            return Err(
                "dpfedavg: the round's sums were not clipped to C with one vote each".into(),
            );
        }
        if sum.len() != global.params.len() {
            return Err(format!(
                "{} values for a model of {}",
                sum.len(),
                global.params.len()
            ));
        }
        // A resumed round may not have been configured by this process.
        let m = self.sampled.max(sum.count as usize).max(1) as f64;
        let lr = self.config.server_lr as f64;
        let noise = self.noise(round);
        for ((x, s), n) in global.params.iter_mut().zip(&sum.weighted).zip(noise) {
            *x += (lr * (s + n) / m) as f32;
        }
        self.accountant.add(self.rate, self.own.noise as f64, 1);
        let mut outcome = RoundOutcome::default();
        let m = &mut outcome.metrics;
        // Without noise there is no guarantee to report (ε would be infinite).
        let eps = self.accountant.epsilon(self.own.delta);
        if eps.is_finite() {
            m.insert(keys::DP_EPSILON.into(), eps);
        }
        m.insert(keys::DP_DELTA.into(), self.own.delta);
        m.insert(keys::DP_NOISE.into(), self.own.noise as f64);
        m.insert(keys::DP_CLIP.into(), self.own.clip as f64);
        m.insert(keys::DP_SAMPLING_RATE.into(), self.rate);
        Ok(outcome)
    }

    /// The guarantee is for a sum of clipped updates: a rule that drops or reorders values per
    /// coordinate (trimmed mean, median, multi-Krum) is a different mechanism, not accounted for.
    fn check_robust(&self, robust: &RobustConfig) -> Result<(), String> {
        if robust.rule != Rule::Mean {
            return Err(format!(
                "dpfedavg accounts for a sum of clipped updates: set [aggregation] rule = \"mean\" \
                 (it is {:?}); the clip at C = {} is the defence, no tab moves the sum by more",
                robust.rule, self.own.clip
            ));
        }
        Ok(())
    }

    fn save_state(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.accountant).expect("encoding")
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.accountant =
            postcard::from_bytes(bytes).map_err(|e| format!("dpfedavg state: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::privacy;
    use crate::model::arch::Arch;

    fn dp(noise: f32, clipping: Clipping) -> DpFedAvg {
        let own = DpConfig {
            clip: 0.5,
            noise,
            delta: 1e-5,
            clipping,
            noise_seed: Some(9),
        };
        DpFedAvg::new(StrategyConfig::default(), own)
    }

    fn contribution(client: u64, samples: u64, values: Vec<f32>) -> Contribution {
        Contribution {
            client,
            samples,
            kind: UploadKind::Delta,
            values,
            metrics: Default::default(),
            encoding: Default::default(),
        }
    }

    fn ctx_validate(_: &ModelState) -> Result<crate::train::Eval, String> {
        Err("no validation".into())
    }

    fn setup(s: &mut DpFedAvg, sampled: usize, of: usize) -> ModelState {
        let global = ModelState::init(Arch::preset("mlp", [1, 2, 2], 2).unwrap(), 1);
        let clients: Vec<ClientView> = (0..of as u64)
            .map(|id| ClientView { id, samples: 10 })
            .collect();
        s.config.fraction = sampled as f64 / of as f64;
        let plan = s.configure_round(1, &global, &clients, &mut StdRng::seed_from_u64(1));
        assert_eq!(plan.tasks.len(), sampled);
        global
    }

    #[test]
    fn without_noise_the_step_is_the_clipped_sum_over_the_clients_sampled() {
        let mut s = dp(0.0, Clipping::Server);
        let mut global = setup(&mut s, 4, 8);
        let n = global.params.len();
        let start = global.params.clone();
        // One big update (norm 10, clipped to 0.5), one small (norm 0.1, kept), whatever
        // samples they claim; two sampled clients sent nothing.
        let mut big = vec![0.0; n];
        big[0] = 6.0;
        big[1] = 8.0;
        let mut small = vec![0.0; n];
        small[2] = 0.1;
        let results = [contribution(0, 1000, big), contribution(1, 1, small)];
        let ctx = RoundContext {
            rounds: 1,
            validate: &ctx_validate,
        };
        let out = s.aggregate(1, &mut global, &results, &ctx).unwrap();
        let want = [0.3 / 4.0, 0.4 / 4.0, 0.1 / 4.0];
        for (i, (x, x0)) in global.params.iter().zip(&start).enumerate() {
            let d = x - x0;
            let w = want.get(i).copied().unwrap_or(0.0);
            assert!((d - w).abs() < 1e-6, "coordinate {i}: {d} vs {w}");
        }
        // Zero noise: no privacy, and no ε reported.
        assert!(!out.metrics.contains_key(keys::DP_EPSILON));
        assert_eq!(out.metrics[keys::DP_SAMPLING_RATE], 0.5);
    }

    #[test]
    fn the_noise_has_standard_deviation_z_times_c_and_epsilon_is_the_accountants() {
        let mut s = dp(2.0, Clipping::Server);
        let mut global = setup(&mut s, 2, 10);
        let start = global.params.clone();
        let zero = vec![0.0; global.params.len()];
        let results = [contribution(0, 5, zero.clone()), contribution(1, 5, zero)];
        let ctx = RoundContext {
            rounds: 1,
            validate: &ctx_validate,
        };
        let out = s.aggregate(1, &mut global, &results, &ctx).unwrap();
        // Only noise moved the model: (x − x₀)·m ~ N(0, (zC)²) = N(0, 1).
        let d: Vec<f64> = global
            .params
            .iter()
            .zip(&start)
            .map(|(a, b)| (a - b) as f64 * 2.0)
            .collect();
        let var = d.iter().map(|v| v * v).sum::<f64>() / d.len() as f64;
        assert!(d.len() > 10);
        assert!((0.5..1.6).contains(&var), "variance {var} over {}", d.len());
        let mut a = privacy::Accountant::default();
        a.add(0.2, 2.0, 1);
        assert!((out.metrics[keys::DP_EPSILON] - a.epsilon(1e-5)).abs() < 1e-12);
        // The accountant is saved with the checkpoint.
        let mut t = dp(2.0, Clipping::Server);
        t.load_state(&s.save_state()).unwrap();
        assert_eq!(t.accountant, s.accountant);
    }

    #[test]
    fn client_clipping_asks_tabs_for_clipped_deltas_and_only_the_mean_is_allowed() {
        let mut s = dp(1.0, Clipping::Client);
        let global = ModelState::init(Arch::preset("mlp", [1, 2, 2], 2).unwrap(), 1);
        let clients = [ClientView { id: 0, samples: 4 }];
        let plan = s.configure_round(1, &global, &clients, &mut StdRng::seed_from_u64(1));
        assert_eq!(
            plan.tasks[0].1.upload,
            UploadSpec::ClippedDelta { norm: 0.5 }
        );
        assert_eq!(plan.fold.unwrap().clip, Some(0.5));
        assert!(s.check_robust(&RobustConfig::default()).is_err());
        assert!(s.check_robust(&RobustConfig::plain()).is_ok());
    }
}
