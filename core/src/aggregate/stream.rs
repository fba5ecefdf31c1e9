//! Streaming aggregation: each accepted result is folded into the round's running sums as it
//! arrives and then dropped, so the server holds O(model) per round instead of O(clients × model).
//!
//! A strategy opts in round by round with its plan's [`crate::strategy::RoundPlan::fold`]
//! (saying which sums it needs) and [`crate::strategy::Strategy::aggregate_sum`]; a round that
//! does not is aggregated from the buffered list of results as before. The robust layer decides too: only rules that need no other update can
//! stream ([`crate::aggregate::robust::streams`]).
//!
//! [`RunningSum`] is small and serialisable, and two of them merge: an edge aggregator can send
//! its partial Σnᵢ·xᵢ with Σnᵢ upstream, and the root merges the partials as if it had seen every
//! result itself.

use serde::{Deserialize, Serialize};

use super::Contribution;
use crate::aggregate::robust::{self, Combined, RobustConfig, Verdict};

/// Which sums a streaming strategy needs besides the sample-weighted one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fold {
    /// Σ xᵢ² per entry, one vote per result (AutoFLIP's guidance and moving average).
    pub squares: bool,
}

/// Running sums over a round's results. Sums are in f64, so the result depends on arrival order
/// only through rounding (far below f32's resolution).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningSum {
    /// Σ nᵢ: the results' aggregation weights (their sample counts).
    pub weight: f64,
    /// Results folded in.
    pub count: u64,
    /// Σ nᵢ·xᵢ per entry.
    pub weighted: Vec<f64>,
    /// Σ xᵢ² per entry (unweighted); empty unless [`Fold::squares`] asked for it.
    pub squares: Vec<f64>,
}

impl RunningSum {
    pub fn new(len: usize, fold: Fold) -> RunningSum {
        RunningSum {
            weight: 0.0,
            count: 0,
            weighted: vec![0.0; len],
            squares: if fold.squares {
                vec![0.0; len]
            } else {
                Vec::new()
            },
        }
    }

    /// The sums of `results`, in the order given.
    pub fn of(results: &[Contribution], fold: Fold) -> Result<RunningSum, String> {
        let len = results.first().ok_or("nothing to aggregate")?.values.len();
        let mut s = RunningSum::new(len, fold);
        for c in results {
            s.add(&c.values, c.samples)?;
        }
        Ok(s)
    }

