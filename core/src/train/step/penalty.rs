//! A term added to every batch's loss that depends only on what is learned, not on the data:
//! FedProx's proximal term (Li et al., MLSys 2020), μ/2·‖w − w₀‖² with w₀ the values the task
//! started from (the global model, when the weights are learned). It keeps a client's weights
//! near the model it was sent, which is what bounds client drift on non-IID shards.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::model::Net;

/// What the loss gains besides the batch's own loss (part of every task's [`super::Step`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Penalty {
    #[default]
    None,
    /// μ/2 · Σ (w − w₀)² over the learned tensors, w₀ where the task started. μ = 0 adds an
    /// exact zero to every gradient, so it trains as no penalty does.
    Proximal { mu: f32 },
}

impl Penalty {
    pub fn check(&self) -> Result<(), String> {
        match *self {
            Penalty::Proximal { mu } if !(mu.is_finite() && mu >= 0.0) => {
                Err(format!("proximal μ is {mu}: must be finite and ≥ 0"))
            }
            _ => Ok(()),
        }
    }
}

/// The starting values of the learned tensors, held as constants for the proximal term.
pub(crate) struct Anchor {
    start: Vec<Tensor<1>>,
    mu: f32,
}

impl Anchor {
    /// The anchor for `penalty` at the learned tensors' starting values (none without a term).
    pub fn new(penalty: Penalty, net: &Net) -> Option<Anchor> {
        match penalty {
            Penalty::None => None,
            Penalty::Proximal { mu } => Some(Anchor {
                start: net.params.iter().map(|p| p.val().detach()).collect(),
                mu,
            }),
        }
    }

    /// μ/2 · Σ (w − w₀)², differentiable in `net`: its gradient is μ(w − w₀).
    pub fn term(&self, net: &Net) -> Tensor<1> {
        let mut sum: Option<Tensor<1>> = None;
        for (p, a) in net.params.iter().zip(&self.start) {
            let d = p.val() - a.clone();
            let s = (d.clone() * d).sum();
            sum = Some(match sum {
                Some(acc) => acc + s,
                None => s,
            });
        }
        sum.expect("a model has tensors") * (self.mu / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Arch;
    use burn::tensor::Device;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    #[test]
    fn the_proximal_gradient_is_mu_times_the_distance_from_the_start() {
        let arch = Arch::preset("mlp", [1, 4, 4], 3).unwrap();
        let n = arch.num_params();
        let mut rng = StdRng::seed_from_u64(5);
        let w0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w: Vec<f32> = w0.iter().map(|v| v + rng.random_range(-0.5..0.5)).collect();
        let ad = Device::flex().autodiff();
        let anchor = Anchor::new(
            Penalty::Proximal { mu: 0.3 },
            &Net::from_flat(&arch, &w0, &ad),
        )
        .unwrap();
        let net = Net::from_flat(&arch, &w, &ad);
        let term = anchor.term(&net);
        let value = term.clone().into_data().try_to_vec::<f32>().unwrap()[0];
        let expected: f64 = w
            .iter()
            .zip(&w0)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            * 0.15;
        assert!(
            (value as f64 - expected).abs() < 1e-4 * expected,
            "{value} {expected}"
        );
        let grads = term.backward();
        let mut at = 0;
        for p in &net.params {
            let g = p
                .val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            for gi in g {
                let want = 0.3 * (w[at] - w0[at]);
                assert!((gi - want).abs() <= 1e-6, "at {at}: {gi} vs {want}");
                at += 1;
            }
        }
        assert_eq!(at, n);
    }

    #[test]
    fn a_negative_or_missing_mu_is_refused() {
        assert!(Penalty::Proximal { mu: -0.1 }.check().is_err());
        assert!(Penalty::Proximal { mu: f32::NAN }.check().is_err());
        assert!(Penalty::Proximal { mu: 0.0 }.check().is_ok());
        assert!(Penalty::None.check().is_ok());
    }
}
