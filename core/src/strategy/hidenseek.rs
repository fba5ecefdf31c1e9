//! HideNseek (METHODS.md, section 3): the server prunes θ₀ once, before any training and with no
//! data, by SynFlow; clients never change a weight's magnitude and learn only its sign (a sign
//! supermask: real-valued scores, sign in the forward pass, straight-through backward), keeping
//! their own scores between rounds; they upload one bit per surviving weight (or only the flips
//! against the global signs, when fewer), and the server takes a sample-weighted majority vote.
//!
//! The same machinery with a keep-bit instead of a sign is the binary-supermask baseline
//! (`supermask`, the FedPM family the paper compares against): weight = θ₀ × bit over the whole
//! network, one bit per weight up, majority vote.
//!
//! θ₀ never travels: both sides regenerate it from the run's seed (`ModelState::init`), so a task
//! carries the seed, the mask once, and the global bits.

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{
    ClientView, Contribution, Fold, RoundContext, RoundOutcome, RoundPlan, RunningSum, Settings,
    Strategy, StrategyConfig, UploadKind, aggregate_folded, parse_settings, plain_round,
};
use crate::codec::supermask::bit_of_weight;
use crate::codec::{compact, encode_supermask};
use crate::metric_keys as keys;
use crate::model::state::ModelState;
use crate::model::synflow::{layer_density, synflow_mask};
use crate::protocol::{SupermaskKind, UploadSpec};
use crate::train::Optimizer;
use crate::train::step::{Learn, Personal};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SupermaskConfig {
    /// Fraction of the weights SynFlow keeps (biases are always kept); 1 prunes nothing.
    pub density: f64,
    /// SynFlow's scoring rounds on its exponential schedule (SynFlow: 100).
    pub synflow_iters: u32,
    /// Learning rate and optimizer of the clients' scores (they replace `[strategy]`'s).
    pub score_lr: f64,
    pub score_optimizer: Optimizer,
    /// What clients' scores keep between rounds (personalisation): `"own_plus_global"` (their
    /// own scores plus the global sign at |θ₀|), `"own"` (their own, signs included),
    /// `"magnitudes"` (their magnitudes with the global signs: the model stays the global one)
    /// or `"none"` (|θ₀| with the global signs every round). See [`Personal`].
    pub personal_scores: Personal,
    /// Memory of the vote across rounds: the server keeps t ← β·t + (1−β)·(weighted mean vote)
    /// per entry and sets each bit by the sign of t. 0 is the plain majority vote (the paper);
    /// with non-IID clients chance majorities then flip many bits every round.
    pub vote_momentum: f32,
    /// What a client's bits say and how the server reads them: `"signs"` (each client's signs,
    /// a majority vote: the paper) or `"steps"` (each client's score moves, stochastically
    /// rounded to a bit, summed into the server's own scores: see [`Vote`]).
    pub vote: Vote,
    /// `"steps"`: how far one round's mean step (in [−1, 1]) moves the server's score of an
    /// entry, which starts at ±1 (so 1 lets a unanimous round flip a bit).
    pub step_size: f32,
    /// `"steps"`: the server's scores stay in [−limit, limit], so no bit is held by more than
    /// limit / step_size rounds of unanimous votes against it.
    pub step_limit: f32,
    /// `"steps"`: clients leave out each output unit's mean move before rounding (see
    /// `codec::supermask::step_bits`).
    pub step_center: bool,
    /// `"steps"`: a move of this many times the tensor's root-mean-square move gives a sure
    /// bit, smaller ones a proportionally weighted coin; 0 rounds against the largest move
    /// (unbiased, but most bits are then near coin tosses).
    pub step_sure_at: f32,
}

/// How the server turns the round's bits into the global ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Vote {
    /// Each client sends its model's bits; the sample-weighted majority wins (ties keep the
    /// previous bit). Every client votes on every bit with the same weight, however little it
    /// cared: under non-IID data the many clients without a class vote its output weights
    /// down.
    Signs,
    /// Each client sends which way this task moved each score (less each output unit's mean
    /// move, with `step_center`), as a bit drawn with probability ½ + ½·move / s, s being
    /// `step_sure_at` root-mean-square moves of its tensor (clamped to a sure bit beyond): an
    /// expectation proportional to the move, so an entry the client barely moved is a coin
    /// toss that cancels out, and the clients that learned most about an entry decide it
    /// (FedAvg's weighting by how far each client moved, in one bit). The server adds
    /// step_size × the round's mean to its own score of each entry (kept in [−step_limit,
    /// step_limit]) and takes its sign: a memory, so a bit flips only when the moves against
    /// it add up. Learns a global mask under non-IID data where signs do not (book page
    /// "HideNseek"); starts slower on IID data.
    Steps,
}

