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
use crate::aggregate::robust::{self, Clip, Combined, RobustConfig, Rule, Verdict};

/// Which sums a streaming strategy needs besides the sample-weighted one, and how each result
/// enters them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fold {
    /// Σ xᵢ² per entry, one vote per result (AutoFLIP's guidance and moving average).
    pub squares: bool,
    /// Each result scaled down to at most this L2 norm before it is added (DP-FedAvg's clip:
    /// it bounds what one client can change, whatever it sends).
    #[serde(default)]
    pub clip: Option<f32>,
    /// Each result weighs 1 instead of its sample count (DP-FedAvg: a client's weight must not
    /// depend on what it claims).
    #[serde(default)]
    pub uniform: bool,
}

impl Fold {
    /// Only the sample-weighted sum: what FedAvg needs.
    pub const PLAIN: Fold = Fold {
        squares: false,
        clip: None,
        uniform: false,
    };
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
    /// How results are added (their clip and weight; the squares are marked by `squares`).
    #[serde(default)]
    pub fold: Fold,
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
            fold,
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

    /// Folds one result in: `values` weighted by `samples` (by 1 with [`Fold::uniform`]),
    /// scaled down to [`Fold::clip`]'s norm if it has one.
    pub fn add(&mut self, values: &[f32], samples: u64) -> Result<(), String> {
        if values.len() != self.weighted.len() {
            return Err(format!(
                "update has {} values, the running sum {}",
                values.len(),
                self.weighted.len()
            ));
        }
        let w = if self.fold.uniform {
            1.0
        } else {
            samples as f64
        };
        let scale = match self.fold.clip {
            Some(c) => {
                let n = robust::l2_distance(values, None);
                if n > c as f64 { c as f64 / n } else { 1.0 }
            }
            None => 1.0,
        };
        for (a, x) in self.weighted.iter_mut().zip(values) {
            *a += w * scale * *x as f64;
        }
        for (a, x) in self.squares.iter_mut().zip(values) {
            let x = scale * *x as f64;
            *a += x * x;
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

/// One round aggregated as its results arrive: each is judged by the robust layer (its norm
/// against the round's bound), folded into the sums (and, for the trimmed mean, into each
/// coordinate's extremes), and kept only as a summary (its client, samples, metrics and
/// encoding; no vector) for the round's record.
pub struct StreamRound {
    robust: RobustConfig,
    reference: std::sync::Arc<Vec<f32>>,
    /// This server's own results.
    sum: RunningSum,
    /// Partials absorbed from other aggregators (edges), each already combined by its own layer.
    absorbed: Vec<RunningSum>,
    bound: Bound,
    trim: Option<Extremes>,
    /// Folded results' sample counts, in arrival order (the extremes point into it).
    samples: Vec<u64>,
    summaries: Vec<Contribution>,
    judged: Vec<Verdict>,
    /// Where each of `summaries` (and `judged`) came from: None for this server's own
    /// results, Some(k) for the k-th absorbed partial's.
    origin: Vec<Option<usize>>,
}

/// A median norm bound needs a median before the first result is folded.
enum Bound {
    Known(f64),
    /// No earlier median (the run's first round, or the model changed shape): the first
    /// [`WARM_UP`] results wait here, and their median norm sets the bound.
    Pending(Vec<Contribution>),
}

/// Results a streamed round holds back to find a median norm when it has no earlier one.
pub const WARM_UP: usize = 5;

/// What a streamed round hands to the strategy and the round's record.
pub struct Streamed {
    /// The combined sums: their mean is the round's robust mean (the trimmed mean per
    /// coordinate, when the rule trims).
    pub sum: RunningSum,
    /// The results without their vectors, in client order.
    pub results: Vec<Contribution>,
    /// What the robust layer did (verdicts and median norm; no combined vector).
    pub combined: Combined,
    /// Absorbed partials (in the order absorbed) that [`combine_partials`] left out.
    pub set_aside: Vec<usize>,
}

impl StreamRound {
    /// A streamed round, or `None` when the strategy or the robust rule needs every update.
    /// `reference` is the (masked) model the round's tasks start from; `expected` the results
    /// the round waits for (it sizes the trimmed mean's extremes); `median_norm` the previous
    /// round's median update norm on a model of this shape, if there was one (the median norm
    /// bound uses it).
    pub fn start(
        robust: &RobustConfig,
        fold: Option<Fold>,
        reference: std::sync::Arc<Vec<f32>>,
        expected: usize,
        median_norm: Option<f64>,
    ) -> Option<StreamRound> {
        let fold = fold?;
        if !robust::streams(robust) {
            return None;
        }
        let bound = match (robust.clip, median_norm) {
            (Clip::None, _) => Bound::Known(f64::INFINITY),
            (Clip::Fixed, _) => Bound::Known(robust.max_norm),
            (Clip::Median, Some(m)) if m > 0.0 && m.is_finite() => {
                Bound::Known(robust.clip_multiple * m)
            }
            (Clip::Median, _) => Bound::Pending(Vec::new()),
        };
        let trim = (robust.rule == Rule::TrimmedMean && robust.trim > 0.0).then(|| {
            let k = robust::trim_count(robust.trim, expected).clamp(1, robust.trim_max);
            Extremes::new(reference.len(), k)
        });
        Some(StreamRound {
            robust: robust.clone(),
            sum: RunningSum::new(reference.len(), fold),
            absorbed: Vec::new(),
            reference,
            bound,
            trim,
            samples: Vec::new(),
            summaries: Vec::new(),
            judged: Vec::new(),
            origin: Vec::new(),
        })
    }

    /// Judges and folds one accepted result; its vector is dropped here (or, while the round
    /// still looks for its norm bound, once the bound is known).
    pub fn add(&mut self, c: Contribution) -> Result<(), String> {
        if c.values.len() != self.reference.len() {
            return Err(format!(
                "update of client {} has {} values, the model has {}",
                c.client,
                c.values.len(),
                self.reference.len()
            ));
        }
        match &mut self.bound {
            Bound::Known(b) => {
                let b = *b;
                self.fold(b, c)
            }
            Bound::Pending(held) => {
                held.push(c);
                if held.len() >= WARM_UP {
                    self.settle_bound()?;
                }
                Ok(())
            }
        }
    }

    /// The held results' median norm sets the bound; they are folded with it.
    fn settle_bound(&mut self) -> Result<(), String> {
        let Bound::Pending(held) = std::mem::replace(&mut self.bound, Bound::Known(0.0)) else {
            return Ok(());
        };
        let norms: Vec<f64> = held
            .iter()
            .map(|c| robust::update_norm(&self.reference, c))
            .collect();
        let median = robust::median_of(&norms);
        let bound = if median > 0.0 {
            self.robust.clip_multiple * median
        } else {
            f64::INFINITY
        };
        self.bound = Bound::Known(bound);
        for c in held {
            self.fold(bound, c)?;
        }
        Ok(())
    }

    fn fold(&mut self, bound: f64, mut c: Contribution) -> Result<(), String> {
        let verdict = robust::bound_one(bound, &self.reference, &mut c);
        self.sum.add(&c.values, c.samples)?;
        if let Some(t) = &mut self.trim {
            t.insert(
                &c.values,
                self.samples.len() as u32,
                &self.samples,
                c.samples,
            );
        }
        self.samples.push(c.samples);
        self.judged.push(verdict);
        c.values = Vec::new();
        self.summaries.push(c);
        self.origin.push(None);
        Ok(())
    }

    /// Adds another aggregator's part of the same round (an edge's partial): its sums, its
    /// results' summaries (no vectors) and the robust layer's verdicts on them. The caller has
    /// checked that it answers this round and starts from the same model. The partial was
    /// combined by its aggregator's own layer; how partials are combined here is
    /// [`combine_partials`]'s to say.
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
        if sum.count > 0 {
            self.absorbed.push(sum.clone());
        }
        let k = self.absorbed.len().wrapping_sub(1);
        self.origin.extend(summaries.iter().map(|_| Some(k)));
        self.summaries.extend(summaries);
        self.judged.extend(verdicts);
        Ok(())
    }

    /// Results taken so far (held ones and absorbed partials' included).
    pub fn results(&self) -> usize {
        let held = match &self.bound {
            Bound::Pending(h) => h.len(),
            Bound::Known(_) => 0,
        };
        self.summaries.len() + held
    }

    pub fn finish(mut self) -> Result<Streamed, String> {
        self.settle_bound()?;
        let local = self.samples.len();
        let mut outside = vec![0u64; local];
        if let Some(t) = &self.trim {
            let j = robust::trim_count(self.robust.trim, local).min(t.k);
            if j > 0 {
                t.trim(j, &self.samples, &mut self.sum, &mut outside);
            }
        }
        let len = self.reference.len().max(1) as f64;
        let own_verdicts = self
            .judged
            .iter_mut()
            .zip(&self.origin)
            .filter_map(|(v, o)| o.is_none().then_some(v));
        for (v, o) in own_verdicts.zip(&outside) {
            v.outside = *o as f64 / len;
            v.down_weighted = v.outside > robust::TRIMMED_SUSPICIOUS;
        }
        let spread = robust::median_of(
            &self
                .judged
                .iter()
                .map(|v| v.norm)
                .filter(|n| n.is_finite())
                .collect::<Vec<_>>(),
        );
        let mut partials = self.absorbed;
        let own = self.sum.count > 0 || partials.is_empty();
        if own {
            partials.insert(0, self.sum);
        }
        let (sum, left_out) = combine_partials(
            &self.robust,
            (spread.is_finite() && spread > 0.0).then_some(spread),
            partials,
        )?;
        // Each left-out partial's results leave with it: the round's results and verdicts are
        // those its model is made of.
        let gone = |o: &Option<usize>| match o {
            None => own && left_out.contains(&0),
            Some(k) => left_out.contains(&(k + usize::from(own))),
        };
        let keep: Vec<bool> = self.origin.iter().map(|o| !gone(o)).collect();
        let mut flags = keep.iter();
        self.summaries
            .retain(|_| *flags.next().expect("one per summary"));
        let mut flags = keep.iter();
        self.judged
            .retain(|_| *flags.next().expect("one per verdict"));
        let set_aside = left_out
            .into_iter()
            .filter_map(|i| if own { i.checked_sub(1) } else { Some(i) })
            .collect();
        self.summaries.sort_by_key(|c| c.client);
        let combined = robust::finish_streamed(self.judged);
        Ok(Streamed {
            sum,
            results: self.summaries,
            combined,
            set_aside,
        })
    }
}

/// One round's partial sums (this server's own and its edges'), combined, and the indices of
/// those left out. With no defence (`rule = "mean"`, no bound), or fewer than three partials
/// (which cannot outvote one), they are added, exactly as if one server had seen every result.
/// With a defence and three or more partials, each partial's mean is compared with its nearest
/// other partial's: a partial farther from every other than `clip_multiple` (3) times the
/// larger of the median of these nearest distances and its sampling allowance is left out (a
/// compromised edge sending a poisoned or scaled partial), and the rest are added. So honest
/// edges keep the exact mean, where a coordinate-wise median of the partials' means would cost
/// accuracy on non-IID data (edges whose tabs hold different classes), and one compromised edge
/// can move the model at most as far as it stays within that distance.
///
/// The sampling allowance: two honest edges' means of nᵢ and nⱼ updates, each within `spread`
/// (the round's median update norm) of the others, differ by about spread·√(1/nᵢ + 1/nⱼ). With
/// three edges the median nearest distance is the closest pair's, so without it an edge that
/// had few results in a round (its mean the noisiest) was left out whenever the other two
/// happened to be close: `canopy soak` found honest partials left out in one round of ten. A
/// partial's count is taken as at least a quarter of the median count, so a compromised edge
/// that claims few results widens its allowance by √(5/2) at most.
pub fn combine_partials(
    robust: &RobustConfig,
    spread: Option<f64>,
    partials: Vec<RunningSum>,
) -> Result<(RunningSum, Vec<usize>), String> {
    let plain = robust.rule == Rule::Mean && robust.clip == Clip::None;
    if partials.len() == 1 {
        return Ok((partials.into_iter().next().expect("one"), Vec::new()));
    }
    let add = |keep: &dyn Fn(usize) -> bool| -> Result<RunningSum, String> {
        let mut sum = RunningSum::default();
        for (i, p) in partials.iter().enumerate() {
            if keep(i) {
                sum.merge(p)?;
            }
        }
        Ok(sum)
    };
    if plain || partials.len() < 3 {
        return Ok((add(&|_| true)?, Vec::new()));
    }
    let means: Vec<Vec<f32>> = partials
        .iter()
        .map(|p| p.mean())
        .collect::<Result<_, _>>()?;
    let len = means[0].len();
    if means.iter().any(|m| m.len() != len)
        || partials
            .iter()
            .any(|p| p.squares.len() != partials[0].squares.len())
    {
        return Err("partial sums differ in shape".into());
    }
    let nearest: Vec<f64> = (0..means.len())
        .map(|i| {
            (0..means.len())
                .filter(|j| *j != i)
                .map(|j| robust::l2_distance(&means[i], Some(&means[j])))
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let scale = robust::median_of(&nearest);
    let counts: Vec<f64> = partials.iter().map(|p| p.count as f64).collect();
    let typical = robust::median_of(&counts).max(1.0);
    let allowance = |i: usize| match spread {
        Some(s) => s * (1.0 / counts[i].max(typical / 4.0).max(1.0) + 1.0 / typical).sqrt(),
        None => 0.0,
    };
    let multiple = robust.clip_multiple.max(1.0);
    let out: Vec<usize> = (0..means.len())
        .filter(|i| !(nearest[*i] <= multiple * scale.max(allowance(*i))))
        .collect();
    Ok((add(&|i| !out.contains(&i))?, out))
}

/// The trimmed mean's memory in a streamed round: for every coordinate the `k` largest and `k`
/// smallest values folded so far, each with the arrival index of its result. Values are ordered
/// by (value, weight): the order the buffered rule sorts by, so both trim values of the same
/// weights. Only when values tie in both can the two lists hold the same result, and then the
/// sums they take out are the same as for two different results.
struct Extremes {
    k: usize,
    /// Per coordinate, `k` slots from the largest down; `EMPTY` index: unused.
    high: Vec<(f32, u32)>,
    /// Per coordinate, `k` slots from the smallest up.
    low: Vec<(f32, u32)>,
    /// Per coordinate, the smallest (value, weight) kept in `high` and the largest in `low`
    /// (−∞ and +∞ while slots are free): a value strictly between them, or equal to one with
    /// no greater weight, changes nothing, which is what almost every value of a large round
    /// does (and every vote of a supermask round, ±1), so it costs a few comparisons. Weights
    /// are kept as u32 (saturated); a weight that does not fit takes the slow path.
    high_floor: Vec<(f32, u32)>,
    low_ceiling: Vec<(f32, u32)>,
}

const EMPTY: u32 = u32::MAX;

impl Extremes {
    fn new(len: usize, k: usize) -> Extremes {
        Extremes {
            k,
            high: vec![(0.0, EMPTY); len * k],
            low: vec![(0.0, EMPTY); len * k],
            high_floor: vec![(f32::NEG_INFINITY, 0); len],
            low_ceiling: vec![(f32::INFINITY, 0); len],
        }
    }

    /// Offers every coordinate of result `idx` (weight `w`; earlier results' weights in
    /// `samples`) to the extremes.
    fn insert(&mut self, values: &[f32], idx: u32, samples: &[u64], w: u64) {
        let k = self.k;
        let wf = w as f64;
        let weight = |i: u32| samples[i as usize] as f64;
        // A newcomer equal in value and weight to a kept one changes nothing in the sums the
        // trim takes out, so it does not replace it (votes, ±1, tie in every coordinate): the
        // earliest of equals are kept, in both lists. Their arithmetic is the buffered rule's,
        // which drops the last of equals from the top instead.
        let above = |x: f32, (y, i): (f32, u32)| {
            i == EMPTY
                || x.total_cmp(&y)
                    .then_with(|| wf.total_cmp(&weight(i)))
                    .is_gt()
        };
        let below = |x: f32, (y, i): (f32, u32)| {
            i == EMPTY
                || x.total_cmp(&y)
                    .then_with(|| wf.total_cmp(&weight(i)))
                    .is_lt()
        };
        // Fast path only for a weight that fits (and is below the saturated maximum, so that
        // "no smaller than the ceiling's" is exact).
        let wq = u32::try_from(w).ok().filter(|w| *w < u32::MAX);
        let saturated = |i: u32| u32::try_from(samples[i as usize]).unwrap_or(u32::MAX);
        // The same value (bit for bit: total order, −0 < +0).
        let same = |x: f32, y: f32| x.to_bits() == y.to_bits();
        let floors = self.high_floor.iter_mut().zip(self.low_ceiling.iter_mut());
        for (c, (&x, (floor, ceiling))) in values.iter().zip(floors).enumerate() {
            if let Some(wq) = wq {
                let not_high = x < floor.0 || (same(x, floor.0) && wq <= floor.1);
                let not_low = x > ceiling.0 || (same(x, ceiling.0) && wq >= ceiling.1);
                if not_high && not_low {
                    continue;
                }
            }
            let hi = &mut self.high[c * k..(c + 1) * k];
            if above(x, hi[k - 1]) {
                let at = hi.iter().position(|&s| above(x, s)).unwrap_or(k - 1);
                hi[at..].rotate_right(1);
                hi[at] = (x, idx);
                let (v, i) = hi[k - 1];
                if i != EMPTY {
                    *floor = (
                        v,
                        if i == idx {
                            w.min(u32::MAX as u64) as u32
                        } else {
                            saturated(i)
                        },
                    );
                }
            }
            let lo = &mut self.low[c * k..(c + 1) * k];
            if below(x, lo[k - 1]) {
                let at = lo.iter().position(|&s| below(x, s)).unwrap_or(k - 1);
                lo[at..].rotate_right(1);
                lo[at] = (x, idx);
                let (v, i) = lo[k - 1];
                if i != EMPTY {
                    *ceiling = (
                        v,
                        if i == idx {
                            w.min(u32::MAX as u64) as u32
                        } else {
                            saturated(i)
                        },
                    );
                }
            }
        }
    }

    /// Drops the `j` largest and smallest values of every coordinate from `sum`, so that its
    /// mean is the trimmed mean (and its squares that mean squared, as every buffered result
    /// carries the combined update); counts each result's trimmed coordinates in `outside`.
    fn trim(&self, j: usize, samples: &[u64], sum: &mut RunningSum, outside: &mut [u64]) {
        let k = self.k;
        let total = sum.weight;
        let count = sum.count as f64;
        for c in 0..sum.weighted.len() {
            let (mut s, mut w) = (0f64, 0f64);
            for &(x, i) in self.high[c * k..c * k + j]
                .iter()
                .chain(&self.low[c * k..c * k + j])
            {
                let wi = samples[i as usize] as f64;
                s += wi * x as f64;
                w += wi;
                outside[i as usize] += 1;
            }
            let kept = total - w;
            let mean = if kept > 0.0 {
                (sum.weighted[c] - s) / kept
            } else {
                0.0
            };
            sum.weighted[c] = mean * total;
            if let Some(q) = sum.squares.get_mut(c) {
                *q = mean * mean * count;
            }
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

            let mut stream = StreamRound::start(robust, fold, reference.clone(), 9, None)
                .expect("this rule streams");
            let mut arriving = results.clone();
            arriving.shuffle(&mut rng);
            for c in arriving {
                stream.add(c).unwrap();
            }
            let s = stream.finish().unwrap();
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
        // The plain and fixed-bound paths do the same arithmetic, so strategy state is equal bit
        // for bit; the trimmed mean's squares are its mean squared in f64 against f32 on the
        // buffered path, so state agrees there only to rounding (the models above, after two
        // rounds that use it, agree to 1e-6).
        if robust.rule == Rule::Mean {
            assert_eq!(
                buffered.save_state(),
                streamed.save_state(),
                "{name}: the same state to resume from"
            );
        }
    }

    #[test]
    fn streamed_aggregation_equals_buffered() {
        let mean = RobustConfig::plain();
        let fixed = RobustConfig {
            clip: Clip::Fixed,
            max_norm: 0.5,
            ..RobustConfig::plain()
        };
        // The default's trimmed mean (9 results: one value from each end), unbounded and with
        // a fixed bound: the streamed extremes trim what the buffered rule does.
        let trimmed = RobustConfig {
            clip: Clip::None,
            ..RobustConfig::default()
        };
        let trimmed_fixed = RobustConfig {
            clip: Clip::Fixed,
            max_norm: 0.5,
            ..RobustConfig::default()
        };
        for robust in [&mean, &fixed, &trimmed, &trimmed_fixed] {
            both_paths("fedavg", UploadKind::Weights, robust, false);
            both_paths("fedavgm", UploadKind::Delta, robust, false);
            both_paths("autoflip", UploadKind::Delta, robust, false);
            both_paths("hidenseek", UploadKind::Votes, robust, true);
        }
    }

    fn streamed(robust: &RobustConfig, results: &[Contribution], prior: Option<f64>) -> Streamed {
        let reference = Arc::new(vec![0.0; results[0].values.len()]);
        let mut s = StreamRound::start(
            robust,
            Some(Fold::default()),
            reference,
            results.len(),
            prior,
        )
        .expect("streams");
        for c in results {
            s.add(c.clone()).unwrap();
        }
        s.finish().unwrap()
    }

    fn delta(client: u64, samples: u64, values: Vec<f32>) -> Contribution {
        Contribution {
            client,
            samples,
            kind: UploadKind::Delta,
            values,
            metrics: Default::default(),
            encoding: Default::default(),
        }
    }

    #[test]
    fn streamed_trimmed_mean_by_hand() {
        // Values 1, 2, 3, 100, −50 with weights 1, 1, 3, 1, 1, in that arrival order: one value
        // dropped from each end (−50 and 100), then (1 + 2 + 9) / 5.
        let values = [1.0, 2.0, 3.0, 100.0, -50.0];
        let weights = [1, 1, 3, 1, 1];
        let results: Vec<Contribution> = (0..5)
            .map(|i| delta(i as u64 + 1, weights[i], vec![values[i], -values[i]]))
            .collect();
        let robust = RobustConfig {
            clip: Clip::None,
            ..RobustConfig::default()
        };
        let s = streamed(&robust, &results, None);
        let mean = s.sum.mean().unwrap();
        assert!(
            (mean[0] - 2.4).abs() < 1e-6 && (mean[1] + 2.4).abs() < 1e-6,
            "{mean:?}"
        );
        // Clients 4 and 5 were trimmed on both coordinates.
        let outside: Vec<f64> = s.combined.verdicts.iter().map(|v| v.outside).collect();
        assert_eq!(outside, vec![0.0, 0.0, 0.0, 1.0, 1.0]);
        let flagged: Vec<bool> = s
            .combined
            .verdicts
            .iter()
            .map(|v| v.down_weighted)
            .collect();
        assert_eq!(flagged, vec![false, false, false, true, true]);
        // Three results: nothing trimmed (the plain weighted mean (1 + 2 + 9) / 5).
        let s = streamed(&robust, &results[..3], None);
        assert!((s.sum.mean().unwrap()[0] - 2.4).abs() < 1e-6);
        // trim_max caps the trim: 20 results at trim 0.2 would drop 4 from each end; with
        // trim_max 1 only the largest and the smallest go.
        let many: Vec<Contribution> = (0..20).map(|i| delta(i + 1, 1, vec![i as f32])).collect();
        let capped = RobustConfig {
            trim: 0.2,
            trim_max: 1,
            ..robust.clone()
        };
        let s = streamed(&capped, &many, None);
        assert!((s.sum.mean().unwrap()[0] - 9.5).abs() < 1e-6);
        let full = streamed(
            &RobustConfig {
                trim_max: 4,
                ..capped.clone()
            },
            &many,
            None,
        );
        // Dropping 0..=3 and 16..=19 leaves 4..=15, whose mean is 9.5 too; shift one end to
        // see the difference.
        let mut skewed = many.clone();
        skewed[19].values[0] = 1000.0;
        skewed[18].values[0] = 900.0;
        let one = streamed(&capped, &skewed, None).sum.mean().unwrap()[0];
        let four = streamed(
            &RobustConfig {
                trim_max: 4,
                ..capped
            },
            &skewed,
            None,
        )
        .sum
        .mean()
        .unwrap()[0];
        assert!((four - 9.5).abs() < 1e-6, "{four}");
        assert!(one > 50.0, "one value trimmed leaves 900 in: {one}");
        assert_eq!(full.sum.count, 20);
    }

    #[test]
    fn streamed_trim_with_ties_in_value_and_weight_equals_buffered() {
        // Few distinct values (−1, −0, +0, 1, 2) and weights (1, 2, 3): almost every value ties
        // with a kept extreme, the case the extremes' fast path decides with (value, weight)
        // alone. 60 results trimmed 6 a side (trim_max 10), in several arrival orders.
        let mut rng = StdRng::seed_from_u64(5);
        let choices = [-1.0f32, -0.0, 0.0, 1.0, 2.0];
        let results: Vec<Contribution> = (0..60u64)
            .map(|i| {
                let values = (0..32)
                    .map(|_| choices[rng.random_range(0..choices.len())])
                    .collect();
                delta(i + 1, rng.random_range(1..4), values)
            })
            .collect();
        let robust = RobustConfig {
            clip: Clip::None,
            trim_max: 10,
            ..RobustConfig::default()
        };
        let reference = vec![0.0; 32];
        let (judged, _) = robust::apply(&robust, &reference, results.clone()).unwrap();
        let buffered = crate::strategy::weighted_values(&judged).unwrap();
        for order in 0..4 {
            let mut arriving = results.clone();
            if order > 0 {
                arriving.shuffle(&mut rng);
            }
            let mean = streamed(&robust, &arriving, None).sum.mean().unwrap();
            for (c, (a, b)) in buffered.iter().zip(&mean).enumerate() {
                assert!(
                    (a - b).abs() < 1e-6,
                    "order {order}, coordinate {c}: {a} / {b}"
                );
            }
        }
    }

    #[test]
    fn streamed_norm_bound_uses_the_previous_median_or_waits_for_one() {
        // Norms 1, 2, 3, 4 and 1000.
        let results: Vec<Contribution> = [1.0f32, 2.0, 3.0, 4.0, 1000.0]
            .iter()
            .enumerate()
            .map(|(i, &x)| delta(i as u64 + 1, 1, vec![x]))
            .collect();
        let bound = RobustConfig::norm_bound();
        // With the previous round's median norm 0.5, the bound is 1.5: all but the first clipped.
        let s = streamed(&bound, &results, Some(0.5));
        let clipped: Vec<bool> = s.combined.verdicts.iter().map(|v| v.clipped).collect();
        assert_eq!(clipped, vec![false, true, true, true, true]);
        assert!((s.sum.mean().unwrap()[0] - 1.4).abs() < 1e-6);
        // Without one, the first five results are held and their median (3) sets 9.
        let s = streamed(&bound, &results, None);
        let clipped: Vec<bool> = s.combined.verdicts.iter().map(|v| v.clipped).collect();
        assert_eq!(clipped, vec![false, false, false, false, true]);
        assert!((s.sum.mean().unwrap()[0] - 19.0 / 5.0).abs() < 1e-6);
        assert!((s.combined.verdicts[4].scale - 0.009).abs() < 1e-9);
        // Fewer results than the warm-up: the bound comes from those there are.
        let s = streamed(&bound, &results[3..], None);
        assert!(s.combined.verdicts.iter().all(|v| !v.clipped));
        // An attacker arriving first cannot set the bound on its own.
        let mut first: Vec<Contribution> = results.clone();
        first.rotate_right(1);
        let s = streamed(&bound, &first, None);
        assert!(
            s.combined
                .verdicts
                .iter()
                .find(|v| v.client == 5)
                .unwrap()
                .clipped
        );
    }

    #[test]
    fn rules_that_need_every_update_buffer() {
        let reference = Arc::new(vec![0.0; 4]);
        let fold = Some(Fold::default());
        let start =
            |r: &RobustConfig, fold| StreamRound::start(r, fold, reference.clone(), 4, None);
        for streaming in [
            RobustConfig::default(),
            RobustConfig::plain(),
            RobustConfig::norm_bound(),
        ] {
            assert!(
                start(&streaming, fold).is_some(),
                "{}",
                streaming.describe()
            );
        }
        assert!(
            start(&RobustConfig::default(), None).is_none(),
            "a strategy that does not opt in"
        );
        for rule in [Rule::Median, Rule::MultiKrum] {
            assert!(
                start(
                    &RobustConfig {
                        rule,
                        ..RobustConfig::default()
                    },
                    fold,
                )
                .is_none(),
                "{rule:?}"
            );
        }
        assert!(
            start(
                &RobustConfig {
                    streaming: false,
                    ..RobustConfig::default()
                },
                fold,
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
    fn a_poisoned_partial_is_left_out_and_honest_ones_add_up() {
        // Three edges' partials of 2-entry deltas; the third claims a huge weight and sends 1e6.
        let partial = |values: [f32; 2], samples: u64, n: u64| {
            let mut s = RunningSum::new(
                2,
                Fold {
                    squares: true,
                    ..Fold::PLAIN
                },
            );
            for _ in 0..n {
                s.add(&values, samples).unwrap();
            }
            s
        };
        let honest = [
            partial([0.1, -0.2], 10, 3),
            partial([0.3, 0.0], 10, 2),
            partial([0.2, -0.1], 20, 1),
        ];
        let bad = partial([1e6, -1e6], 1_000_000, 3);
        let defended = RobustConfig::default();
        let mut whole = honest[0].clone();
        whole.merge(&honest[1]).unwrap();
        whole.merge(&honest[2]).unwrap();
        // Honest edges only: nothing left out, the exact sum one server would have.
        let (out, left) = combine_partials(&defended, None, honest.to_vec()).unwrap();
        assert!(left.is_empty());
        assert_eq!(out, whole);
        // The poisoned partial is far from every other: left out, wherever it comes.
        for at in 0..4 {
            let mut all = honest.to_vec();
            all.insert(at, bad.clone());
            let (out, left) = combine_partials(&defended, None, all).unwrap();
            assert_eq!(left, vec![at]);
            let m = out.mean().unwrap();
            let w = whole.mean().unwrap();
            assert!(
                (m[0] - w[0]).abs() < 1e-6 && (m[1] - w[1]).abs() < 1e-6,
                "{m:?}"
            );
            assert_eq!(out.count, 6);
        }
        // A sign-flipped ×−10 copy of an honest partial is left out too.
        let flipped = partial([-1.0, 2.0], 10, 3);
        let (_, left) = combine_partials(
            &defended,
            None,
            vec![honest[0].clone(), honest[1].clone(), flipped],
        )
        .unwrap();
        assert_eq!(left, vec![2]);
        // No defence: partials add up exactly, the attacker included.
        let all = vec![honest[0].clone(), honest[1].clone(), bad.clone()];
        let (plain, left) = combine_partials(&RobustConfig::plain(), None, all).unwrap();
        assert!(left.is_empty());
        assert!(
            plain.mean().unwrap()[0] > 9e5,
            "the plain mean follows the attacker"
        );
        // Two partials cannot outvote one another: added.
        let (two, _) =
            combine_partials(&defended, None, vec![honest[0].clone(), honest[1].clone()]).unwrap();
        assert!((two.mean().unwrap()[0] - 0.18).abs() < 1e-6);
    }

    #[test]
    fn a_small_honest_partial_is_kept_and_a_left_out_partials_results_leave_with_it() {
        // Clients' deltas are (±1, ±1) (norm √2). Two edges of 40 results have means 0.05 apart;
        // a third with 4 results, (0.5, 0.5), is 0.67 away: 9.5× the closest pair's distance,
        // and about what 4 updates of norm √2 leave to chance (√2·√(1/10 + 1/40) = 0.5).
        let edge = |first: u64, xs: &[(f32, f32, u64)]| {
            let results: Vec<Contribution> = xs
                .iter()
                .flat_map(|&(x, y, n)| std::iter::repeat_n((x, y), n as usize))
                .enumerate()
                .map(|(i, (x, y))| Contribution {
                    client: first + i as u64,
                    samples: 10,
                    kind: UploadKind::Delta,
                    values: vec![x, y],
                    metrics: Default::default(),
                    encoding: Default::default(),
                })
                .collect();
            results
        };
        let a = edge(0, &[(1.0, 1.0, 20), (-1.0, 1.0, 1), (-1.0, -1.0, 19)]);
        let b = edge(100, &[(1.0, 1.0, 20), (1.0, -1.0, 1), (-1.0, -1.0, 19)]);
        let c = edge(200, &[(1.0, 1.0, 2), (1.0, -1.0, 1), (-1.0, 1.0, 1)]);
        let sums: Vec<RunningSum> = [&a, &b, &c]
            .iter()
            .map(|r| RunningSum::of(r, Fold::PLAIN).unwrap())
            .collect();
        let defended = RobustConfig::default();
        // Distances alone leave the small edge out...
        let (_, left) = combine_partials(&defended, None, sums.clone()).unwrap();
        assert_eq!(left, vec![2]);
        // ...its sampling allowance keeps it.
        let spread = 2f64.sqrt();
        let (out, left) = combine_partials(&defended, Some(spread), sums.clone()).unwrap();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(out.count, 84);
        // A poisoned copy of it (×−10) is still far outside.
        let mut bad = sums[2].clone();
        bad.weighted.iter_mut().for_each(|v| *v *= -10.0);
        let (_, left) = combine_partials(
            &defended,
            Some(spread),
            vec![sums[0].clone(), sums[1].clone(), bad],
        )
        .unwrap();
        assert_eq!(left, vec![2]);

        // Through a round at the root: the left-out edge's results are not the round's.
        let verdicts = |r: &[Contribution]| -> Vec<Verdict> {
            r.iter()
                .map(|c| Verdict {
                    client: c.client,
                    norm: spread,
                    norm_ratio: 1.0,
                    scale: 1.0,
                    outside: 0.0,
                    clipped: false,
                    down_weighted: false,
                    rejected: false,
                })
                .collect()
        };
        let summaries = |r: &[Contribution]| -> Vec<Contribution> {
            r.iter()
                .map(|c| Contribution {
                    values: Vec::new(),
                    ..c.clone()
                })
                .collect()
        };
        let run = |third: &RunningSum| {
            let mut round = StreamRound::start(
                &defended,
                Some(Fold::PLAIN),
                std::sync::Arc::new(vec![0.0; 2]),
                84,
                Some(spread),
            )
            .unwrap();
            for (sum, r) in [(&sums[0], &a), (&sums[1], &b), (third, &c)] {
                round.absorb(sum, summaries(r), verdicts(r)).unwrap();
            }
            round.finish().unwrap()
        };
        let kept = run(&sums[2]);
        assert!(kept.set_aside.is_empty());
        assert_eq!((kept.results.len(), kept.combined.verdicts.len()), (84, 84));
        let mut bad = sums[2].clone();
        bad.weighted.iter_mut().for_each(|v| *v *= -10.0);
        let out = run(&bad);
        assert_eq!(out.set_aside, vec![2]);
        assert_eq!(out.sum.count, 80);
        assert_eq!((out.results.len(), out.combined.verdicts.len()), (80, 80));
        assert!(out.results.iter().all(|r| r.client < 200));
    }

    #[test]
    fn partial_sums_merge_into_the_whole() {
        let mut rng = StdRng::seed_from_u64(3);
        let results = contributions(UploadKind::Delta, &[0.0; 20], 6, &mut rng);
        let fold = Fold {
            squares: true,
            ..Fold::PLAIN
        };
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