    pub fn len(&self) -> usize {
        self.weighted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Folds one result in: `values` weighted by `samples`.
    pub fn add(&mut self, values: &[f32], samples: u64) -> Result<(), String> {
        if values.len() != self.weighted.len() {
            return Err(format!(
                "update has {} values, the running sum {}",
                values.len(),
                self.weighted.len()
            ));
        }
        let w = samples as f64;
        for (a, x) in self.weighted.iter_mut().zip(values) {
            *a += w * *x as f64;
        }
        for (a, x) in self.squares.iter_mut().zip(values) {
            *a += *x as f64 * *x as f64;
        }
        self.weight += w;
        self.count += 1;
        Ok(())
    }

    /// Adds another partial sum of the same round (an edge's, say) to this one.
    pub fn merge(&mut self, other: &RunningSum) -> Result<(), String> {
        if other.count == 0 {
            return Ok(());
        }
        if self.count == 0 && self.is_empty() {
            // An empty default sum takes the other's shape.
            *self = other.clone();
            return Ok(());
        }
        if other.len() != self.len() || other.squares.len() != self.squares.len() {
            return Err(format!(
                "partial sums differ in shape: {} values ({} squares) against {} ({})",
                other.len(),
                other.squares.len(),
                self.len(),
                self.squares.len()
            ));
        }
        for (a, b) in self.weighted.iter_mut().zip(&other.weighted) {
            *a += b;
        }
        for (a, b) in self.squares.iter_mut().zip(&other.squares) {
            *a += b;
        }
        self.weight += other.weight;
        self.count += other.count;
        Ok(())
    }

    /// Σ nᵢ·xᵢ / Σ nᵢ: the sample-weighted mean.
    pub fn mean(&self) -> Result<Vec<f32>, String> {
        if self.count == 0 || !(self.weight > 0.0) {
            return Err("nothing to aggregate".into());
        }
        Ok(self
            .weighted
            .iter()
            .map(|a| (a / self.weight) as f32)
            .collect())
    }

    /// Σ xᵢ² / count: the mean square per entry, one vote per result.
    pub fn mean_squares(&self) -> Result<Vec<f32>, String> {
        if self.squares.len() != self.weighted.len() {
            return Err("squares were not summed (Fold::squares)".into());
        }
        if self.count == 0 {
            return Err("nothing to aggregate".into());
        }
        Ok(self
            .squares
            .iter()
            .map(|a| (a / self.count as f64) as f32)
            .collect())
    }
}

/// One round aggregated as its results arrive: each is judged by the robust layer (its norm, and
/// its bound when the bound is fixed), folded into the sums, and kept only as a summary (its
/// client, samples, metrics and encoding; no vector) for the round's record.
pub struct StreamRound {
    robust: RobustConfig,
    reference: std::sync::Arc<Vec<f32>>,
    sum: RunningSum,
    summaries: Vec<Contribution>,
    judged: Vec<Verdict>,
}

/// What a streamed round hands to the strategy and the round's record.
pub struct Streamed {
    pub sum: RunningSum,
    /// The results without their vectors, in client order.
    pub results: Vec<Contribution>,
    /// What the robust layer did (verdicts and median norm; no combined vector).
    pub combined: Combined,
}

impl StreamRound {
    /// A streamed round, or `None` when the strategy or the robust rule needs every update.
    /// `reference` is the (masked) model the round's tasks start from.
    pub fn start(
        robust: &RobustConfig,
        fold: Option<Fold>,
        reference: std::sync::Arc<Vec<f32>>,
    ) -> Option<StreamRound> {
        let fold = fold?;
        if !robust::streams(robust) {
            return None;
        }
        let sum = RunningSum::new(reference.len(), fold);
        Some(StreamRound {
            robust: robust.clone(),
            reference,
            sum,
            summaries: Vec::new(),
            judged: Vec::new(),
        })
    }

    /// Judges and folds one accepted result; its vector is dropped here.
    pub fn add(&mut self, mut c: Contribution) -> Result<(), String> {
        if c.values.len() != self.reference.len() {
            return Err(format!(
                "update of client {} has {} values, the model has {}",
                c.client,
                c.values.len(),
                self.reference.len()
            ));
        }
        let verdict = robust::bound_one(&self.robust, &self.reference, &mut c);
        self.sum.add(&c.values, c.samples)?;
        self.judged.push(verdict);
        c.values = Vec::new();
        self.summaries.push(c);
        Ok(())
    }

    /// Adds another aggregator's part of the same round (an edge's partial): its sums, its
    /// results' summaries (no vectors) and the robust layer's verdicts on them. The caller has
    /// checked that it answers this round and starts from the same model.
    pub fn absorb(
        &mut self,
        sum: &RunningSum,
        summaries: Vec<Contribution>,
        verdicts: Vec<Verdict>,
    ) -> Result<(), String> {
        if sum.count as usize != summaries.len() || verdicts.len() != summaries.len() {
            return Err(format!(
                "a partial of {} results carries {} summaries and {} verdicts",
                sum.count,
                summaries.len(),
                verdicts.len()
            ));
        }
        if sum.count > 0
            && (sum.len() != self.sum.len() || sum.squares.len() != self.sum.squares.len())
        {
            return Err(format!(
                "a partial has {} values ({} squares), this round's model {} ({})",
                sum.len(),
                sum.squares.len(),
                self.sum.len(),
                self.sum.squares.len()
            ));
        }
        if summaries.iter().any(|c| !c.values.is_empty()) {
            return Err("a partial's summaries must not carry vectors".into());
        }
        self.sum.merge(sum)?;
        self.summaries.extend(summaries);
        self.judged.extend(verdicts);
        Ok(())
    }

    pub fn results(&self) -> usize {
        self.summaries.len()
    }

