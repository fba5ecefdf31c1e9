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
use crate::aggregate::robust::{self, Clip, Combined, RobustConfig, Rule, TrimEnds, Verdict};
use crate::codec::update::UploadKind;

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
    /// `clip = "centred"`: the previous round's combined update, distances are measured from.
    centre: Option<std::sync::Arc<Vec<f32>>>,
    /// The model plus the centre (empty without one): where a full-weights upload lies when
    /// its update is the centre, so that its distance from the centre is one pass.
    centre_weights: Vec<f32>,
    /// `rule = "drop_farthest"`: how many of the farthest updates are held back (0: none).
    hold: usize,
    /// The farthest updates so far (bounded, with their distance from the centre and their
    /// verdicts), not yet in the sums: at the end the round's `⌊trim·n⌋` farthest are dropped
    /// and the rest folded.
    farthest: Vec<(f64, Contribution, Verdict)>,
    /// `drop_farthest`: every local update's distance from the centre (for the round's median).
    distances: Vec<f64>,
    trim: Option<Extremes>,
    /// Folded results' sample counts, in arrival order (the extremes point into it).
    samples: Vec<u64>,
    summaries: Vec<Contribution>,
    judged: Vec<Verdict>,
    /// Where each of `summaries` came from: None for this server's own results, Some(k) for
    /// the k-th absorbed partial's.
    origin: Vec<Option<usize>>,
    /// The same for each of `judged` (a partial's verdicts include results its edge's
    /// `drop_farthest` rejected, which are not among its summaries).
    verdict_origin: Vec<Option<usize>>,
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

