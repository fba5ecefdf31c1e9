//! Privacy accounting for DP-FedAvg: the Rényi-DP accountant of the sampled Gaussian mechanism
//! (Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
//! 2019), as TensorFlow Privacy and Opacus compute it, on integer orders.
//!
//! One round samples each client with probability q and adds Gaussian noise of standard
//! deviation z·C to the sum of updates clipped to norm C. Its RDP at order α is
//! `ln(A_α) / (α − 1)` with `A_α = Σ_k C(α, k)·(1 − q)^(α−k)·q^k·exp((k² − k) / (2z²))`;
//! rounds compose by adding their RDP per order, and ε for a δ is the smallest over the orders
//! of the conversion of Canonne, Kamath and Steinke (2020) (what current TensorFlow Privacy and
//! Opacus report; [`epsilon_classic`] is the earlier `rdp + ln(1/δ)/(α − 1)`).

use serde::{Deserialize, Serialize};

/// The orders the accountant tracks: 2 to 64, then 128, 256 and 512.
pub fn orders() -> Vec<u32> {
    (2..=64).chain([128, 256, 512]).collect()
}

/// RDP at integer order `alpha` of one sampled Gaussian step (sampling rate `q`, noise
/// multiplier `z`).
pub fn rdp_step(q: f64, z: f64, alpha: u32) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if z <= 0.0 {
        return f64::INFINITY;
    }
    let a = alpha as f64;
    if q >= 1.0 {
        return a / (2.0 * z * z);
    }
    let (lq, l1q) = (q.ln(), (1.0 - q).ln());
    let mut log_binom = 0.0f64; // ln C(α, 0)
    let mut log_a = f64::NEG_INFINITY;
    for k in 0..=alpha {
        if k > 0 {
            log_binom += ((alpha - k + 1) as f64).ln() - (k as f64).ln();
        }
        let kf = k as f64;
        let term = log_binom + kf * lq + (a - kf) * l1q + (kf * kf - kf) / (2.0 * z * z);
        log_a = log_add(log_a, term);
    }
    log_a / (a - 1.0)
}

fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// ε for `delta` from RDP values at [`orders`], and the order that gives it.
pub fn epsilon(rdp: &[f64], delta: f64) -> (f64, u32) {
    best(rdp, |r, a| {
        r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln()
    })
}

/// ε by the classic conversion `rdp + ln(1/δ)/(α − 1)` (looser; older TensorFlow Privacy).
pub fn epsilon_classic(rdp: &[f64], delta: f64) -> (f64, u32) {
    best(rdp, |r, a| r + (1.0 / delta).ln() / (a - 1.0))
}

fn best(rdp: &[f64], eps: impl Fn(f64, f64) -> f64) -> (f64, u32) {
    orders()
        .into_iter()
        .zip(rdp)
        .map(|(a, &r)| (eps(r, a as f64).max(0.0), a))
        .fold((f64::INFINITY, 0), |b, x| if x.0 < b.0 { x } else { b })
}

/// The privacy spent so far: RDP per order, summed over the rounds run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Accountant {
    rdp: Vec<f64>,
    pub rounds: u32,
}

impl Accountant {
    /// Adds `steps` sampled Gaussian steps at rate `q` with noise multiplier `z`.
    pub fn add(&mut self, q: f64, z: f64, steps: u32) {
        if self.rdp.is_empty() {
            self.rdp = vec![0.0; orders().len()];
        }
        for (r, a) in self.rdp.iter_mut().zip(orders()) {
            *r += steps as f64 * rdp_step(q, z, a);
        }
        self.rounds += steps;
    }

    /// ε spent so far for `delta` (0 before any round).
    pub fn epsilon(&self, delta: f64) -> f64 {
        if self.rdp.is_empty() {
            return 0.0;
        }
        epsilon(&self.rdp, delta).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp_sgd(n: f64, batch: f64, z: f64, epochs: f64) -> Vec<f64> {
        let q = batch / n;
        let steps = (epochs * n / batch).round() as u32;
        let mut a = Accountant::default();
        a.add(q, z, steps);
        a.rdp
    }

    // TensorFlow Privacy's compute_dp_sgd_privacy_lib tests: (n, batch, z, epochs, δ) →
    // ε at the order given, with the classic conversion (older releases) and with the
    // improved one (current releases).
    #[test]
    fn epsilon_matches_tensorflow_privacys_published_values() {
        let rdp = dp_sgd(60_000.0, 150.0, 1.3, 15.0);
        let (eps, order) = epsilon_classic(&rdp, 1e-5);
        assert_eq!(order, 19);
        assert!((eps - 0.941870567).abs() < 1e-6, "{eps}");
        let (eps, order) = epsilon(&rdp, 1e-5);
        assert_eq!(order, 19);
        assert!((eps - 0.7242234026109595).abs() < 1e-6, "{eps}");

        let rdp = dp_sgd(100_000.0, 100.0, 1.0, 30.0);
        let (eps, order) = epsilon_classic(&rdp, 1e-7);
        assert_eq!(order, 13);
        assert!((eps - 1.70928734).abs() < 1e-6, "{eps}");
        let (eps, order) = epsilon(&rdp, 1e-7);
        assert_eq!(order, 13);
        assert!((eps - 1.4154988495444845).abs() < 1e-6, "{eps}");
    }

    #[test]
    fn without_sampling_the_gaussian_mechanism_has_its_closed_form() {
        // q = 1: RDP(α) = α / (2z²), for the sum formula and the shortcut alike.
        for a in [2u32, 7, 30] {
            let closed = a as f64 / (2.0 * 1.5 * 1.5);
            assert!((rdp_step(1.0, 1.5, a) - closed).abs() < 1e-12);
            assert!((rdp_step(1.0 - 1e-12, 1.5, a) - closed).abs() < 1e-6);
        }
    }

    #[test]
    fn more_noise_or_fewer_rounds_spend_less() {
        let eps = |z: f64, rounds: u32| {
            let mut a = Accountant::default();
            a.add(0.1, z, rounds);
            a.epsilon(1e-5)
        };
        assert!(eps(2.0, 50) < eps(1.0, 50));
        assert!(eps(1.0, 20) < eps(1.0, 50));
        assert_eq!(Accountant::default().epsilon(1e-5), 0.0);
        let mut twice = Accountant::default();
        twice.add(0.1, 1.0, 25);
        twice.add(0.1, 1.0, 25);
        assert!((twice.epsilon(1e-5) - eps(1.0, 50)).abs() < 1e-9);
    }
}