impl SupermaskConfig {
    fn hidenseek() -> Self {
        SupermaskConfig {
            density: 0.5,
            synflow_iters: 100,
            score_lr: 0.01,
            score_optimizer: Optimizer::Adam,
            personal_scores: Personal::OwnPlusGlobal,
            vote_momentum: 0.0,
            vote: Vote::Signs,
            step_size: 0.5,
            step_limit: 2.0,
            step_center: true,
            step_sure_at: 2.0,
        }
    }
}

/// HideNseek's defaults.
impl Default for SupermaskConfig {
    fn default() -> Self {
        Self::hidenseek()
    }
}

/// The binary supermask's defaults: the whole network (no pruning at init).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub(super) struct BinaryConfig(SupermaskConfig);

impl Default for BinaryConfig {
    fn default() -> Self {
        BinaryConfig(SupermaskConfig {
            density: 1.0,
            ..SupermaskConfig::hidenseek()
        })
    }
}

pub struct Supermask {
    config: StrategyConfig,
    settings: SupermaskConfig,
    kind: SupermaskKind,
    /// SynFlow's mask, computed for the first round and installed at its aggregation.
    pending_mask: Option<Vec<bool>>,
    /// The vote's memory per entry (see `vote_momentum`).
    tally: Vec<f32>,
}

impl Supermask {
    pub fn new(
        config: StrategyConfig,
        settings: SupermaskConfig,
        kind: SupermaskKind,
    ) -> Result<Self, String> {
        if !(settings.density > 0.0 && settings.density <= 1.0) {
            return Err("density must lie in (0, 1]".into());
        }
        if !(settings.score_lr > 0.0) {
            return Err("score_lr must be positive".into());
        }
        if !(0.0..1.0).contains(&settings.vote_momentum) {
            return Err("vote_momentum must lie in [0, 1)".into());
        }
        if settings.vote == Vote::Steps {
            if settings.vote_momentum > 0.0 {
                return Err("vote_momentum is for vote = \"signs\"; \"steps\" keeps its own memory (step_size, step_limit)".into());
            }
            if !(settings.step_size > 0.0 && settings.step_limit >= 1.0) {
                return Err("step_size must be positive and step_limit at least 1".into());
            }
            if !(settings.step_sure_at >= 0.0 && settings.step_sure_at.is_finite()) {
                return Err("step_sure_at must be 0 or positive".into());
            }
        }
        Ok(Supermask {
            config,
            settings,
            kind,
            pending_mask: None,
            tally: Vec::new(),
        })
    }

    /// θ₀: the same numbers the clients regenerate from the seed.
    fn theta0(&self, global: &ModelState) -> Vec<f32> {
        ModelState::init(global.arch.clone(), self.config.seed).params
    }

    /// The model of the first round: θ₀ under SynFlow's mask.
    fn initial(&mut self, global: &ModelState) -> ModelState {
        let theta0 = self.theta0(global);
        let mask = match self.pending_mask.clone() {
            Some(m) => m,
            None => synflow_mask(
                &global.arch,
                &theta0,
                self.settings.density,
                self.settings.synflow_iters,
                &burn::tensor::Device::flex(),
            ),
        };
        self.pending_mask = Some(mask.clone());
        let mut m = global.clone();
        m.params = theta0;
        m.set_mask(mask);
        m
    }