/// What a round leaves the next one (on a model of the same shape) for its norm bound.
#[derive(Clone, Debug, Default)]
pub struct Prior {
    /// The round's median update norm (`clip = "centred"`: the median distance from its centre).
    pub median_norm: Option<f64>,
    /// The round's combined update, the next round's centre under `clip = "centred"`.
    pub centre: Option<std::sync::Arc<Vec<f32>>>,
}

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
    /// the round waits for (it sizes the trimmed mean's extremes); `prior` what the previous
    /// round on a model of this shape left, if there was one (the median norm bound and the
    /// centred one use it).
    pub fn start(
        robust: &RobustConfig,
        fold: Option<Fold>,
        reference: std::sync::Arc<Vec<f32>>,
        expected: usize,
        prior: &Prior,
    ) -> Option<StreamRound> {
        let fold = fold?;
        if !robust::streams(robust) {
            return None;
        }
        let bound = match (robust.clip, prior.median_norm) {
            (Clip::None, _) => Bound::Known(f64::INFINITY),
            (Clip::Fixed, _) => Bound::Known(robust.max_norm),
            (Clip::Median | Clip::Centred, Some(m)) if m > 0.0 && m.is_finite() => {
                Bound::Known(robust.clip_multiple * m)
            }
            (Clip::Median | Clip::Centred, _) => Bound::Pending(Vec::new()),
        };
        let centre = prior.centre.clone().filter(|v| {
            (robust.clip == Clip::Centred || robust.rule == Rule::DropFarthest)
                && v.len() == reference.len()
        });
        let centre_weights = match &centre {
            Some(v) if robust.rule == Rule::DropFarthest && robust.clip != Clip::Centred => {
                reference.iter().zip(v.iter()).map(|(g, v)| g + v).collect()
            }
            _ => Vec::new(),
        };
        let hold = if robust.rule == Rule::DropFarthest {
            robust::trim_count(robust.trim, expected.max(4)).clamp(1, robust.trim_max)
        } else {
            0
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
            centre,
            centre_weights,
            hold,
            farthest: Vec::new(),
            distances: Vec::new(),
            trim,
            samples: Vec::new(),
            summaries: Vec::new(),
            judged: Vec::new(),
            origin: Vec::new(),
            verdict_origin: Vec::new(),
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
            .map(|c| robust::update_norm(&self.reference, self.clip_centre(c), c))
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

    /// The centre the norm bound measures `c` from: `clip = "centred"` only, and never for votes
    /// (see [`robust::centre_for`]).
    fn clip_centre(&self, c: &Contribution) -> Option<&[f32]> {
        let used = self.robust.clip == Clip::Centred && c.kind != UploadKind::Votes;
        self.centre.as_deref().map(Vec::as_slice).filter(|_| used)
    }

    fn fold(&mut self, bound: f64, mut c: Contribution) -> Result<(), String> {
        let verdict = robust::bound_one(bound, &self.reference, self.clip_centre(&c), &mut c);
        if self.hold == 0 || c.kind == UploadKind::Votes {
            return self.fold_in(c, verdict);
        }
        // drop_farthest: the bounded update's distance from the centre, the farthest few wait.
        // Without a centre, or under the centred bound, that is what the bound measured times
        // what it kept (as the buffered rule computes it); otherwise one pass over the values,
        // a full-weights upload against the model plus the centre.
        let far = match &self.centre {
            Some(v) if self.robust.clip != Clip::Centred => match c.kind {
                UploadKind::Weights => robust::l2_distance(&c.values, Some(&self.centre_weights)),
                _ => robust::l2_distance(&c.values, Some(v)),
            },
            _ => verdict.norm * verdict.scale,
        };
        self.distances.push(far);
        if self.farthest.len() < self.hold {
            self.farthest.push((far, c, verdict));
            return Ok(());
        }
        let (nearest, _) = self
            .farthest
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.0.total_cmp(&b.1.0).then(b.0.cmp(&a.0)))
            .expect("holds at least one");
        if far > self.farthest[nearest].0 {
            let (_, c0, v0) = std::mem::replace(&mut self.farthest[nearest], (far, c, verdict));
            self.fold_in(c0, v0)
        } else {
            self.fold_in(c, verdict)
        }
    }

    fn fold_in(&mut self, mut c: Contribution, verdict: Verdict) -> Result<(), String> {
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
        self.verdict_origin.push(None);
        c.values = Vec::new();
        self.summaries.push(c);
        self.origin.push(None);
        Ok(())
    }

    /// drop_farthest at the round's end: of the held updates, the round's `⌊trim·n⌋` farthest
    /// that lie beyond `drop_multiple` × the median distance are dropped (their verdicts say
    /// rejected; they are not among the round's results) and the others folded. Returns the
    /// dropped clients.
    fn drop_farthest(&mut self) -> Result<Vec<u64>, String> {
        let mut held = std::mem::take(&mut self.farthest);
        let n = self.samples.len() + held.len();
        let k = robust::trim_count(self.robust.trim, n).min(self.robust.trim_max);
        let beyond = self.robust.drop_multiple * robust::median_of(&self.distances);
        // Farthest first; among equals the earliest held (arrival order), as the buffered rule.
        held.sort_by(|a, b| b.0.total_cmp(&a.0));
        let far = held.iter().take(k).filter(|h| h.0 > beyond).count();
        let back = held.split_off(far);
        for (_, c, v) in back {
            self.fold_in(c, v)?;
        }
        let mut gone = Vec::new();
        for (_, mut c, mut v) in held {
            v.rejected = true;
            gone.push(c.client);
            c.values = Vec::new();
            self.judged.push(v);
            self.verdict_origin.push(None);
            self.summaries.push(c);
            self.origin.push(None);
        }
        Ok(gone)
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
        let kept = verdicts.iter().filter(|v| !v.rejected).count();
        if sum.count as usize != summaries.len() || kept != summaries.len() {
            return Err(format!(
                "a partial of {} results carries {} summaries and {} verdicts of kept results",
                sum.count,
                summaries.len(),
                kept
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
        self.verdict_origin.extend(verdicts.iter().map(|_| Some(k)));
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
        self.summaries.len() + held + self.farthest.len()
    }

    pub fn finish(mut self) -> Result<Streamed, String> {
        self.settle_bound()?;
        let dropped = self.drop_farthest()?;
        let local = self.samples.len();
        let mut outside = vec![0u64; local];
        if let Some(t) = &self.trim {
            let j = robust::trim_count(self.robust.trim, local).min(t.k);
            if j > 0 {
                t.trim(
                    j,
                    self.robust.trim_ends,
                    &self.samples,
                    &mut self.sum,
                    &mut outside,
                );
            }
        }
        let len = self.reference.len().max(1) as f64;
        let own_verdicts = self
            .judged
            .iter_mut()
            .zip(&self.verdict_origin)
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
        let keep: Vec<bool> = self.verdict_origin.iter().map(|o| !gone(o)).collect();
        let mut flags = keep.iter();
        self.judged
            .retain(|_| *flags.next().expect("one per verdict"));
        let set_aside = left_out
            .into_iter()
            .filter_map(|i| if own { i.checked_sub(1) } else { Some(i) })
            .collect();
        // Dropped results are not the round's (as multi-Krum's rejected ones); their verdicts stay.
        self.summaries.retain(|c| !dropped.contains(&c.client));
        self.summaries.sort_by_key(|c| c.client);
        let mut combined = robust::finish_streamed(self.judged);
        if self.robust.clip == Clip::Centred || self.robust.rule == Rule::DropFarthest {
            // The next round's centre: the combined update (relative to the model).
            let kind = self.summaries.first().map(|c| c.kind);
            combined.delta = match (kind, sum.mean()) {
                (Some(UploadKind::Delta), Ok(m)) => m,
                (Some(UploadKind::Weights), Ok(m)) => m
                    .iter()
                    .zip(self.reference.iter())
                    .map(|(w, g)| w - g)
                    .collect(),
                _ => Vec::new(),
            };
        }
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

    /// Drops the `j` largest and smallest values of every coordinate from `sum` (`ends =
    /// "farthest"`: the `j` farthest from that two-sided trimmed mean), so that its mean is the
    /// trimmed mean (and its squares that mean squared, as every buffered result carries the
    /// combined update); counts each result's trimmed coordinates in `outside`.
    fn trim(
        &self,
        j: usize,
        ends: TrimEnds,
        samples: &[u64],
        sum: &mut RunningSum,
        outside: &mut [u64],
    ) {
        let k = self.k;
        let total = sum.weight;
        let count = sum.count as f64;
        let dropped = |slots: &[(f32, u32)]| {
            slots.iter().fold((0f64, 0f64), |(s, w), &(x, i)| {
                let wi = samples[i as usize] as f64;
                (s + wi * x as f64, w + wi)
            })
        };
        let mean_without = |c: usize, (s, w): (f64, f64), sum: &RunningSum| {
            let kept = total - w;
            if kept > 0.0 {
                (sum.weighted[c] - s) / kept
            } else {
                0.0
            }
        };
        for c in 0..sum.weighted.len() {
            let high = &self.high[c * k..c * k + j];
            let low = &self.low[c * k..c * k + j];
            let (sh, wh) = dropped(high);
            let (sl, wl) = dropped(low);
            let centre = mean_without(c, (sh + sl, wh + wl), sum);
            let (high, low) = match ends {
                TrimEnds::Both => (high, low),
                TrimEnds::Farthest => {
                    let from_low =
                        robust::farthest(centre, |i| low[i].0 as f64, |i| high[i].0 as f64, j);
                    (&high[..j - from_low], &low[..from_low])
                }
            };
            let mean = match ends {
                TrimEnds::Both => centre,
                TrimEnds::Farthest => {
                    let (a, b) = (dropped(high), dropped(low));
                    mean_without(c, (a.0 + b.0, a.1 + b.1), sum)
                }
            };
            for &(_, i) in high.iter().chain(low) {
                outside[i as usize] += 1;
            }
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
            let (judged, combined_b) =
                robust::apply(robust, &reference, None, results.clone()).unwrap();
            buffered.aggregate(round, &mut gb, &judged, &ctx).unwrap();

            let mut stream =
                StreamRound::start(robust, fold, reference.clone(), 9, &Prior::default())
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
                "{name} round {round}: streamed differs from buffered by {worst} ({})",
                robust.describe()
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
        // The trimmed mean (9 results: one value from each end), unbounded and with a fixed
        // bound: the streamed extremes trim what the buffered rule does.
        let trimmed = RobustConfig {
            clip: Clip::None,
            ..RobustConfig::trimmed_mean()
        };
        let trimmed_fixed = RobustConfig {
            clip: Clip::Fixed,
            max_norm: 0.5,
            ..RobustConfig::trimmed_mean()
        };
        // Dropping the farthest value instead, from either end.
        let farthest = RobustConfig {
            trim_ends: TrimEnds::Farthest,
            ..trimmed_fixed.clone()
        };
        // Whole updates dropped: the farthest from zero (no earlier round here). Unbounded: a
        // bound makes the clipped updates tie in distance, and ties may go either way.
        let dropping = RobustConfig {
            rule: Rule::DropFarthest,
            ..mean.clone()
        };
        for robust in [
            &mean,
            &fixed,
            &trimmed,
            &trimmed_fixed,
            &farthest,
            &dropping,
        ] {
            both_paths("fedavg", UploadKind::Weights, robust, false);
            both_paths("fedavgm", UploadKind::Delta, robust, false);
            both_paths("autoflip", UploadKind::Delta, robust, false);
            both_paths("hidenseek", UploadKind::Votes, robust, true);
        }
    }

    fn streamed(robust: &RobustConfig, results: &[Contribution], prior: Option<f64>) -> Streamed {
        let prior = Prior {
            median_norm: prior,
            centre: None,
        };
        streamed_after(robust, results, &prior)
    }

    fn streamed_after(robust: &RobustConfig, results: &[Contribution], prior: &Prior) -> Streamed {
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
            ..RobustConfig::trimmed_mean()
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
    fn the_farthest_trim_drops_a_one_sided_attacker_and_one_value_of_an_honest_round() {
        // Four results: an attacker far below (−10) is the farthest from the two-sided trimmed
        // mean (1.5), so the honest three are kept whole (mean 2), where the classic trim would
        // drop the largest honest value as well (mean 1.5). An honest round with a long tail
        // (0, 1, 2, 10) loses its farthest value only: (0 + 1 + 2) / 3.
        let farthest = RobustConfig {
            clip: Clip::None,
            trim_ends: TrimEnds::Farthest,
            ..RobustConfig::trimmed_mean()
        };
        let both = RobustConfig {
            trim_ends: TrimEnds::Both,
            ..farthest.clone()
        };
        let attacked: Vec<Contribution> = [-10.0, 1.0, 2.0, 3.0]
            .iter()
            .enumerate()
            .map(|(i, v)| delta(i as u64 + 1, 1, vec![*v, -*v]))
            .collect();
        let tail: Vec<Contribution> = [0.0, 1.0, 2.0, 10.0]
            .iter()
            .enumerate()
            .map(|(i, v)| delta(i as u64 + 1, 1, vec![*v]))
            .collect();
        for (results, f, b) in [(&attacked, 2.0, 1.5), (&tail, 1.0, 1.5)] {
            let s = streamed(&farthest, results, None).sum.mean().unwrap()[0];
            let c = streamed(&both, results, None).sum.mean().unwrap()[0];
            assert!((s - f).abs() < 1e-6, "farthest: {s}");
            assert!((c - b).abs() < 1e-6, "both ends: {c}");
            let inputs: Vec<robust::Input> = results
                .iter()
                .map(|c| robust::Input {
                    client: c.client,
                    samples: c.samples,
                    delta: &c.values,
                })
                .collect();
            let buffered = robust::combine(&farthest, &inputs).unwrap().delta[0];
            assert!((buffered - f).abs() < 1e-6, "buffered farthest: {buffered}");
        }
        // Only the attacker's values were dropped (far below on one coordinate, far above on
        // the other).
        let s = streamed(&farthest, &attacked, None);
        let outside: Vec<f64> = s.combined.verdicts.iter().map(|v| v.outside).collect();
        assert_eq!(outside, vec![1.0, 0.0, 0.0, 0.0]);
        assert!((s.sum.mean().unwrap()[1] + 2.0).abs() < 1e-6);
    }

    /// The clients whose updates a streamed round rejected.
    fn rejected(s: &Streamed) -> Vec<u64> {
        let v = &s.combined.verdicts;
        v.iter().filter(|v| v.rejected).map(|v| v.client).collect()
    }

    #[test]
    fn drop_farthest_leaves_out_the_update_farthest_from_the_last_round() {
        // The last round moved by (1, 1). Of five updates the one farthest from there (a sign
        // flip, (−3, −3)) is dropped whole and the others averaged as they are; an honest
        // update with a large norm but close to (1, 1) stays. Measured from zero (no earlier
        // round) the large honest one would be the farthest instead.
        let rule = RobustConfig {
            rule: Rule::DropFarthest,
            ..RobustConfig::plain()
        };
        let results = vec![
            delta(1, 1, vec![1.0, 1.0]),
            delta(2, 1, vec![-3.0, -3.0]),
            delta(3, 1, vec![0.5, 1.5]),
            delta(4, 1, vec![3.5, 3.5]),
            delta(5, 1, vec![1.5, 0.5]),
        ];
        let prior = Prior {
            median_norm: None,
            centre: Some(Arc::new(vec![1.0, 1.0])),
        };
        for order in [[0, 1, 2, 3, 4], [3, 4, 1, 0, 2]] {
            let arriving: Vec<Contribution> = order.iter().map(|&i| results[i].clone()).collect();
            let s = streamed_after(&rule, &arriving, &prior);
            let mean = s.sum.mean().unwrap();
            assert!((mean[0] - 1.625).abs() < 1e-6, "{mean:?}");
            assert_eq!(rejected(&s), vec![2]);
            let ids: Vec<u64> = s.results.iter().map(|c| c.client).collect();
            assert_eq!(
                ids,
                vec![1, 3, 4, 5],
                "the dropped result is not the round's"
            );
            assert_eq!(s.combined.delta, mean, "the next round's centre");
        }
        // The same as full-weights uploads on a model at (5, 5): measured against model + centre.
        let mut round = StreamRound::start(
            &rule,
            Some(Fold::default()),
            Arc::new(vec![5.0, 5.0]),
            5,
            &prior,
        )
        .unwrap();
        for c in &results {
            round
                .add(Contribution {
                    kind: UploadKind::Weights,
                    values: c.values.iter().map(|x| x + 5.0).collect(),
                    ..c.clone()
                })
                .unwrap();
        }
        let s = round.finish().unwrap();
        assert_eq!(rejected(&s), vec![2]);
        assert!((s.sum.mean().unwrap()[0] - 6.625).abs() < 1e-6);
        assert!(
            (s.combined.delta[0] - 1.625).abs() < 1e-6,
            "the centre is an update"
        );
        let (out, combined) =
            robust::apply(&rule, &[0.0, 0.0], Some(&[1.0, 1.0]), results.clone()).unwrap();
        assert_eq!(out.len(), 4);
        assert!((combined.delta[0] - 1.625).abs() < 1e-6);
        // From zero, (3.5, 3.5) is the farthest.
        let s = streamed_after(&rule, &results, &Prior::default());
        assert_eq!(rejected(&s), vec![4]);
        // Three results: nothing dropped.
        let s = streamed_after(&rule, &results[..3], &prior);
        assert_eq!(s.sum.count, 3);
        // Four honest updates, none beyond 2× the median distance: none dropped, although one
        // of them is the farthest (a non-IID client is not left out round after round).
        let honest = vec![
            results[0].clone(),
            results[2].clone(),
            results[4].clone(),
            delta(6, 1, vec![1.2, 1.2]),
        ];
        let s = streamed_after(&rule, &honest, &prior);
        assert_eq!(s.sum.count, 4);
        assert!(s.combined.verdicts.iter().all(|v| !v.rejected));
    }

    #[test]
    fn centred_clipping_bounds_the_distance_from_the_previous_update() {
        // The previous round moved by (1, 1); honest updates near it pass untouched, and an
        // attacker at (−10, −10) is pulled back to within 2 (the bound: 2 × the prior median
        // distance 1) of (1, 1), not of zero. Without a centre the same bound would be on norms
        // and clip the honest updates too.
        let centred = RobustConfig {
            clip: Clip::Centred,
            clip_multiple: 2.0,
            ..RobustConfig::plain()
        };
        let results = vec![
            delta(1, 1, vec![1.5, 1.0]),
            delta(2, 1, vec![1.0, 0.5]),
            delta(3, 1, vec![0.5, 1.5]),
            delta(4, 1, vec![-10.0, -10.0]),
        ];
        let prior = Prior {
            median_norm: Some(1.0),
            centre: Some(Arc::new(vec![1.0, 1.0])),
        };
        let s = streamed_after(&centred, &results, &prior);
        let clipped: Vec<bool> = s.combined.verdicts.iter().map(|v| v.clipped).collect();
        assert_eq!(clipped, vec![false, false, false, true]);
        let pulled = 1.0 - 2.0 / 2f32.sqrt(); // (1, 1) + 2 · (−1, −1)/√2
        let want = (1.5 + 1.0 + 0.5 + pulled) / 4.0;
        let mean = s.sum.mean().unwrap();
        assert!((mean[0] - want).abs() < 1e-5, "{mean:?} against {want}");
        // The round's combined update is the next round's centre.
        assert_eq!(s.combined.delta, mean);
        // The buffered layer, given the same centre, measures the same distances.
        let (out, combined) =
            robust::apply(&centred, &[0.0, 0.0], Some(&[1.0, 1.0]), results.clone()).unwrap();
        let norms: Vec<f64> = combined.verdicts.iter().map(|v| v.norm).collect();
        let streamed_norms: Vec<f64> = s.combined.verdicts.iter().map(|v| v.norm).collect();
        assert_eq!(norms, streamed_norms);
        assert_eq!(out[..3], results[..3], "honest updates untouched");
        assert!(combined.verdicts[3].clipped);
        // A centre of another length (the model changed shape) or none: norms from zero.
        let other = Prior {
            median_norm: Some(1.0),
            centre: Some(Arc::new(vec![1.0; 3])),
        };
        let s = streamed_after(&centred, &results, &other);
        assert!(s.combined.verdicts.iter().filter(|v| v.clipped).count() == 1);
        assert!((s.combined.verdicts[0].norm - (1.5f64.powi(2) + 1.0).sqrt()).abs() < 1e-6);
        // Votes are never measured from a centre.
        let votes: Vec<Contribution> = results
            .iter()
            .map(|c| Contribution {
                kind: UploadKind::Votes,
                values: vec![1.0, -1.0],
                ..c.clone()
            })
            .collect();
        let s = streamed_after(&centred, &votes, &prior);
        assert!(
            s.combined
                .verdicts
                .iter()
                .all(|v| (v.norm - 2f64.sqrt()).abs() < 1e-9)
        );
        assert!(s.combined.delta.is_empty());
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
            ..RobustConfig::trimmed_mean()
        };
        let reference = vec![0.0; 32];
        let (judged, _) = robust::apply(&robust, &reference, None, results.clone()).unwrap();
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
        let start = |r: &RobustConfig, fold| {
            StreamRound::start(r, fold, reference.clone(), 4, &Prior::default())
        };
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
                &Prior {
                    median_norm: Some(spread),
                    centre: None,
                },
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
