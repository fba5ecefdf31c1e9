//! Robust aggregation: one layer every strategy shares, between result acceptance and the
//! strategy's own aggregation.
//!
//! It works on update vectors relative to the round's global model (a full-weights upload
//! becomes `weights − global` first), so the same rules serve FedAvg's weights, FedAvgM's and
//! AutoFLIP's deltas (sparse ones included: entries a client did not send are zeros, exactly as
//! the plain mean sees them) and structured pruning's shrinking models (all updates of one round
//! have the model length of that round; what is kept between rounds, the median norm and the
//! centre, is dropped when the model changes shape).
//!
//! Two stages, configured by the TOML section `[aggregation]` ([`RobustConfig`]):
//!
//! 1. **Norm bounding** (`clip`): every update whose L2 norm exceeds the bound is scaled down to
//!    it. The bound is `clip_multiple ×` the round's median norm (`clip = "median"`), or a fixed
//!    `max_norm` (`clip = "fixed"`); `clip = "centred"` bounds each update's distance from the
//!    previous round's combined update instead (centred clipping).
//! 2. **The rule** that combines the (bounded) updates:
//!    - `mean`: the sample-weighted mean (FedAvg's own rule).
//!    - `drop_farthest`: the sample-weighted mean of the updates left when those farther from
//!      the previous round's combined update than `drop_multiple` × the round's median distance
//!      are dropped whole (at most `⌊trim·n⌋`, at least one from 4 results, at most `trim_max`).
//!    - `median`: the coordinate-wise median, one vote per client.
//!    - `trimmed_mean`: per coordinate, drop the `⌊trim·n⌋` largest and smallest values (at
//!      least one of each once n ≥ 4, unless `trim = 0`; [`trim_count`]; `trim_ends =
//!      "farthest"`: that many in all, the farthest from the two-sided trimmed mean) and take
//!      the sample-weighted mean of the rest.
//!    - `multi_krum`: score each update by the summed squared distances to its `n − f − 2`
//!      nearest neighbours, keep the `n − f` best scored and take their sample-weighted mean
//!      (`f = ⌊attackers·n⌋`).
//!
//! What each tolerates (n = results in the round; "attackers" send anything finite):
//!
//! | stage | assumption | leaves through |
//! |---|---|---|
//! | clip, median multiple | fewer than half the updates are attackers' (the median norm is an honest one) | attacks within the bound: sign flips, label flips, noise of honest size; a bounded push per attacker every round |
//! | clip, fixed bound | none on the count; needs a bound that fits honest updates (it depends on model, lr and epochs) | the same |
//! | drop farthest | at most ⌊trim·n⌋ (≤ `trim_max`) attackers far from where the run is heading, and an honest median distance | attackers near the honest spread (label flips, noise of honest size); more far attackers than it may drop (bounded by the clip) |
//! | median | fewer than half the clients per coordinate | non-IID honest clients lose weight too; ignores sample counts |
//! | trimmed mean, `trim` = β | at most β·n attackers (β < 0.5) | more than β·n attackers on one side |
//! | multi-Krum, `attackers` = f/n | at most f attackers and n ≥ 2f + 3 (f is lowered to fit smaller rounds) | attackers close to the honest cluster (small sign flips, label flips) |
//!
//! Sign-vote methods (HideNseek and the binary supermask upload votes, ±1 per kept entry): the
//! layer combines the vote vectors as they are. Every client has exactly one vote per coordinate,
//! so magnitude attacks are void by construction and the median-norm bound does nothing (vote
//! vectors all have the same norm); no centre is used and `drop_farthest` drops no votes (all
//! lie at one distance), so it is their plain sum; the coordinate-wise median of votes is the
//! unweighted majority vote itself (a tie gives 0), and multi-Krum on votes is Krum on Hamming
//! distances. What a vote cannot stop is a coordinated minority flipping close votes.
//!
//! **The default** (what `canopy serve` does with no config file): the median norm bound at 3×,
//! then `drop_farthest` (trim 0.1, 2× the median distance). Both stream. It replaced the
//! trimmed mean at 0.1, which cost 6.9 points on a clean non-IID run of 30 clients (it drops the
//! extremes of every coordinate, and on non-IID shards those are often the only clients holding
//! a class) and 7.25 against one sign flipper of 4 (docs/src/robust.md has the tables).
//!
//! Memory: the mean, `drop_farthest` and the trimmed mean stream (each result folded into
//! running sums as it arrives, then dropped; [`streams`], [`crate::aggregate::stream`]). A
//! streamed round bounds norms by the previous round's median norm (the first round, or the
//! first after the model changed shape, holds its first few results to find one);
//! `drop_farthest` holds its `trim_max` farthest updates until the round ends (3 × model); the
//! trimmed mean keeps the `trim_max` largest and smallest values of every coordinate besides the
//! sums (2·`trim_max` values per parameter), so it trims exactly what the buffered rule would as
//! long as ⌊trim·n⌋ ≤ `trim_max`, and `trim_max` from each end in bigger rounds (the norm bound
//! still caps what each remaining update can do). The median and multi-Krum need the round's
//! updates together, so the server keeps them all (clients × model) until the round ends. A
//! centre (`clip = "centred"`, `drop_farthest`) is one more model-sized vector kept between
//! rounds.
//!
//! Every update gets a [`Verdict`]: its norm (distance from the centre under `clip =
//! "centred"`) and that ÷ the round's median, its clipping factor, and whether it was clipped,
//! down-weighted (coordinate-wise rules: most of its coordinates fell outside the values the rule
//! used) or rejected (multi-Krum left it out, or `drop_farthest` dropped it).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::aggregate::Contribution;
use crate::codec::update::UploadKind;
use crate::metric_keys as keys;

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    #[default]
    Mean,
    Median,
    TrimmedMean,
    MultiKrum,
    /// The sample-weighted mean of the updates left when those farther from the previous
    /// round's combined update (the centre; zero in a first round) than `drop_multiple` × the
    /// round's median distance are dropped whole: at most the `⌊trim·n⌋` farthest (at least
    /// one from 4 results, at most `trim_max`). It judges whole updates, so an honest non-IID
    /// client keeps every coordinate of its update unless the whole update is far off; it
    /// streams, holding only the farthest few.
    DropFarthest,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Clip {
    #[default]
    None,
    /// Bound = `clip_multiple` × the round's median update norm.
    Median,
    /// Bound = `max_norm`.
    Fixed,
    /// Centred clipping: each update's distance from the previous round's combined update (the
    /// centre) is bounded to `clip_multiple` × the round's median distance, so an update is
    /// pulled towards where the run was heading rather than towards zero (Karimireddy, He and
    /// Jaggi, ICML 2021, one step). The first round, or the first after the model changed
    /// shape, has no centre and bounds norms as `median` does.
    Centred,
}

/// Which values the trimmed mean drops from a coordinate.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TrimEnds {
    /// `k` from each end (the classic trimmed mean).
    #[default]
    Both,
    /// `k` in all: those farthest from the two-sided trimmed mean, from whichever end they
    /// are. An attacker on one side is dropped as by `both` without the honest value at the
    /// other end (1 sign flipper of 4 on non-IID digits: −2.15 points against −7.25), but on
    /// skewed coordinates it always drops the long tail's end, which costs more on clean
    /// non-IID rounds of 10 or more (measured in docs/src/robust.md).
    Farthest,
}

