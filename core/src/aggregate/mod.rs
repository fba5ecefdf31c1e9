//! Aggregation: the accepted results ([`Contribution`]), the math on flat parameter vectors, the
//! robust layer ([`robust`]), streaming running sums ([`stream`]), differential privacy's
//! accountant ([`privacy`]) and the staleness weights of asynchronous buffered aggregation
//! ([`staleness`]). Strategies build on this; nothing here knows a strategy.

pub mod privacy;
pub mod robust;
pub mod staleness;
pub mod stream;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::codec::update::UploadKind;
use crate::protocol::ClientMetrics;

/// A validated result, decoded to a full-length vector. Serialisable so an edge aggregator can
/// send its results' summaries (without vectors) upstream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub client: u64,
    pub samples: u64,
    /// Trained parameters (`Weights`) or trained minus starting ones (`Delta`, `Sparse`).
    pub kind: UploadKind,
    pub values: Vec<f32>,
    pub metrics: ClientMetrics,
    /// How a supermask upload travelled (payload bytes, tensors sent as flips).
    pub encoding: codec::supermask::Encoding,
}

/// Σ_k (w_k / Σw) · v_k, accumulated in f64. Panics on mismatched lengths (callers validate).
pub fn weighted_mean(items: &[(&[f32], u64)]) -> Vec<f32> {
    assert!(!items.is_empty(), "weighted_mean of nothing");
    let len = items[0].0.len();
    let total: f64 = items.iter().map(|(_, w)| *w as f64).sum();
    let mut acc = vec![0f64; len];
    for (v, w) in items {
        assert_eq!(v.len(), len, "update length mismatch");
        let w = if total > 0.0 {
            *w as f64 / total
        } else {
            1.0 / items.len() as f64
        };
        for (a, x) in acc.iter_mut().zip(v.iter()) {
            *a += w * *x as f64;
        }
    }
    acc.into_iter().map(|a| a as f32).collect()
}

/// Server momentum (FedAvgM): v ← βv + (1−β)Δ, θ ← θ − lr·v, where Δ = θ − mean(θ_k) is the
/// negated mean client delta.
pub fn momentum_step(
    theta: &mut [f32],
    velocity: &mut [f32],
    mean_delta: &[f32],
    beta: f32,
    lr: f32,
) {
    for ((t, v), d) in theta.iter_mut().zip(velocity.iter_mut()).zip(mean_delta) {
        let big_delta = -d;
        *v = beta * *v + (1.0 - beta) * big_delta;
        *t -= lr * *v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_mean_matches_hand_computation() {
        let a = [1.0, 2.0, -3.0];
        let b = [3.0, 0.0, 1.0];
        // Weights 100 and 300: 0.25·a + 0.75·b.
        let m = weighted_mean(&[(&a, 100), (&b, 300)]);
        assert_eq!(m, vec![2.5, 0.5, 0.0]);
        // Equal weights fall back to the plain mean; zero total weight too.
        assert_eq!(weighted_mean(&[(&a, 0), (&b, 0)]), vec![2.0, 1.0, -1.0]);
    }

    #[test]
    fn momentum_step_matches_hand_computation() {
        let mut theta = vec![1.0, 1.0];
        let mut v = vec![0.0, 0.2];
        // Clients moved by +0.5 and −1.0 on average.
        momentum_step(&mut theta, &mut v, &[0.5, -1.0], 0.9, 1.0);
        // v = 0.9·v + 0.1·(−Δ̄) = [−0.05, 0.28]; θ −= v.
        assert!(
            (v[0] + 0.05).abs() < 1e-6 && (v[1] - 0.28).abs() < 1e-6,
            "{v:?}"
        );
        assert!(
            (theta[0] - 1.05).abs() < 1e-6 && (theta[1] - 0.72).abs() < 1e-6,
            "{theta:?}"
        );
    }
}
