//! SynFlow (Tanaka et al. 2020): pruning at initialisation with no data. Every weight is
//! replaced by its magnitude, the input by ones, and R = 1ᵀ(Π|θ_ℓ|)1 is the network's output
//! summed; a weight's score is |θ ⊙ ∂R/∂θ|. Iterated on an exponential schedule down to the
//! target density, re-scoring the surviving weights each time, which avoids cutting a layer off.
//!
//! R is a product over layers and overflows f32 in deep or wide nets, so each weight tensor is
//! rescaled before scoring so that an all-ones input gives outputs of mean one. Scaling layer ℓ by
//! c multiplies every score by the same c (R scales by c, so does every other layer's gradient,
//! and layer ℓ's own |θ ⊙ ∂R/∂θ| is unchanged by the substitution), so the ranking is exact.
//! Weights (dense and conv kernels) are pruned; biases are kept and left out of R.
//! Runs on the server's CPU backend, where reading a tensor synchronously is fine.

use burn::tensor::{Device, Tensor, TensorData};

use crate::model::arch::{Arch, Layer};
use crate::model::{Act, Net, forward};

/// The mask keeping the `density` fraction of all weights with the highest SynFlow scores
/// (biases always kept), after `iters` rounds of scoring and pruning.
pub fn synflow_mask(
    arch: &Arch,
    theta: &[f32],
    density: f64,
    iters: u32,
    device: &Device,
) -> Vec<bool> {
    let specs = arch.params();
    let weights: Vec<usize> = specs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.name.ends_with(".weight"))
        .map(|(i, _)| i)
        .collect();
    let total: usize = weights.iter().map(|&t| specs[t].len).sum();
    let mut mask = vec![true; theta.len()];
    let ad = device.clone().autodiff();
    let [c, h, w] = arch.input;
    for k in 1..=iters.max(1) {
        let keep = (density.powf(k as f64 / iters.max(1) as f64) * total as f64).round() as usize;
        // |θ| on the surviving weights, rescaled per tensor; biases zero.
        let mut abs = vec![0f32; theta.len()];
        for &t in &weights {
            let p = &specs[t];
            for i in p.offset..p.offset + p.len {
                abs[i] = if mask[i] { theta[i].abs() } else { 0.0 };
            }
            let scale = unit_output_scale(&arch.layers[p.layer], &abs[p.offset..p.offset + p.len]);
            abs[p.offset..p.offset + p.len]
                .iter_mut()
                .for_each(|v| *v *= scale);
        }
        let net = Net::from_flat(arch, &abs, &ad);
        let ones =
            Tensor::<4>::from_data(TensorData::new(vec![1f32; c * h * w], [1, c, h, w]), &ad);
        let r = forward(arch, &net.weights(), Act::Image(ones), 0..arch.layers.len())
            .into_flat()
            .sum();
        let grads = r.backward();
        let mut scored: Vec<(f32, usize)> = Vec::with_capacity(total);
        for &t in &weights {
            let p = &specs[t];
            let g = net.params[t]
                .val()
                .grad(&grads)
                .map(|g| g.into_data().try_to_vec::<f32>().unwrap_or_default())
                .unwrap_or_default();
            for (j, i) in (p.offset..p.offset + p.len).enumerate() {
                let s = if mask[i] {
                    abs[i] * g.get(j).copied().unwrap_or(0.0)
                } else {
                    -1.0
                };
                scored.push((if s.is_finite() { s } else { 0.0 }, i));
            }
        }
        // Highest scores first; ties by position, so the result is deterministic.
        scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in &scored[keep.min(scored.len())..] {
            mask[i] = false;
        }
    }
    mask
}

/// 1 / the mean output of one unit (dense) or filter (conv) for an all-ones input.
fn unit_output_scale(layer: &Layer, w: &[f32]) -> f32 {
    let units = match layer {
        Layer::Dense { units, .. } => *units,
        Layer::Conv { filters, .. } => *filters,
        _ => return 1.0,
    };
    // Dense weights are [inputs, units]: a unit's sum is a column; conv weights are
    // [filters, ...]: a filter's sum is a contiguous block. Either way the mean over units is
    // the total over the unit count.
    let mean = w.iter().map(|v| *v as f64).sum::<f64>() / units as f64;
    if mean > 0.0 { (1.0 / mean) as f32 } else { 1.0 }
}