/// The `[aggregation]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RobustConfig {
    /// How the round's updates are combined: the plain (weighted) `mean`, `drop_farthest`
    /// (`drop_multiple`, `trim`, `trim_max`), coordinate by coordinate the `median` or the
    /// `trimmed_mean` (`trim`, `trim_ends`, `trim_max`), or `multi_krum` (`attackers`). The
    /// default is a defence: see docs/src/robust.md.
    pub rule: Rule,
    pub clip: Clip,
    /// `clip = "median"` (`"centred"`): the bound as a multiple of the round's median norm
    /// (median distance from the centre; > 0).
    pub clip_multiple: f64,
    /// `clip = "fixed"`: the L2 bound on each update (> 0).
    pub max_norm: f64,
    /// `trimmed_mean`: fraction of values dropped at each end of every coordinate;
    /// `drop_farthest`: the most updates dropped, as a fraction of the round; in [0, 0.5).
    pub trim: f64,
    /// `multi_krum`: the fraction of attackers assumed among a round's results, in [0, 0.5).
    pub attackers: f64,
    /// `drop_farthest`: an update is dropped only when it is farther from the centre than this
    /// multiple of the round's median distance (> 0).
    pub drop_multiple: f64,
    /// `trimmed_mean`: drop `k` = ⌊trim·n⌋ values from `both` ends of every coordinate, or the
    /// `farthest` `k` in all from the two-sided trimmed mean.
    pub trim_ends: TrimEnds,
    /// `trimmed_mean`, streamed: at most this many values are trimmed from each end of a
    /// coordinate (memory: 2·`trim_max` values per parameter besides the sums);
    /// `drop_farthest`: at most this many updates are dropped (held back until the round ends:
    /// `trim_max` × the model); ≥ 1.
    pub trim_max: usize,
    /// Fold each result into running sums as it arrives (when the strategy and the rule allow:
    /// see [`streams`]); `false` keeps every update until the round ends (for comparisons).
    pub streaming: bool,
}

impl Default for RobustConfig {
    /// The defence that is on unless a config says otherwise: every update bounded to 3× the
    /// median norm, then the mean of the updates left when those farther than 2× the round's
    /// median distance from the previous round's update are dropped (at most ⌊0.1·n⌋, at least
    /// one from 4 results, at most 3). It streams.
    fn default() -> Self {
        RobustConfig {
            rule: Rule::DropFarthest,
            clip: Clip::Median,
            ..RobustConfig::plain()
        }
    }
}

impl RobustConfig {
    /// No defence: FedAvg's sample-weighted mean, nothing bounded (verdicts are still reported).
    /// The papers' setting, for method comparisons (`rule = "mean"`, `clip = "none"`).
    pub fn plain() -> Self {
        RobustConfig {
            rule: Rule::Mean,
            clip: Clip::None,
            clip_multiple: 3.0,
            max_norm: 0.0,
            trim: 0.1,
            attackers: 0.2,
            trim_max: 3,
            trim_ends: TrimEnds::Both,
            drop_multiple: 2.0,
            streaming: true,
        }
    }

    /// Every update bounded to 3× the median norm, then the trimmed mean at 0.1: the default
    /// until 2026-12-08 (`--defences trimmed-mean+clip` in `canopy attack`).
    pub fn trimmed_mean() -> Self {
        RobustConfig {
            rule: Rule::TrimmedMean,
            clip: Clip::Median,
            ..RobustConfig::plain()
        }
    }

    /// Every update bounded to 3× the median norm, then the mean.
    pub fn norm_bound() -> Self {
        RobustConfig {
            clip: Clip::Median,
            ..RobustConfig::plain()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if matches!(self.clip, Clip::Median | Clip::Centred)
            && !(self.clip_multiple > 0.0 && self.clip_multiple.is_finite())
        {
            return Err(format!(
                "aggregation.clip_multiple must be positive, got {}",
                self.clip_multiple
            ));
        }
        if self.clip == Clip::Fixed && !(self.max_norm > 0.0 && self.max_norm.is_finite()) {
            return Err(format!(
                "aggregation.clip = \"fixed\" needs a positive max_norm, got {}",
                self.max_norm
            ));
        }
        if !(0.0..0.5).contains(&self.trim) {
            return Err(format!(
                "aggregation.trim must be in [0, 0.5), got {}",
                self.trim
            ));
        }
        if !(self.drop_multiple > 0.0 && self.drop_multiple.is_finite()) {
            return Err(format!(
                "aggregation.drop_multiple must be positive, got {}",
                self.drop_multiple
            ));
        }
        if self.trim_max == 0 {
            return Err("aggregation.trim_max must be at least 1".into());
        }
        if !(0.0..0.5).contains(&self.attackers) {
            return Err(format!(
                "aggregation.attackers must be in [0, 0.5), got {}",
                self.attackers
            ));
        }
        Ok(())
    }

    /// A short name for tables and logs ("median-clip 3× + mean").
    pub fn describe(&self) -> String {
        let rule = match self.rule {
            Rule::Mean => "mean".to_string(),
            Rule::Median => "median".to_string(),
            Rule::TrimmedMean if self.trim_ends == TrimEnds::Farthest => {
                format!("trimmed mean {} (farthest)", self.trim)
            }
            Rule::TrimmedMean => format!("trimmed mean {}", self.trim),
            Rule::MultiKrum => format!("multi-Krum f={}", self.attackers),
            Rule::DropFarthest => format!(
                "mean without the farthest {} beyond {}× median",
                self.trim, self.drop_multiple
            ),
        };
        match self.clip {
            Clip::None => rule,
            Clip::Median => format!("norm bound {}× median + {rule}", self.clip_multiple),
            Clip::Centred => format!("centred clip {}× median + {rule}", self.clip_multiple),
            Clip::Fixed => format!("norm bound {} + {rule}", self.max_norm),
        }
    }
}

/// What the layer did to one client's update this round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub client: u64,
    /// L2 norm of the update as received (relative to the global model).
    pub norm: f64,
    /// `norm` ÷ the round's median norm (capped at 1e9).
    pub norm_ratio: f64,
    /// Factor the norm bound multiplied the update by (1: untouched).
    pub scale: f64,
    /// Coordinate-wise rules: the share of its coordinates that fell outside the values the rule
    /// used (0 for the other rules).
    pub outside: f64,
    pub clipped: bool,
    pub down_weighted: bool,
    pub rejected: bool,
}

impl Verdict {
    /// The strongest thing done: "rejected", "down-weighted", "clipped" or "kept".
    pub fn action(&self) -> &'static str {
        if self.rejected {
            "rejected"
        } else if self.down_weighted {
            "down-weighted"
        } else if self.clipped {
            "clipped"
        } else {
            "kept"
        }
    }
}

/// What the layer has done to one client over the run: shown on the dashboard's client table
/// and in the metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Suspicion {
    /// Results judged (accepted by validation and passed through the layer).
    pub judged: u32,
    pub clipped: u32,
    pub down_weighted: u32,
    pub rejected: u32,
    /// Norm ÷ the round's median norm in its latest judged round, and the largest seen.
    pub last_norm_ratio: f64,
    pub max_norm_ratio: f64,
}