    /// The vote's memory (`vote_momentum`, or the server's scores of `"steps"`): each entry's
    /// tally starts at ±1 from its bit, takes `update(tally, the round's sample-weighted mean
    /// vote)`, and its sign is the new bit.
    fn remember(
        &mut self,
        previous: &[bool],
        sum: &RunningSum,
        update: impl Fn(f32, f32) -> f32,
    ) -> Vec<bool> {
        if self.tally.len() != previous.len() {
            self.tally = previous
                .iter()
                .map(|b| if *b { 1.0 } else { -1.0 })
                .collect();
        }
        let total = sum.weight.max(1.0);
        for (i, t) in self.tally.iter_mut().enumerate() {
            *t = update(*t, (sum.weighted[i] / total) as f32);
        }
        self.tally
            .iter()
            .zip(previous)
            .map(|(t, p)| sign_or(*t, *p))
            .collect()
    }
}

/// The bit a tally stands for: its sign, a tie keeping the previous bit.
fn sign_or(tally: impl Into<f64>, previous: bool) -> bool {
    let t = tally.into();
    if t == 0.0 { previous } else { t > 0.0 }
}

pub fn build_hidenseek(
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    Ok(Box::new(Supermask::new(
        config,
        parse_settings("hidenseek", settings)?,
        SupermaskKind::Sign,
    )?))
}

pub fn build_binary(
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    let BinaryConfig(s) = parse_settings("supermask", settings)?;
    Ok(Box::new(Supermask::new(config, s, SupermaskKind::Keep)?))
}

