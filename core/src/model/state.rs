//! The global model as plain data: an architecture plus its flat parameters.

use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::model::arch::Arch;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    pub arch: Arch,
    /// Parameters in the layout of [`Arch::params`].
    pub params: Vec<f32>,
    /// Optional pruning mask, same length as `params`; `false` entries are held at zero.
    pub mask: Option<Vec<bool>>,
    /// Bumped whenever the mask changes, so clients can cache it.
    #[serde(default)]
    pub mask_version: u64,
}

impl ModelState {
    /// Fresh parameters, drawn like PyTorch's default: U(−1/√fan_in, 1/√fan_in) for weights and
    /// biases. Drawn here rather than by a backend so every device starts from the same numbers.
    pub fn init(arch: Arch, seed: u64) -> ModelState {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = vec![0.0f32; arch.num_params()];
        for spec in arch.params() {
            let fan_in: usize = match spec.shape.len() {
                4 => spec.shape[1] * spec.shape[2] * spec.shape[3],
                2 => spec.shape[0],
                // A bias takes the fan-in of the weight just before it.
                _ => fan_in_of_layer(&arch, spec.layer),
            };
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            for v in &mut params[spec.offset..spec.offset + spec.len] {
                *v = rng.random_range(-bound..bound);
            }
        }
        ModelState {
            arch,
            params,
            mask: None,
            mask_version: 0,
        }
    }

    /// Installs a new mask, zeroing what it prunes.
    pub fn set_mask(&mut self, mask: Vec<bool>) {
        assert_eq!(mask.len(), self.params.len(), "mask length");
        for (v, k) in self.params.iter_mut().zip(&mask) {
            if !k {
                *v = 0.0;
            }
        }
        self.mask = Some(mask);
        self.mask_version += 1;
    }

    /// Fraction of parameters the mask prunes.
    pub fn sparsity(&self) -> f64 {
        self.mask.as_ref().map_or(0.0, |m| {
            m.iter().filter(|k| !**k).count() as f64 / m.len().max(1) as f64
        })
    }

    /// The parameters with the mask applied (pruned entries are exactly zero).
    pub fn masked_params(&self) -> Vec<f32> {
        match &self.mask {
            None => self.params.clone(),
            Some(m) => self
                .params
                .iter()
                .zip(m)
                .map(|(v, k)| if *k { *v } else { 0.0 })
                .collect(),
        }
    }
}

fn fan_in_of_layer(arch: &Arch, layer: usize) -> usize {
    match arch.layers[layer] {
        crate::model::arch::Layer::Dense { inputs, .. } => inputs,
        crate::model::arch::Layer::Conv {
            in_channels,
            kernel,
            ..
        } => in_channels * kernel * kernel,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_deterministic_and_bounded() {
        let arch = Arch::preset("mlp", [1, 28, 28], 10).unwrap();
        let a = ModelState::init(arch.clone(), 7);
        let b = ModelState::init(arch.clone(), 7);
        let c = ModelState::init(arch, 8);
        assert_eq!(a, b);
        assert_ne!(a.params, c.params);
        let bound = 1.0 / 784f32.sqrt();
        assert!(a.params[..784 * 200].iter().all(|v| v.abs() <= bound));
        assert!(a.params[..784 * 200].iter().any(|v| v.abs() > bound * 0.9));
    }
}