impl Suspicion {
    pub fn record(&mut self, v: &Verdict) {
        self.judged += 1;
        self.clipped += v.clipped as u32;
        self.down_weighted += v.down_weighted as u32;
        self.rejected += v.rejected as u32;
        self.last_norm_ratio = v.norm_ratio;
        self.max_norm_ratio = self.max_norm_ratio.max(v.norm_ratio);
    }
}

/// Per-round figures for the metrics: how many updates each stage acted on, and the median norm.
pub fn round_metrics(c: &Combined) -> Vec<(String, f64)> {
    let count = |f: fn(&Verdict) -> bool| c.verdicts.iter().filter(|v| f(v)).count() as f64;
    vec![
        (keys::ROBUST_MEDIAN_NORM.into(), c.median_norm),
        (keys::ROBUST_CLIPPED.into(), count(|v| v.clipped)),
        (
            keys::ROBUST_DOWN_WEIGHTED.into(),
            count(|v| v.down_weighted),
        ),
        (keys::ROBUST_REJECTED.into(), count(|v| v.rejected)),
        (
            keys::ROBUST_MAX_NORM_RATIO.into(),
            c.verdicts.iter().map(|v| v.norm_ratio).fold(0.0, f64::max),
        ),
    ]
}

/// One update going into [`combine`].
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub client: u64,
    /// Aggregation weight.
    pub samples: u64,
    /// Relative to the global model.
    pub delta: &'a [f32],
}

#[derive(Clone, Debug, PartialEq)]
pub struct Combined {
    /// The combined update (relative to the model). A streamed round leaves it empty (the
    /// strategy aggregates the sums) unless `clip = "centred"` needs it as the next centre.
    pub delta: Vec<f32>,
    /// In input order.
    pub verdicts: Vec<Verdict>,
    pub median_norm: f64,
}

/// A coordinate-wise median client counts as down-weighted when more than this share of its
/// coordinates lie outside the middle half of the values (an honest client: about half, at most
/// two thirds in rounds of 3 or 6).
pub const MEDIAN_OUTSIDE_SUSPICIOUS: f64 = 0.75;
/// A trimmed-mean client counts as down-weighted when more than this share of its coordinates
/// were trimmed (an honest client: about 2·trim).
pub const TRIMMED_SUSPICIOUS: f64 = 0.5;

/// Combines the updates by `config`. Every input must have the same length.
pub fn combine(config: &RobustConfig, inputs: &[Input]) -> Result<Combined, String> {
    combine_around(config, inputs, None)
}

/// [`combine`], with `drop_farthest` measuring distances from `centre` (from zero without one).
pub fn combine_around(
    config: &RobustConfig,
    inputs: &[Input],
    centre: Option<&[f32]>,
) -> Result<Combined, String> {
    config.validate()?;
    let n = inputs.len();
    if n == 0 {
        return Err("nothing to aggregate".into());
    }
    let len = inputs[0].delta.len();
    if let Some(i) = inputs.iter().position(|u| u.delta.len() != len) {
        return Err(format!(
            "update of client {} has {} values, the first has {len}",
            inputs[i].client,
            inputs[i].delta.len()
        ));
    }
    let norms: Vec<f64> = inputs.iter().map(|u| norm(u.delta)).collect();
    let median_norm = median_of(&norms);
    let bound = match config.clip {
        Clip::None => f64::INFINITY,
        Clip::Median | Clip::Centred => config.clip_multiple * median_norm,
        Clip::Fixed => config.max_norm,
    };
    let scales: Vec<f64> = norms
        .iter()
        .map(|&nm| if nm > bound { bound / nm } else { 1.0 })
        .collect();
    let mut verdicts: Vec<Verdict> = inputs
        .iter()
        .zip(&norms)
        .zip(&scales)
        .map(|((u, &nm), &s)| Verdict {
            client: u.client,
            norm: nm,
            norm_ratio: ratio(nm, median_norm),
            scale: s,
            outside: 0.0,
            clipped: s < 1.0,
            down_weighted: false,
            rejected: false,
        })
        .collect();
    let weights: Vec<f64> = inputs.iter().map(|u| u.samples as f64).collect();
    let delta = match config.rule {
        Rule::Mean => weighted_mean(inputs, &scales, &weights, &vec![true; n]),
        Rule::MultiKrum => {
            let selected = multi_krum(inputs, &scales, config.attackers);
            for (v, s) in verdicts.iter_mut().zip(&selected) {
                v.rejected = !s;
            }
            weighted_mean(inputs, &scales, &weights, &selected)
        }
        Rule::DropFarthest => {
            let k = trim_count(config.trim, n).min(config.trim_max);
            let far: Vec<f64> = inputs
                .iter()
                .zip(&scales)
                .map(|(u, &s)| bounded_distance(u.delta, s, centre))
                .collect();
            let mut order: Vec<usize> = (0..n).collect();
            // Farthest first; among equals the earliest, as the streamed rule keeps them.
            order.sort_by(|&a, &b| far[b].total_cmp(&far[a]).then(a.cmp(&b)));
            let beyond = config.drop_multiple * median_of(&far);
            let mut selected = vec![true; n];
            for &i in order[..k].iter().filter(|&&i| far[i] > beyond) {
                selected[i] = false;
                verdicts[i].rejected = true;
            }
            weighted_mean(inputs, &scales, &weights, &selected)
        }
        Rule::Median | Rule::TrimmedMean => {
            let (delta, outside) = coordinate_wise(config, inputs, &scales, &weights);
            let limit = if config.rule == Rule::Median {
                MEDIAN_OUTSIDE_SUSPICIOUS
            } else {
                TRIMMED_SUSPICIOUS
            };
            for (v, o) in verdicts.iter_mut().zip(outside) {
                v.outside = o;
                v.down_weighted = o > limit;
            }
            delta
        }
    };
    Ok(Combined {
        delta,
        verdicts,
        median_norm,
    })
}

/// ‖scale·x − centre‖ (‖scale·x‖ without a centre): how far a bounded update lies from the
/// centre `drop_farthest` measures from.
pub fn bounded_distance(x: &[f32], scale: f64, centre: Option<&[f32]>) -> f64 {
    match centre {
        None => scale * norm(x),
        Some(c) => x
            .iter()
            .zip(c)
            .map(|(x, c)| {
                let d = (*x as f64) * scale - *c as f64;
                d * d
            })
            .sum::<f64>()
            .sqrt(),
    }
}

fn norm(v: &[f32]) -> f64 {
    l2_distance(v, None)
}

/// ‖a − b‖ (‖a‖ without `b`) in f64, over eight running sums: one sum is a chain of dependent
/// additions (four cycles each), eight let the compiler use vector lanes. The round loop takes
/// every result's norm, so on a large round this is a good part of its work.
pub fn l2_distance(a: &[f32], b: Option<&[f32]>) -> f64 {
    const LANES: usize = 8;
    let mut lanes = [0f64; LANES];
    let mut rest = 0f64;
    match b {
        None => {
            let chunks = a.chunks_exact(LANES);
            for x in chunks.remainder() {
                rest += *x as f64 * *x as f64;
            }
            for c in chunks {
                for (lane, x) in lanes.iter_mut().zip(c) {
                    *lane += *x as f64 * *x as f64;
                }
            }
        }
        Some(b) => {
            let n = a.len().min(b.len());
            let (a, b) = (&a[..n], &b[..n]);
            let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
            for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
                let d = (x - y) as f64;
                rest += d * d;
            }
            for (c, g) in ca.zip(cb) {
                for ((lane, x), y) in lanes.iter_mut().zip(c).zip(g) {
                    let d = (x - y) as f64;
                    *lane += d * d;
                }
            }
        }
    }
    (lanes.iter().sum::<f64>() + rest).sqrt()
}

