//! One strategy's run in a comparison, and the figures the tables read off its rounds.

use canopy_core::metric_keys as keys;

use crate::round::record::RoundRecord;

/// A strategy's rounds on one dataset, model and partition.
pub struct Row {
    pub dataset: String,
    pub model: String,
    pub partition: String,
    pub strategy: String,
    pub rounds: Vec<RoundRecord>,
    pub seconds: f64,
}

impl Row {
    pub fn final_acc(&self) -> f32 {
        self.rounds.last().map_or(0.0, |r| r.test_accuracy)
    }
    /// Mean test accuracy of the last five rounds: with 5 of 20 strongly non-IID clients per
    /// round the global model's accuracy swings by 10+ points from round to round, so one final
    /// round is a noisy summary.
    pub fn tail_acc(&self) -> f32 {
        let tail = &self.rounds[self.rounds.len().saturating_sub(5)..];
        tail.iter().map(|r| r.test_accuracy).sum::<f32>() / tail.len().max(1) as f32
    }
    pub fn best_acc(&self) -> f32 {
        self.rounds
            .iter()
            .map(|r| r.test_accuracy)
            .fold(0.0, f32::max)
    }
    pub fn to_target(&self, t: f32) -> String {
        self.rounds
            .iter()
            .find(|r| r.test_accuracy >= t)
            .map_or("–".into(), |r| r.round.to_string())
    }
    /// Server seconds (the rounds', or a buffered run's steps', summed) until the first round
    /// at accuracy `t` or above.
    pub fn seconds_to(&self, t: f32) -> Option<f64> {
        let mut sum = 0.0;
        for r in &self.rounds {
            sum += r.seconds;
            if r.test_accuracy >= t {
                return Some(sum);
            }
        }
        None
    }
    /// Server seconds over the whole run (its rounds', or steps', summed).
    pub fn server_seconds(&self) -> f64 {
        self.rounds.iter().map(|r| r.seconds).sum()
    }
    /// Mean of the clients' accuracy on their own held-out splits in the last round (for
    /// personalising methods, their own models).
    pub fn local_acc(&self) -> f32 {
        self.rounds.last().map_or(0.0, |r| r.local_accuracy)
    }
    /// Bits uploaded per model parameter per client result, from real frames, over the run.
    pub fn bits_per_param(&self) -> f64 {
        let bits: f64 = self.rounds.iter().map(|r| 8.0 * r.bytes_up as f64).sum();
        let params: f64 = self
            .rounds
            .iter()
            .map(|r| (r.results * r.params) as f64)
            .sum();
        bits / params.max(1.0)
    }
    pub fn up(&self) -> u64 {
        self.rounds.iter().map(|r| r.bytes_up).sum()
    }
    pub fn down(&self) -> u64 {
        self.rounds.iter().map(|r| r.bytes_down).sum()
    }
    /// Fraction of the first round's parameters gone from the last round's model.
    pub fn params_removed(&self) -> f64 {
        let (first, last) = self.span(|r| r.params);
        1.0 - last as f64 / first.max(1) as f64
    }
    pub fn extra(&self, key: &str) -> Option<f64> {
        self.rounds.last().and_then(|r| r.extra.get(key).copied())
    }
    /// (first round, last round) of a per-round figure.
    pub fn span<T: Copy + Default>(&self, f: impl Fn(&RoundRecord) -> T) -> (T, T) {
        (
            self.rounds.first().map(&f).unwrap_or_default(),
            self.rounds.last().map(&f).unwrap_or_default(),
        )
    }
    /// FLOPs per sample of the final model (pruned weights free when a mask says so) over the
    /// first round's dense model.
    pub fn flops_ratio(&self) -> f64 {
        let (first, _) = self.span(|r| r.flops_per_sample);
        let last = self.rounds.last().map_or(0.0, |r| {
            r.extra
                .get(keys::EFFECTIVE_FLOPS)
                .copied()
                .unwrap_or(r.flops_per_sample as f64)
        });
        last / first.max(1) as f64
    }
}