    pub fn finish(mut self) -> Streamed {
        self.summaries.sort_by_key(|c| c.client);
        let combined = robust::finish_streamed(self.judged);
        Streamed {
            sum: self.sum,
            results: self.summaries,
            combined,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::robust::{Clip, Rule};
    use crate::model::arch::Arch;
    use crate::model::state::ModelState;
    use crate::strategy::{RoundContext, StrategyConfig, UploadKind, build};
    use crate::train::Eval;
    use rand::{RngExt, SeedableRng, rngs::StdRng, seq::SliceRandom};
    use std::sync::Arc;

    fn contributions(
        kind: UploadKind,
        reference: &[f32],
        n: usize,
        rng: &mut StdRng,
    ) -> Vec<Contribution> {
        (0..n as u64)
            .map(|client| {
                let values: Vec<f32> = reference
                    .iter()
                    .map(|g| match kind {
                        UploadKind::Weights => g + rng.random_range(-0.1f32..0.1),
                        UploadKind::Delta => rng.random_range(-0.05f32..0.05),
                        UploadKind::Votes => {
                            if rng.random_bool(0.5) {
                                1.0
                            } else {
                                -1.0
                            }
                        }
                    })
                    .collect();
                // Client 3 uploads something far larger than the others (a bound's work).
                let values: Vec<f32> = if client == 3 {
                    values.iter().map(|v: &f32| v * 50.0).collect()
                } else {
                    values
                };
                Contribution {
                    client: client * 7 + 1,
                    samples: rng.random_range(1..500),
                    kind,
                    values,
                    metrics: Default::default(),
                    encoding: Default::default(),
                }
            })
            .collect()
    }

    /// The server's two paths on the same results: buffered (robust layer on the whole list,
    /// then `aggregate`), and streamed (each result judged and folded in a shuffled arrival
    /// order, then `aggregate_sum`). Runs two rounds, so strategy state (momentum, exploration
    /// then training) is compared too.
    fn both_paths(name: &str, kind: UploadKind, robust: &RobustConfig, masked: bool) {
        let arch = Arch::preset("mlp", [1, 4, 4], 3).unwrap();
        let mut start = ModelState::init(arch, 5);
        if masked {
            start.set_mask(vec![true; start.params.len()]);
        }
        let config = StrategyConfig::default();
        let (mut buffered, mut streamed) = (
            build(name, &config, None).unwrap(),
            build(name, &config, None).unwrap(),
        );
        let (mut gb, mut gs) = (start.clone(), start.clone());
        let validate = |_: &ModelState| Ok(Eval::default());
        let ctx = RoundContext {
            rounds: 10,
            validate: &validate,
        };
        let mut rng = StdRng::seed_from_u64(11);
        let clients: Vec<crate::strategy::ClientView> = (0..9)
            .map(|i| crate::strategy::ClientView {
                id: i * 7 + 1,
                samples: 500,
            })
            .collect();
        for round in 1..=2 {
            // Strategies prepare their round (AutoFLIP keeps the exploration's base here).
            buffered.configure_round(
                round,
                &gb,
                &clients,
                &mut StdRng::seed_from_u64(round as u64),
            );
            let fold = streamed
                .configure_round(
                    round,
                    &gs,
                    &clients,
                    &mut StdRng::seed_from_u64(round as u64),
                )
                .fold;
            assert!(fold.is_some(), "{name} streams");
            let reference = Arc::new(gb.masked_params());
            let results = contributions(kind, &reference, 9, &mut rng);
            let (judged, combined_b) = robust::apply(robust, &reference, results.clone()).unwrap();
            buffered.aggregate(round, &mut gb, &judged, &ctx).unwrap();

            let mut stream =
                StreamRound::start(robust, fold, reference.clone()).expect("this rule streams");
            let mut arriving = results.clone();
            arriving.shuffle(&mut rng);
            for c in arriving {
                stream.add(c).unwrap();
            }
            let s = stream.finish();
            assert!(
                s.results.iter().all(|c| c.values.is_empty()),
                "vectors are dropped once folded"
            );
            streamed
                .aggregate_sum(round, &mut gs, &s.sum, &s.results, &ctx)
                .unwrap();

            assert_eq!(gb.params.len(), gs.params.len());
            let worst = gb
                .params
                .iter()
                .zip(&gs.params)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-6,
                "{name} round {round}: streamed differs from buffered by {worst}"
            );
            assert_eq!(gb.mask, gs.mask, "{name} round {round}: masks");
            let (vb, vs) = (&combined_b.verdicts, &s.combined.verdicts);
            assert_eq!(vb.len(), vs.len());
            for (a, b) in vb.iter().zip(vs) {
                assert_eq!((a.client, a.clipped), (b.client, b.clipped));
                assert!(
                    (a.norm - b.norm).abs() < 1e-9
                        && (a.norm_ratio - b.norm_ratio).abs() < 1e-9
                        && (a.scale - b.scale).abs() < 1e-12
                );
            }
        }
        assert_eq!(
            buffered.save_state(),
            streamed.save_state(),
            "{name}: the same state to resume from"
        );
    }

    #[test]
    fn streamed_aggregation_equals_buffered() {
        let mean = RobustConfig::default();
        let fixed = RobustConfig {
            clip: Clip::Fixed,
            max_norm: 0.5,
            ..RobustConfig::default()
        };
        for robust in [&mean, &fixed] {
            both_paths("fedavg", UploadKind::Weights, robust, false);
            both_paths("fedavgm", UploadKind::Delta, robust, false);
            both_paths("autoflip", UploadKind::Delta, robust, false);
            both_paths("hidenseek", UploadKind::Votes, robust, true);
        }
    }

    #[test]
    fn rules_that_need_every_update_buffer() {
        let reference = Arc::new(vec![0.0; 4]);
        let fold = Some(Fold::default());
        assert!(StreamRound::start(&RobustConfig::default(), fold, reference.clone()).is_some());
        assert!(
            StreamRound::start(&RobustConfig::default(), None, reference.clone()).is_none(),
            "a strategy that does not opt in"
        );
        for rule in [Rule::Median, Rule::TrimmedMean, Rule::MultiKrum] {
            assert!(
                StreamRound::start(
                    &RobustConfig {
                        rule,
                        ..RobustConfig::default()
                    },
                    fold,
                    reference.clone()
                )
                .is_none(),
                "{rule:?}"
            );
        }
        assert!(
            StreamRound::start(&RobustConfig::norm_bound(), fold, reference.clone()).is_none(),
            "the median norm bound"
        );
        assert!(
            StreamRound::start(
                &RobustConfig {
                    streaming: false,
                    ..RobustConfig::default()
                },
                fold,
                reference
            )
            .is_none()
        );
        // Strategies that do not stream say so in their plans.
        let global = ModelState::init(Arch::preset("mlp", [1, 4, 4], 3).unwrap(), 5);
        let clients = [crate::strategy::ClientView { id: 1, samples: 10 }];
        for name in ["structured", "echo"] {
            let plan = build(name, &StrategyConfig::default(), None)
                .unwrap()
                .configure_round(1, &global, &clients, &mut StdRng::seed_from_u64(1));
            assert_eq!(plan.tasks.len(), 1, "{name}");
            assert!(plan.fold.is_none(), "{name}");
        }
    }

    #[test]
    fn partial_sums_merge_into_the_whole() {
        let mut rng = StdRng::seed_from_u64(3);
        let results = contributions(UploadKind::Delta, &[0.0; 20], 6, &mut rng);
        let fold = Fold { squares: true };
        let whole = RunningSum::of(&results, fold).unwrap();
        // Two edges, each with half the clients; the root starts from an empty sum.
        let (a, b) = (
            RunningSum::of(&results[..2], fold).unwrap(),
            RunningSum::of(&results[2..], fold).unwrap(),
        );
        let mut root = RunningSum::default();
        root.merge(&a).unwrap();
        root.merge(&b).unwrap();
        assert_eq!((root.count, root.weight), (whole.count, whole.weight));
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-7);
        assert!(close(&root.mean().unwrap(), &whole.mean().unwrap()));
        assert!(close(
            &root.mean_squares().unwrap(),
            &whole.mean_squares().unwrap()
        ));
        // A partial sum travels as bytes and back.
        let bytes = postcard::to_allocvec(&a).unwrap();
        assert_eq!(postcard::from_bytes::<RunningSum>(&bytes).unwrap(), a);
        // Shapes must agree.
        assert!(
            root.merge(
                &RunningSum::of(
                    &contributions(UploadKind::Delta, &[0.0; 5], 1, &mut rng),
                    fold
                )
                .unwrap()
            )
            .is_err()
        );
        assert!(
            RunningSum::default().mean().is_err(),
            "an empty sum has no mean"
        );
    }
}