fn ratio(norm: f64, median: f64) -> f64 {
    if median > 0.0 {
        (norm / median).min(1e9)
    } else if norm > 0.0 {
        1e9
    } else {
        1.0
    }
}

/// The median (the mean of the two middle values for an even count).
pub fn median_of(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// `trim_ends = "farthest"`: of the `k` values to drop, how many come from the low end. `lows`
/// are a coordinate's smallest values from the smallest up, `highs` its largest from the
/// largest down (at least `k` of each, disjoint), `centre` its two-sided trimmed mean. The value
/// farthest from the centre is always at one of the two ends, so each step drops the farther
/// end's; a tie (within rounding, so that the buffered and the streamed sums agree) drops the
/// high one.
pub fn farthest(
    centre: f64,
    lows: impl Fn(usize) -> f64,
    highs: impl Fn(usize) -> f64,
    k: usize,
) -> usize {
    let (mut lo, mut hi) = (0, 0);
    while lo + hi < k {
        let (l, h) = (lows(lo), highs(hi));
        let tie = 1e-9 * (l.abs() + h.abs() + centre.abs());
        if centre - l > h - centre + tie {
            lo += 1;
        } else {
            hi += 1;
        }
    }
    lo
}

/// How many values the trimmed mean drops from each end of a coordinate in a round of `n`:
/// ⌊trim·n⌋, at least one once `n` ≥ 4 (unless `trim` is 0), and never so many that nothing is
/// left.
pub fn trim_count(trim: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let mut k = (trim * n as f64).floor() as usize;
    if trim > 0.0 && n >= 4 {
        k = k.max(1);
    }
    k.min((n - 1) / 2)
}

/// Σ w_i s_i x_i / Σ w_i over the selected inputs (plain mean when their weights sum to 0).
fn weighted_mean(inputs: &[Input], scales: &[f64], weights: &[f64], selected: &[bool]) -> Vec<f32> {
    let len = inputs[0].delta.len();
    let total: f64 = weights
        .iter()
        .zip(selected)
        .filter(|(_, s)| **s)
        .map(|(w, _)| w)
        .sum();
    let count = selected.iter().filter(|s| **s).count().max(1) as f64;
    let mut acc = vec![0f64; len];
    for (i, u) in inputs.iter().enumerate() {
        if !selected[i] {
            continue;
        }
        let w = if total > 0.0 {
            weights[i] / total
        } else {
            1.0 / count
        } * scales[i];
        for (a, x) in acc.iter_mut().zip(u.delta) {
            *a += w * *x as f64;
        }
    }
    acc.into_iter().map(|a| a as f32).collect()
}

/// Which inputs multi-Krum keeps.
fn multi_krum(inputs: &[Input], scales: &[f64], attackers: f64) -> Vec<bool> {
    let n = inputs.len();
    if n < 3 {
        return vec![true; n];
    }
    // Krum needs n ≥ 2f + 3; a smaller round assumes fewer attackers.
    let f = ((attackers * n as f64).floor() as usize).min((n - 3) / 2);
    let neighbours = n - f - 2;
    let mut dist = vec![0f64; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let (a, b, sa, sb) = (inputs[i].delta, inputs[j].delta, scales[i], scales[j]);
            let d: f64 = a
                .iter()
                .zip(b)
                .map(|(x, y)| (sa * *x as f64 - sb * *y as f64).powi(2))
                .sum();
            dist[i * n + j] = d;
            dist[j * n + i] = d;
        }
    }
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| dist[i * n + j])
                .collect();
            row.sort_by(f64::total_cmp);
            row.iter().take(neighbours).sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut selected = vec![false; n];
    for &i in order.iter().take(n - f) {
        selected[i] = true;
    }
    selected
}

/// Coordinate-wise median or trimmed mean; also each input's share of coordinates outside the
/// band of values the rule used (median: the middle half; trimmed mean: what was not trimmed).
fn coordinate_wise(
    config: &RobustConfig,
    inputs: &[Input],
    scales: &[f64],
    weights: &[f64],
) -> (Vec<f32>, Vec<f64>) {
    let n = inputs.len();
    let len = inputs[0].delta.len();
    // Values are dropped from each end: the median keeps the middle one or two (the band used for
    // verdicts is the middle half, ⌊n/4⌉ dropped at each end, so that colluding attackers on one
    // side fall outside it too); the trimmed mean drops `trim_count` at each end.
    let k = match config.rule {
        Rule::Median => ((n as f64 / 4.0).round() as usize).min((n - 1) / 2),
        _ => trim_count(config.trim, n),
    };
    let total_w: f64 = weights.iter().sum();
    let mut out = vec![0f32; len];
    let mut outside = vec![0usize; n];
    let mut col: Vec<(f32, usize)> = Vec::with_capacity(n);
    for (j, o) in out.iter_mut().enumerate() {
        col.clear();
        col.extend(
            inputs
                .iter()
                .enumerate()
                .map(|(i, u)| ((scales[i] * u.delta[j] as f64) as f32, i)),
        );
        // Ties in value are broken by weight, then by input order: the one order the streamed
        // trimmed mean keeps too, so both drop values of the same weights.
        col.sort_unstable_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then(weights[a.1].total_cmp(&weights[b.1]))
                .then(a.1.cmp(&b.1))
        });
        if config.rule == Rule::Median {
            let (lo, hi) = (col[k].0, col[n - 1 - k].0);
            for &(v, i) in &col {
                if v < lo || v > hi {
                    outside[i] += 1;
                }
            }
        } else if config.trim_ends == TrimEnds::Both {
            for &(_, i) in col[..k].iter().chain(&col[n - k..]) {
                outside[i] += 1;
            }
        }
        let wmean = |kept: &[(f32, usize)]| {
            let w: f64 = kept.iter().map(|(_, i)| weights[*i]).sum();
            if w > 0.0 && total_w > 0.0 {
                kept.iter()
                    .map(|(v, i)| weights[*i] * *v as f64)
                    .sum::<f64>()
                    / w
            } else {
                kept.iter().map(|(v, _)| *v as f64).sum::<f64>() / kept.len() as f64
            }
        };
        *o = match config.rule {
            Rule::Median => {
                let m = n / 2;
                if n % 2 == 1 {
                    col[m].0
                } else {
                    ((col[m - 1].0 as f64 + col[m].0 as f64) / 2.0) as f32
                }
            }
            _ if config.trim_ends == TrimEnds::Farthest && k > 0 => {
                let centre = wmean(&col[k..n - k]);
                let from_low =
                    farthest(centre, |i| col[i].0 as f64, |i| col[n - 1 - i].0 as f64, k);
                let (lo, hi) = (from_low, n - (k - from_low));
                for &(_, i) in col[..lo].iter().chain(&col[hi..]) {
                    outside[i] += 1;
                }
                wmean(&col[lo..hi]) as f32
            }
            _ => wmean(&col[k..n - k]) as f32,
        };
    }
    let shares = outside
        .into_iter()
        .map(|c| c as f64 / len.max(1) as f64)
        .collect();
    (out, shares)
}