/// Fraction of each weight tensor the mask keeps, by parameter name.
pub fn layer_density(arch: &Arch, mask: &[bool]) -> Vec<(String, f64)> {
    arch.params()
        .iter()
        .filter(|p| p.name.ends_with(".weight"))
        .map(|p| {
            (
                p.name.clone(),
                mask[p.offset..p.offset + p.len]
                    .iter()
                    .filter(|k| **k)
                    .count() as f64
                    / p.len as f64,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-layer linear net, 2 → 2 → 1 (no ReLU needed: every value is positive).
    fn two_layer() -> (Arch, Vec<f32>) {
        let arch = Arch {
            input: [1, 1, 2],
            classes: 1,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 2,
                    units: 2,
                },
                Layer::Dense {
                    inputs: 2,
                    units: 1,
                },
            ],
        };
        // W1 = [[1, 2], [3, 4]] (inputs × units), b1 = 0, W2 = [[5], [−6]], b2 = 0.
        (arch, vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 5.0, -6.0, 0.0])
    }

    #[test]
    fn one_shot_scores_match_the_analytic_values() {
        // R = Σ_j (Σ_i |W1_ij|) |W2_j| = (1+3)·5 + (2+4)·6 = 56.
        // Score(W1_ij) = |W1_ij| · |W2_j|: 5, 12, 15, 24. Score(W2_j) = |W2_j| · Σ_i |W1_ij|: 20, 36.
        // Keeping 4 of the 6 weights in one shot keeps the 4 largest scores: W1_11 (24),
        // W2_2 (36), W2_1 (20), W1_10 (15); it drops W1_00 (5) and W1_01 (12).
        let (arch, theta) = two_layer();
        let m = synflow_mask(&arch, &theta, 4.0 / 6.0, 1, &Device::flex());
        assert_eq!(
            m,
            vec![false, false, true, true, true, true, true, true, true]
        );
    }

    #[test]
    fn works_for_both_cnns() {
        for model in ["cnn-small", "cnn"] {
            let arch = Arch::preset(model, [1, 28, 28], 10).unwrap();
            let theta = crate::model::state::ModelState::init(arch.clone(), 2).params;
            let m = synflow_mask(&arch, &theta, 0.2, 5, &Device::flex());
            let weights: usize = arch
                .params()
                .iter()
                .filter(|p| p.name.ends_with(".weight"))
                .map(|p| p.len)
                .sum();
            let kept: usize = layer_density(&arch, &m)
                .iter()
                .zip(arch.params().iter().filter(|p| p.name.ends_with(".weight")))
                .map(|((_, d), p)| (d * p.len as f64).round() as usize)
                .sum();
            assert_eq!(kept, (0.2 * weights as f64).round() as usize, "{model}");
            assert!(
                layer_density(&arch, &m).iter().all(|(_, d)| *d > 0.0),
                "{model}: a layer was cut off"
            );
        }
    }

    #[test]
    fn density_is_exact_and_no_layer_is_cut_off() {
        let arch = Arch::preset("mlp", [1, 8, 8], 10).unwrap();
        let theta = crate::model::state::ModelState::init(arch.clone(), 3).params;
        let m = synflow_mask(&arch, &theta, 0.1, 20, &Device::flex());
        let weights: usize = arch
            .params()
            .iter()
            .filter(|p| p.name.ends_with(".weight"))
            .map(|p| p.len)
            .sum();
        let kept: usize = arch
            .params()
            .iter()
            .filter(|p| p.name.ends_with(".weight"))
            .map(|p| m[p.offset..p.offset + p.len].iter().filter(|k| **k).count())
            .sum();
        assert_eq!(kept, (0.1 * weights as f64).round() as usize);
        assert!(
            arch.params()
                .iter()
                .filter(|p| p.name.ends_with(".bias"))
                .all(|p| m[p.offset..p.offset + p.len].iter().all(|k| *k))
        );
        for (name, d) in layer_density(&arch, &m) {
            assert!(d > 0.0, "{name} was cut off entirely");
        }
    }
}