impl Strategy for Supermask {
    fn save_state(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.tally).expect("encoding")
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.tally = postcard::from_bytes(bytes).map_err(|e| format!("supermask state: {e}"))?;
        Ok(())
    }

    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> RoundPlan {
        let model = if global.mask.is_none() {
            self.initial(global)
        } else {
            global.clone()
        };
        let payload = std::sync::Arc::new(encode_supermask(&model, self.config.seed, self.kind));
        let upload = match self.settings.vote {
            Vote::Signs => UploadSpec::Supermask { kind: self.kind },
            Vote::Steps => UploadSpec::ScoreSteps {
                kind: self.kind,
                center: self.settings.step_center,
                sure_at: self.settings.step_sure_at,
            },
        };
        let mut tasks = plain_round(round, &model, &self.config, clients, rng, upload);
        for (_, t) in &mut tasks {
            t.model = payload.clone();
            t.train.step.learn = Learn::Scores {
                personal: self.settings.personal_scores,
            };
            t.train.lr = self.settings.score_lr;
            t.train.optimizer = self.settings.score_optimizer.clone();
        }
        // The vote is a sample-weighted sum of ±1 per entry: a running sum (exact, being
        // integers).
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
        if results.iter().any(|c| c.kind != UploadKind::Votes) {
            return Err("supermask strategies expect votes".into());
        }
        let mut outcome = RoundOutcome::default();
        if global.mask.is_none() {
            *global = self.initial(global);
            self.pending_mask = None;
            for (name, d) in layer_density(&global.arch, global.mask.as_deref().expect("installed"))
            {
                outcome.metrics.insert(keys::tensor_density(&name), d);
            }
        }
        let mask = global.mask.clone().expect("installed");
        let theta0 = self.theta0(global);
        let previous: Vec<bool> = global
            .params
            .iter()
            .map(|w| bit_of_weight(self.kind, *w))
            .collect();
        if sum.len() != previous.len() {
            return Err(format!(
                "{} votes for a model of {} entries",
                sum.len(),
                previous.len()
            ));
        }
        let next: Vec<bool> = if self.settings.vote == Vote::Steps {
            let (eta, limit) = (self.settings.step_size, self.settings.step_limit);
            self.remember(&previous, sum, |t, mean| {
                (t + eta * mean).clamp(-limit, limit)
            })
        } else if self.settings.vote_momentum > 0.0 {
            let beta = self.settings.vote_momentum;
            self.remember(&previous, sum, |t, mean| beta * t + (1.0 - beta) * mean)
        } else {
            // Sample-weighted majority per entry.
            sum.weighted
                .iter()
                .zip(&previous)
                .map(|(s, p)| sign_or(*s, *p))
                .collect()
        };
        let kept = mask.iter().filter(|k| **k).count();
        let changed = (0..next.len())
            .filter(|&i| mask[i] && next[i] != previous[i])
            .count();
        let kept_bits: Vec<bool> = next
            .iter()
            .zip(&mask)
            .filter(|(_, k)| **k)
            .map(|(b, _)| *b)
            .collect();
        global.params =
            crate::codec::supermask::effective(self.kind, &theta0, Some(&mask), &kept_bits);
        let weights: usize = global
            .arch
            .params()
            .iter()
            .filter(|p| p.name.ends_with(".weight"))
            .map(|p| p.len)
            .sum();
        let kept_weights: usize = global
            .arch
            .params()
            .iter()
            .filter(|p| p.name.ends_with(".weight"))
            .map(|p| {
                mask[p.offset..p.offset + p.len]
                    .iter()
                    .filter(|k| **k)
                    .count()
            })
            .sum();
        for p in global.arch.params() {
            let kept: Vec<f32> = (p.offset..p.offset + p.len)
                .filter(|&i| mask[i])
                .map(|i| global.params[i])
                .collect();
            let positive = kept.iter().filter(|w| **w > 0.0).count();
            outcome.metrics.insert(
                keys::tensor_positive(&p.name),
                positive as f64 / kept.len().max(1) as f64,
            );
        }
        let payload: u64 = results.iter().map(|c| c.encoding.payload_bytes).sum();
        let (flips, tensors): (u32, u32) = results.iter().fold((0, 0), |(f, t), c| {
            (f + c.encoding.flip_tensors, t + c.encoding.tensors)
        });
        outcome.metrics.insert(
            keys::DENSITY.into(),
            kept_weights as f64 / weights.max(1) as f64,
        );
        outcome.metrics.insert(
            keys::UPLOAD_BITS_PER_WEIGHT.into(),
            8.0 * payload as f64 / (results.len() * kept).max(1) as f64,
        );
        outcome.metrics.insert(
            keys::FLIP_TENSORS.into(),
            flips as f64 / tensors.max(1) as f64,
        );
        outcome.metrics.insert(
            keys::BITS_CHANGED.into(),
            changed as f64 / kept.max(1) as f64,
        );
        if self.kind == SupermaskKind::Keep {
            let on = compact(&global.params, Some(&mask))
                .iter()
                .filter(|w| **w != 0.0)
                .count();
            outcome
                .metrics
                .insert(keys::MASK_ON.into(), on as f64 / kept.max(1) as f64);
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::supermask::{Encoding, bits_of_weights};
    use crate::model::arch::Arch;

    /// The tasks of round 1 for three clients of 10 samples each.
    fn first_round(s: &mut Supermask, global: &ModelState) -> Vec<(u64, crate::protocol::Task)> {
        let clients: Vec<ClientView> = (0..3).map(|id| ClientView { id, samples: 10 }).collect();
        s.configure_round(
            1,
            global,
            &clients,
            &mut rand::SeedableRng::seed_from_u64(1),
        )
        .tasks
    }

    #[test]
    fn first_round_prunes_by_synflow_and_votes_set_the_signs() {
        let arch = Arch::preset("mlp", [1, 4, 4], 3).unwrap();
        let config = StrategyConfig {
            seed: 7,
            ..Default::default()
        };
        let mut s = Supermask::new(
            config,
            SupermaskConfig {
                density: 0.3,
                synflow_iters: 10,
                ..Default::default()
            },
            SupermaskKind::Sign,
        )
        .unwrap();
        let mut global = ModelState::init(arch, 7);
        let tasks = first_round(&mut s, &global);
        assert_eq!(tasks.len(), 3);
        assert_eq!(
            tasks[0].1.train.step.learn,
            Learn::Scores {
                personal: Personal::OwnPlusGlobal
            }
        );
        assert!(matches!(
            tasks[0].1.upload,
            UploadSpec::Supermask {
                kind: SupermaskKind::Sign
            }
        ));
        // Every client votes "flip entry 0 negative"; two of three vote "+" elsewhere.
        let theta0 = ModelState::init(global.arch.clone(), 7).params;
        let vote = |sign: f32| -> Vec<f32> { theta0.iter().map(|_| sign).collect() };
        let c = |client, v: Vec<f32>| Contribution {
            client,
            samples: 10,
            kind: UploadKind::Votes,
            values: v,
            metrics: Default::default(),
            encoding: Encoding::default(),
        };
        let validate = |_: &ModelState| Ok(crate::train::Eval::default());
        let ctx = RoundContext {
            rounds: 5,
            validate: &validate,
        };
        let out = s
            .aggregate(
                1,
                &mut global,
                &[c(0, vote(1.0)), c(1, vote(1.0)), c(2, vote(-1.0))],
                &ctx,
            )
            .unwrap();
        let mask = global.mask.clone().unwrap();
        assert!(
            (out.metrics[keys::DENSITY] - 0.3).abs() < 0.01,
            "{}",
            out.metrics[keys::DENSITY]
        );
        for i in 0..theta0.len() {
            let expect = if mask[i] { theta0[i].abs() } else { 0.0 };
            assert_eq!(
                global.params[i], expect,
                "entry {i}: magnitudes are θ₀'s, signs the vote's"
            );
        }
    }

    #[test]
    fn steps_move_the_servers_scores_within_their_limit() {
        let arch = Arch::preset("mlp", [1, 2, 2], 2).unwrap();
        let config = StrategyConfig {
            seed: 3,
            ..Default::default()
        };
        let settings = SupermaskConfig {
            density: 1.0,
            synflow_iters: 1,
            vote: Vote::Steps,
            step_size: 0.5,
            step_limit: 2.0,
            ..Default::default()
        };
        let mut s = Supermask::new(config, settings.clone(), SupermaskKind::Sign).unwrap();
        let mut global = ModelState::init(arch, 3);
        let tasks = first_round(&mut s, &global);
        assert_eq!(
            tasks[0].1.upload,
            UploadSpec::ScoreSteps {
                kind: SupermaskKind::Sign,
                center: true,
                sure_at: 2.0
            }
        );
        let theta0 = ModelState::init(global.arch.clone(), 3).params;
        let n = theta0.len();
        let validate = |_: &ModelState| Ok(crate::train::Eval::default());
        let ctx = RoundContext {
            rounds: 30,
            validate: &validate,
        };
        let c = |client, samples, v: f32| Contribution {
            client,
            samples,
            kind: UploadKind::Votes,
            values: vec![v; n],
            metrics: Default::default(),
            encoding: Encoding::default(),
        };
        // Every entry's bit, as the sign of the model's weight (density 1: nothing pruned).
        let bits = |g: &ModelState| bits_of_weights(SupermaskKind::Sign, &g.params, None);
        let mut round = 0;
        let mut step = |s: &mut Supermask, g: &mut ModelState, votes: [(u64, f32); 3]| {
            round += 1;
            let r: Vec<Contribution> = votes
                .iter()
                .enumerate()
                .map(|(i, (n, v))| c(i as u64, *n, *v))
                .collect();
            s.aggregate(round, g, &r, &ctx).unwrap();
            bits(g)
        };
        let start: Vec<bool> = theta0.iter().map(|w| *w > 0.0).collect();
        let against = [(10, -1.0), (10, -1.0), (10, -1.0)];
        let up = [(10, 1.0), (10, 1.0), (10, 1.0)];
        // Each server score starts at ±1: unanimous steps down take a positive one to 0.5,
        // then 0 (a tie keeps the bit), then −0.5: three rounds to flip.
        assert_eq!(step(&mut s, &mut global, against), start);
        assert_eq!(step(&mut s, &mut global, against), start);
        assert!(step(&mut s, &mut global, against).iter().all(|b| !b));
        // A sample-weighted mean of zero moves nothing.
        let even = [(10, 1.0), (10, 1.0), (20, -1.0)];
        assert!(step(&mut s, &mut global, even).iter().all(|b| !b));
        // Ten rounds up, held at the limit 2: five rounds down flip it back, not twenty.
        for _ in 0..9 {
            step(&mut s, &mut global, up);
        }
        assert!(step(&mut s, &mut global, up).iter().all(|b| *b));
        for _ in 0..4 {
            assert!(step(&mut s, &mut global, against).iter().all(|b| *b));
        }
        assert!(step(&mut s, &mut global, against).iter().all(|b| !b));
        // The scores are the strategy's state: a restarted server carries on from them.
        let mut restarted = Supermask::new(
            StrategyConfig {
                seed: 3,
                ..Default::default()
            },
            settings,
            SupermaskKind::Sign,
        )
        .unwrap();
        restarted.load_state(&s.save_state()).unwrap();
        assert_eq!(restarted.tally, s.tally);
        assert!(s.tally.iter().all(|t| (*t + 0.5).abs() < 1e-6));
    }
}