/// The layer as the server runs it: turns the round's accepted results into what the strategy
/// aggregates, and says what it did to each.
///
/// `reference` is the model the clients started from (the global model, masked); `centre` the
/// previous round's combined update, which `clip = "centred"` measures distances from (None, or
/// a centre of another length: distances from zero, as `clip = "median"`). With `mean` and
/// `multi_krum` each surviving result keeps its own (bounded) vector, so a strategy that looks at
/// individual updates (AutoFLIP's squared deltas) still can; rejected results are removed. With the
/// coordinate-wise rules every result carries the combined update, so any sample-weighted mean of
/// them is that update. Results the layer leaves untouched are returned bit for bit.
pub fn apply(
    config: &RobustConfig,
    reference: &[f32],
    centre: Option<&[f32]>,
    results: Vec<Contribution>,
) -> Result<(Vec<Contribution>, Combined), String> {
    if let Some(c) = results.iter().find(|c| c.values.len() != reference.len()) {
        return Err(format!(
            "update of client {} has {} values, the model has {}",
            c.client,
            c.values.len(),
            reference.len()
        ));
    }
    let votes = results.iter().any(|c| c.kind == UploadKind::Votes);
    let centre = centre_for(config, reference.len(), centre, votes);
    // Every rule is shift-equivariant (means, coordinate-wise order statistics, distances), so
    // centred clipping is the median bound on updates minus the centre, the centre added back;
    // `drop_farthest` alone measures from the centre as it is.
    let (centre, around) = match config.clip {
        Clip::Centred => (centre, None),
        _ => (None, centre),
    };
    let deltas: Vec<Cow<[f32]>> = results
        .iter()
        .map(|c| {
            let d: Cow<[f32]> = match c.kind {
                // Votes (±1 per kept entry) are combined as they are: see "sign-vote methods" above.
                UploadKind::Delta | UploadKind::Votes => Cow::Borrowed(c.values.as_slice()),
                UploadKind::Weights => {
                    Cow::Owned(c.values.iter().zip(reference).map(|(w, g)| w - g).collect())
                }
            };
            match centre {
                Some(v) => Cow::Owned(d.iter().zip(v).map(|(x, v)| x - v).collect()),
                None => d,
            }
        })
        .collect();
    let inputs: Vec<Input> = results
        .iter()
        .zip(&deltas)
        .map(|(c, d)| Input {
            client: c.client,
            samples: c.samples,
            delta: d,
        })
        .collect();
    // Votes all lie at one distance from any centre: drop_farthest drops none of them.
    let config: Cow<RobustConfig> = if votes && config.rule == Rule::DropFarthest {
        Cow::Owned(RobustConfig {
            rule: Rule::Mean,
            ..config.clone()
        })
    } else {
        Cow::Borrowed(config)
    };
    let mut combined = combine_around(&config, &inputs, around)?;
    if let Some(v) = centre {
        for (x, v) in combined.delta.iter_mut().zip(v) {
            *x += v;
        }
    }
    if let Some(i) = combined.delta.iter().position(|v| !v.is_finite()) {
        return Err(format!("the combined update is not finite at entry {i}"));
    }
    let per_client = matches!(
        config.rule,
        Rule::Mean | Rule::MultiKrum | Rule::DropFarthest
    );
    let new: Vec<Option<Vec<f32>>> = deltas
        .iter()
        .zip(&combined.verdicts)
        .zip(&results)
        .map(|((d, v), c)| {
            if v.rejected {
                return None;
            }
            let delta: Cow<[f32]> = if !per_client {
                Cow::Borrowed(combined.delta.as_slice())
            } else if v.scale < 1.0 {
                let scaled = d.iter().map(|x| (*x as f64 * v.scale) as f32);
                Cow::Owned(match centre {
                    Some(c) => scaled.zip(c).map(|(x, c)| x + c).collect(),
                    None => scaled.collect(),
                })
            } else {
                return Some(Vec::new()); // untouched: keep the original
            };
            Some(match c.kind {
                UploadKind::Delta | UploadKind::Votes => delta.into_owned(),
                UploadKind::Weights => delta.iter().zip(reference).map(|(d, g)| g + d).collect(),
            })
        })
        .collect();
    drop(inputs);
    drop(deltas);
    let out = results
        .into_iter()
        .zip(new)
        .filter_map(|(mut c, v)| {
            let v = v?;
            if !v.is_empty() || c.values.is_empty() {
                c.values = v;
            }
            Some(c)
        })
        .collect();
    Ok((out, combined))
}

/// The centre `clip = "centred"` and `rule = "drop_farthest"` measure from: the previous
/// round's combined update when it fits this round's model and the round's updates are not
/// votes (a vote vector's distance from an earlier tally says nothing about its honesty);
/// otherwise none.
pub fn centre_for<'a>(
    config: &RobustConfig,
    len: usize,
    centre: Option<&'a [f32]>,
    votes: bool,
) -> Option<&'a [f32]> {
    let uses = config.clip == Clip::Centred || config.rule == Rule::DropFarthest;
    centre.filter(|v| uses && v.len() == len && !votes)
}

/// Whether a rule can judge and combine each update as it arrives (streaming aggregation): the
/// mean, `drop_farthest` and the trimmed mean, with any bound (the median bound from the
/// previous round's median norm). The median and multi-Krum need the round's updates together, so they force buffering.
pub fn streams(config: &RobustConfig) -> bool {
    config.streaming
        && matches!(
            config.rule,
            Rule::Mean | Rule::TrimmedMean | Rule::DropFarthest
        )
}

/// The L2 distance of `c`'s update (relative to `reference`: a full-weights upload minus the
/// model) from `centre` (its norm without one).
pub fn update_norm(reference: &[f32], centre: Option<&[f32]>, c: &Contribution) -> f64 {
    match (c.kind, centre) {
        (UploadKind::Delta | UploadKind::Votes, None) => norm(&c.values),
        (UploadKind::Delta | UploadKind::Votes, Some(v)) => l2_distance(&c.values, Some(v)),
        (UploadKind::Weights, None) => l2_distance(&c.values, Some(reference)),
        (UploadKind::Weights, Some(v)) => {
            let d: Vec<f32> = c.values.iter().zip(reference).map(|(w, g)| w - g).collect();
            l2_distance(&d, Some(v))
        }
    }
}

/// The layer on one update of a streamed round ([`streams`]): bounds `c`'s distance from
/// `centre` (from zero without one) in place to `bound` (∞: no bound) as [`apply`] would and
/// returns its verdict, whose norm ratio waits for [`finish_streamed`].
pub fn bound_one(
    bound: f64,
    reference: &[f32],
    centre: Option<&[f32]>,
    c: &mut Contribution,
) -> Verdict {
    // The distance without building the delta: most updates are within the bound.
    let nm = update_norm(reference, centre, c);
    let scale = if nm > bound { bound / nm } else { 1.0 };
    if scale < 1.0 {
        let delta: Cow<[f32]> = match c.kind {
            UploadKind::Delta | UploadKind::Votes => Cow::Borrowed(c.values.as_slice()),
            UploadKind::Weights => {
                Cow::Owned(c.values.iter().zip(reference).map(|(w, g)| w - g).collect())
            }
        };
        let d: Vec<f32> = match centre {
            None => delta.iter().map(|x| (*x as f64 * scale) as f32).collect(),
            Some(v) => delta
                .iter()
                .zip(v)
                .map(|(x, v)| ((*x - *v) as f64 * scale + *v as f64) as f32)
                .collect(),
        };
        c.values = match c.kind {
            UploadKind::Delta | UploadKind::Votes => d,
            UploadKind::Weights => d.iter().zip(reference).map(|(d, g)| g + d).collect(),
        };
    }
    Verdict {
        client: c.client,
        norm: nm,
        norm_ratio: 1.0,
        scale,
        outside: 0.0,
        clipped: scale < 1.0,
        down_weighted: false,
        rejected: false,
    }
}

/// The verdicts of a streamed round, with norm ratios against the round's median norm; the
/// combined vector stays empty (the strategy aggregates the running sums).
pub fn finish_streamed(mut verdicts: Vec<Verdict>) -> Combined {
    verdicts.sort_by_key(|v| v.client);
    let norms: Vec<f64> = verdicts.iter().map(|v| v.norm).collect();
    let median_norm = median_of(&norms);
    for v in &mut verdicts {
        v.norm_ratio = ratio(v.norm, median_norm);
    }
    Combined {
        delta: Vec::new(),
        verdicts,
        median_norm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ClientMetrics;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn inputs<'a>(vs: &'a [Vec<f32>], samples: &[u64]) -> Vec<Input<'a>> {
        vs.iter()
            .enumerate()
            .map(|(i, v)| Input {
                client: i as u64 + 1,
                samples: samples[i],
                delta: v,
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    fn cfg(rule: Rule, clip: Clip) -> RobustConfig {
        RobustConfig {
            rule,
            clip,
            ..RobustConfig::plain()
        }
    }

    #[test]
    fn l2_distance_in_lanes_is_the_plain_sum() {
        // Lengths around the lane width, so the remainder is covered too.
        for n in [0usize, 1, 7, 8, 9, 31, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain = |d: &dyn Fn(usize) -> f64| (0..n).map(|i| d(i).powi(2)).sum::<f64>().sqrt();
            let norm_a = plain(&|i| a[i] as f64);
            let dist = plain(&|i| (a[i] - b[i]) as f64);
            assert!(
                (l2_distance(&a, None) - norm_a).abs() <= 1e-12 * (1.0 + norm_a),
                "{n}"
            );
            assert!(
                (l2_distance(&a, Some(&b)) - dist).abs() <= 1e-12 * (1.0 + dist),
                "{n}"
            );
        }
    }

    #[test]
    fn median_norm_bound_clips_only_the_outlier() {
        // Norms 5, 1, 2, 1000: median (2 + 5) / 2 = 3.5; 2× → bound 7.
        let vs = vec![
            vec![3.0, 4.0],
            vec![0.0, 1.0],
            vec![0.0, 2.0],
            vec![600.0, 800.0],
        ];
        let c = RobustConfig {
            clip_multiple: 2.0,
            ..cfg(Rule::Mean, Clip::Median)
        };
        let out = combine(&c, &inputs(&vs, &[1, 1, 1, 1])).unwrap();
        assert_eq!(out.median_norm, 3.5);
        // The outlier becomes [4.2, 5.6]; the mean is ([3+0+0+4.2]/4, [4+1+2+5.6]/4).
        assert!(close(&out.delta, &[1.8, 3.15], 1e-6), "{:?}", out.delta);
        let v = &out.verdicts;
        assert!(!v[0].clipped && !v[1].clipped && !v[2].clipped && v[3].clipped);
        assert!((v[3].scale - 0.007).abs() < 1e-12 && (v[3].norm - 1000.0).abs() < 1e-9);
        assert!(
            (v[3].norm_ratio - 1000.0 / 3.5).abs() < 1e-9
                && (v[1].norm_ratio - 1.0 / 3.5).abs() < 1e-12
        );
        assert_eq!(v[3].action(), "clipped");
        assert_eq!(v[0].action(), "kept");
    }

    #[test]
    fn fixed_bound_and_sample_weights() {
        let vs = vec![vec![3.0, 4.0], vec![0.0, 1.0]];
        let c = RobustConfig {
            max_norm: 1.0,
            ..cfg(Rule::Mean, Clip::Fixed)
        };
        // [0.6, 0.8] weighted 3 and [0, 1] weighted 1: ([1.8 + 0] / 4, [2.4 + 1] / 4).
        let out = combine(&c, &inputs(&vs, &[3, 1])).unwrap();
        assert!(close(&out.delta, &[0.45, 0.85], 1e-6), "{:?}", out.delta);
        assert!(out.verdicts[0].clipped && !out.verdicts[1].clipped);
        // Without a bound it is FedAvg's weighted mean.
        let plain = combine(&RobustConfig::plain(), &inputs(&vs, &[3, 1])).unwrap();
        assert!(close(&plain.delta, &[2.25, 3.25], 1e-6));
        assert!(plain.verdicts.iter().all(|v| v.action() == "kept"));
    }

    #[test]
    fn coordinate_wise_median_by_hand() {
        // Odd count: the middle value; even count: the mean of the two middle ones.
        let vs = vec![
            vec![1.0, 0.0],
            vec![2.0, 0.0],
            vec![3.0, 0.0],
            vec![100.0, 0.0],
            vec![-50.0, 1e6],
        ];
        let out = combine(
            &cfg(Rule::Median, Clip::None),
            &inputs(&vs, &[1, 1, 1, 1, 1]),
        )
        .unwrap();
        assert_eq!(out.delta, vec![2.0, 0.0]);
        let even = combine(
            &cfg(Rule::Median, Clip::None),
            &inputs(&vs[..4], &[5, 1, 1, 1]),
        )
        .unwrap();
        assert_eq!(
            even.delta,
            vec![2.5, 0.0],
            "one vote per client, whatever the samples"
        );
        // Middle half of 5 values: sorted positions 1..=3. Client 5 is outside on both
        // coordinates, client 4 on the first only; the zeros of the second are all alike.
        let shares: Vec<f64> = out.verdicts.iter().map(|v| v.outside).collect();
        assert_eq!(shares, vec![0.0, 0.0, 0.0, 0.5, 1.0]);
        assert!(out.verdicts[4].down_weighted && !out.verdicts[3].down_weighted);
    }

    #[test]
    fn trimmed_mean_by_hand() {
        // trim 0.2 of 5: drop one value at each end, weighted mean of the middle three.
        let vs = vec![vec![1.0], vec![2.0], vec![3.0], vec![100.0], vec![-50.0]];
        let c = RobustConfig {
            trim: 0.2,
            ..cfg(Rule::TrimmedMean, Clip::None)
        };
        let out = combine(&c, &inputs(&vs, &[1, 1, 1, 1, 1])).unwrap();
        assert_eq!(out.delta, vec![2.0]);
        // Samples 1, 1, 3 on the kept values 1, 2, 3: (1 + 2 + 9) / 5.
        let out = combine(&c, &inputs(&vs, &[1, 1, 3, 1, 1])).unwrap();
        assert!(close(&out.delta, &[2.4], 1e-6));
        let trimmed: Vec<bool> = out.verdicts.iter().map(|v| v.down_weighted).collect();
        assert_eq!(trimmed, vec![false, false, false, true, true]);
        // trim 0.1 of 4 would drop nothing: at least one value goes from each end once n ≥ 4
        // (1, 2, 3, 100: the mean of 2 and 3).
        let c1 = RobustConfig {
            trim: 0.1,
            ..c.clone()
        };
        assert_eq!(
            combine(&c1, &inputs(&vs[..4], &[1; 4])).unwrap().delta,
            vec![2.5]
        );
        let counts = [
            (0.1, 3),
            (0.1, 4),
            (0.1, 19),
            (0.1, 20),
            (0.0, 10),
            (0.4, 5),
        ];
        assert_eq!(
            counts.map(|(t, n)| trim_count(t, n)),
            [0, 1, 1, 2, 0, 2],
            "trim_count"
        );
        // trim 0 is the weighted mean.
        let c0 = RobustConfig { trim: 0.0, ..c };
        assert!(close(
            &combine(&c0, &inputs(&vs, &[1, 1, 1, 1, 1])).unwrap().delta,
            &[11.2],
            1e-5
        ));
    }

    #[test]
    fn multi_krum_by_hand() {
        // Four close updates and one far away; f = ⌊0.2·5⌋ = 1, so 2 neighbours and 4 selected.
        let vs = vec![
            vec![1.0, 1.0],
            vec![1.1, 1.0],
            vec![1.0, 1.1],
            vec![0.9, 1.0],
            vec![10.0, -10.0],
        ];
        let c = RobustConfig {
            attackers: 0.2,
            ..cfg(Rule::MultiKrum, Clip::None)
        };
        let out = combine(&c, &inputs(&vs, &[1, 1, 1, 1, 1])).unwrap();
        let rejected: Vec<bool> = out.verdicts.iter().map(|v| v.rejected).collect();
        assert_eq!(rejected, vec![false, false, false, false, true]);
        assert!(close(&out.delta, &[1.0, 1.025], 1e-6), "{:?}", out.delta);
        assert_eq!(out.verdicts[4].action(), "rejected");
        // (Scores: client 1 is 0.01 from each of the other three close ones, so its two nearest
        // sum to 0.02; client 5 is over 100 from everyone.) A round of two keeps both: Krum
        // needs n ≥ 3.
        let two = combine(&c, &inputs(&vs[3..], &[1, 1])).unwrap();
        assert!(two.verdicts.iter().all(|v| !v.rejected));
    }

    /// Nine honest updates around a common direction plus attackers; each defence must keep the
    /// combined update near the honest mean.
    fn honest(rng: &mut StdRng, d: usize) -> Vec<Vec<f32>> {
        let base: Vec<f32> = (0..d).map(|i| ((i as f32) * 0.37).sin() * 0.1).collect();
        (0..10)
            .map(|_| {
                base.iter()
                    .map(|b| b + rng.random_range(-0.02..0.02f32))
                    .collect()
            })
            .collect()
    }

    fn distance(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn defences_hold_against_one_attacker_of_ten() {
        let mut rng = StdRng::seed_from_u64(7);
        let d = 200;
        let clean = honest(&mut rng, d);
        let honest_mean = combine(&RobustConfig::plain(), &inputs(&clean[1..], &[1; 9]))
            .unwrap()
            .delta;
        let hn = norm(&honest_mean);
        let attacks: Vec<(&str, Vec<f32>)> = vec![
            ("scaled ×1e3", clean[0].iter().map(|x| x * 1e3).collect()),
            ("constant 1e6", vec![1e6; d]),
            ("sign flip", clean[0].iter().map(|x| -x).collect()),
            ("noise", {
                let v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                let s = norm(&clean[0]) / norm(&v);
                v.iter().map(|x| x * s as f32).collect()
            }),
        ];
        let defences = [
            RobustConfig::norm_bound(),
            cfg(Rule::Median, Clip::None),
            cfg(Rule::TrimmedMean, Clip::None),
            cfg(Rule::MultiKrum, Clip::None),
        ];
        for (name, bad) in &attacks {
            let mut vs = clean.clone();
            vs[0] = bad.clone();
            let undefended = combine(&RobustConfig::plain(), &inputs(&vs, &[1; 10]))
                .unwrap()
                .delta;
            for def in &defences {
                let out = combine(def, &inputs(&vs, &[1; 10])).unwrap();
                let err = distance(&out.delta, &honest_mean) / hn;
                // A norm bound still gives the attacker a tenth of the weight with up to 3× an
                // honest norm (0.15–0.32 of the honest mean here); the robust rules stay within 0.05.
                let limit = if def.rule == Rule::Mean { 0.35 } else { 0.06 };
                assert!(
                    err < limit,
                    "{name} vs {}: relative error {err:.4}",
                    def.describe()
                );
                if matches!(*name, "scaled ×1e3" | "constant 1e6") {
                    let v = &out.verdicts[0];
                    assert!(v.norm_ratio > 100.0, "{name}: ratio {}", v.norm_ratio);
                    assert!(
                        v.action() != "kept",
                        "{name} vs {}: the attacker went unnoticed",
                        def.describe()
                    );
                    assert!(
                        distance(&undefended, &honest_mean) / hn > 10.0,
                        "{name} wrecks the plain mean"
                    );
                }
                // Multi-Krum always leaves out f = 2 of 10; everyone else keeps every honest client.
                let honest_rejected = out.verdicts[1..].iter().filter(|v| v.rejected).count();
                assert!(
                    honest_rejected <= if def.rule == Rule::MultiKrum { 1 } else { 0 },
                    "{name} vs {}: honest clients rejected",
                    def.describe()
                );
                assert!(
                    out.verdicts[1..]
                        .iter()
                        .all(|v| !v.down_weighted && !v.clipped),
                    "{name} vs {}: an honest client flagged",
                    def.describe()
                );
            }
        }
    }

    #[test]
    fn robust_rules_hold_against_three_of_ten() {
        let mut rng = StdRng::seed_from_u64(11);
        let d = 100;
        let clean = honest(&mut rng, d);
        let honest_mean = combine(&RobustConfig::plain(), &inputs(&clean[3..], &[1; 7]))
            .unwrap()
            .delta;
        let hn = norm(&honest_mean);
        let mut vs = clean.clone();
        for v in vs.iter_mut().take(3) {
            *v = vec![1e6; d];
        }
        for def in [
            cfg(Rule::Median, Clip::None),
            RobustConfig {
                trim: 0.3,
                ..cfg(Rule::TrimmedMean, Clip::None)
            },
            RobustConfig {
                attackers: 0.3,
                ..cfg(Rule::MultiKrum, Clip::None)
            },
        ] {
            let out = combine(&def, &inputs(&vs, &[1; 10])).unwrap();
            let err = distance(&out.delta, &honest_mean) / hn;
            assert!(err < 0.2, "{}: relative error {err:.4}", def.describe());
        }
        // The median flags all three colluders (they share one side of every coordinate).
        let med = combine(&cfg(Rule::Median, Clip::None), &inputs(&vs, &[1; 10])).unwrap();
        let flagged: Vec<bool> = med.verdicts.iter().map(|v| v.down_weighted).collect();
        assert_eq!(
            flagged,
            [
                true, true, true, false, false, false, false, false, false, false
            ]
        );
        // A trim smaller than the attackers' share is not enough, as documented.
        let weak = combine(
            &RobustConfig {
                trim: 0.1,
                ..cfg(Rule::TrimmedMean, Clip::None)
            },
            &inputs(&vs, &[1; 10]),
        )
        .unwrap();
        assert!(distance(&weak.delta, &honest_mean) / hn > 10.0);
    }

    #[test]
    fn sparse_deltas_and_any_length() {
        // Top-k deltas: zeros where nothing was sent; a coordinate nobody sent stays zero.
        let vs = vec![
            vec![0.0, 0.5, 0.0, 0.0],
            vec![0.0, 0.4, 0.1, 0.0],
            vec![0.0, 0.0, 0.2, 0.0],
        ];
        for rule in [Rule::Mean, Rule::Median, Rule::TrimmedMean, Rule::MultiKrum] {
            let out = combine(
                &RobustConfig::norm_bound().clone_with(rule),
                &inputs(&vs, &[1, 1, 1]),
            )
            .unwrap();
            assert_eq!(out.delta.len(), 4);
            assert_eq!((out.delta[0], out.delta[3]), (0.0, 0.0), "{rule:?}");
        }
        assert_eq!(
            combine(&cfg(Rule::Median, Clip::None), &inputs(&vs, &[1, 1, 1]))
                .unwrap()
                .delta,
            vec![0.0, 0.4, 0.1, 0.0]
        );
        // Lengths differ between rounds, never within one.
        assert!(
            combine(
                &RobustConfig::plain(),
                &inputs(&[vec![1.0], vec![1.0, 2.0]], &[1, 1])
            )
            .is_err()
        );
        assert!(combine(&RobustConfig::plain(), &[]).is_err());
        let one = combine(
            &cfg(Rule::MultiKrum, Clip::Median),
            &inputs(&[vec![2.0; 7]], &[3]),
        )
        .unwrap();
        assert_eq!(one.delta, vec![2.0; 7]);
    }

    impl RobustConfig {
        fn clone_with(&self, rule: Rule) -> RobustConfig {
            RobustConfig {
                rule,
                ..self.clone()
            }
        }
    }

    #[test]
    fn suspicion_accumulates_over_rounds() {
        let vs = vec![
            vec![3.0, 4.0],
            vec![0.0, 1.0],
            vec![0.0, 2.0],
            vec![600.0, 800.0],
        ];
        let out = combine(
            &RobustConfig {
                clip_multiple: 2.0,
                ..cfg(Rule::Mean, Clip::Median)
            },
            &inputs(&vs, &[1; 4]),
        )
        .unwrap();
        let mut s = Suspicion::default();
        s.record(&out.verdicts[3]);
        s.record(&out.verdicts[0]);
        assert_eq!(
            (s.judged, s.clipped, s.down_weighted, s.rejected),
            (2, 1, 0, 0)
        );
        assert!(
            (s.max_norm_ratio - 1000.0 / 3.5).abs() < 1e-9
                && (s.last_norm_ratio - 5.0 / 3.5).abs() < 1e-9
        );
        let m = round_metrics(&out);
        assert_eq!(m[0], ("robust.median_norm".to_string(), 3.5));
        assert_eq!(m[1], ("robust.clipped".to_string(), 1.0));
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(
            RobustConfig {
                trim: 0.5,
                ..RobustConfig::plain()
            }
            .validate()
            .is_err()
        );
        assert!(
            RobustConfig {
                attackers: -0.1,
                ..RobustConfig::plain()
            }
            .validate()
            .is_err()
        );
        assert!(
            RobustConfig {
                clip: Clip::Fixed,
                ..RobustConfig::plain()
            }
            .validate()
            .is_err()
        );
        assert!(
            RobustConfig {
                clip_multiple: 0.0,
                ..RobustConfig::norm_bound()
            }
            .validate()
            .is_err()
        );
        assert!(RobustConfig::norm_bound().validate().is_ok());
        assert_eq!(
            RobustConfig::norm_bound().describe(),
            "norm bound 3× median + mean"
        );
    }

    fn contribution(client: u64, kind: UploadKind, values: Vec<f32>) -> Contribution {
        Contribution {
            client,
            samples: 10,
            kind,
            values,
            metrics: ClientMetrics::default(),
            encoding: Default::default(),
        }
    }

    #[test]
    fn apply_works_on_weights_relative_to_the_global_model() {
        let global = vec![1.0f32, -1.0, 0.5];
        // Weights uploads: deltas (0.1, 0, 0), (0, 0.1, 0) and the attacker's huge one.
        let results = vec![
            contribution(1, UploadKind::Weights, vec![1.1, -1.0, 0.5]),
            contribution(2, UploadKind::Weights, vec![1.0, -0.9, 0.5]),
            contribution(3, UploadKind::Weights, vec![1e6, 1e6, 1e6]),
        ];
        // No defence: untouched results come back bit for bit.
        let (plain, report) =
            apply(&RobustConfig::plain(), &global, None, results.clone()).unwrap();
        assert_eq!(plain, results);
        assert!(report.verdicts[2].norm_ratio > 1e5);
        // The norm bound (3 × median 0.1): the attacker's weights end 0.3 from the global model.
        let (bounded, report) =
            apply(&RobustConfig::norm_bound(), &global, None, results.clone()).unwrap();
        assert_eq!(&bounded[..2], &results[..2]);
        let moved: Vec<f32> = bounded[2]
            .values
            .iter()
            .zip(&global)
            .map(|(w, g)| w - g)
            .collect();
        assert!((norm(&moved) - 0.3).abs() < 1e-4, "{moved:?}");
        assert!(report.verdicts[2].clipped);
        // Median: every result carries global + the median delta.
        let (med, _) = apply(
            &cfg(Rule::Median, Clip::None),
            &global,
            None,
            results.clone(),
        )
        .unwrap();
        assert_eq!(med.len(), 3);
        for c in &med {
            assert!(close(&c.values, &[1.1, -0.9, 0.5], 1e-6), "{:?}", c.values);
        }
        // Multi-Krum (f lowered to 0 for three results) keeps all; with five it drops the attacker.
        let mut five = results.clone();
        five.insert(
            0,
            contribution(4, UploadKind::Weights, vec![1.05, -0.95, 0.5]),
        );
        five.insert(
            0,
            contribution(5, UploadKind::Weights, vec![1.05, -1.0, 0.55]),
        );
        let (krum, report) = apply(&cfg(Rule::MultiKrum, Clip::None), &global, None, five).unwrap();
        assert_eq!(
            krum.iter().map(|c| c.client).collect::<Vec<_>>(),
            vec![5, 4, 1, 2]
        );
        assert!(report.verdicts[4].rejected);
        // Deltas are used as they are.
        let deltas = vec![
            contribution(1, UploadKind::Delta, vec![0.0, 3.0, 0.0]),
            contribution(2, UploadKind::Delta, vec![0.0, 1.0, 0.0]),
        ];
        let (d, _) = apply(
            &RobustConfig {
                max_norm: 2.0,
                ..cfg(Rule::Mean, Clip::Fixed)
            },
            &global,
            None,
            deltas,
        )
        .unwrap();
        assert_eq!(d[0].values, vec![0.0, 2.0, 0.0]);
        assert!(apply(&RobustConfig::plain(), &global[..2], None, results).is_err());
    }
}
