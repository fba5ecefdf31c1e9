//! Structured pruning's model surgery: remove whole units (dense neurons, conv filters) and the
//! inputs of the next layer that read them, so the model is physically smaller.

use crate::model::arch::{Arch, Layer, Padding};
use crate::model::state::ModelState;

/// L1 norm of each unit's weights, per prunable layer (`None` for layers without units, and for
/// the output layer, whose units are the classes).
pub fn unit_scores(state: &ModelState) -> Vec<Option<Vec<f32>>> {
    unit_norms(&state.arch, &state.params, false)
}

/// L1 norm of each unit's incoming weights in `values` (any vector in the layout of
/// `arch.params()`: the weights, or their movement since some earlier point), per prunable layer.
/// `None` for layers without units, for the output layer, and for dense layers when `conv_only`.
pub fn unit_norms(arch: &Arch, values: &[f32], conv_only: bool) -> Vec<Option<Vec<f32>>> {
    assert_eq!(
        values.len(),
        arch.num_params(),
        "vector does not match the architecture"
    );
    let last = last_param_layer(arch);
    let mut out = vec![None; arch.layers.len()];
    for p in arch
        .params()
        .iter()
        .filter(|p| p.shape.len() > 1 && Some(p.layer) != last)
    {
        let w = &values[p.offset..p.offset + p.len];
        out[p.layer] = match arch.layers[p.layer] {
            Layer::Dense { .. } if conv_only => None,
            Layer::Dense { inputs, units } => Some(
                (0..units)
                    .map(|j| (0..inputs).map(|i| w[i * units + j].abs()).sum())
                    .collect(),
            ),
            Layer::Conv { filters, .. } => {
                let per = p.len / filters;
                Some(
                    (0..filters)
                        .map(|f| w[f * per..(f + 1) * per].iter().map(|v| v.abs()).sum())
                        .collect(),
                )
            }
            _ => unreachable!("only dense and conv layers have weights"),
        };
    }
    out
}

fn last_param_layer(arch: &Arch) -> Option<usize> {
    arch.layers
        .iter()
        .rposition(|l| matches!(l, Layer::Dense { .. } | Layer::Conv { .. }))
}

/// Units to keep: those whose score lies within μ ± λσ of their layer's scores (both tails go;
/// with `upper_tail = false` only the low one), and never fewer than `min_units` (the
/// highest-scoring ones then).
pub fn keep_within_bounds(
    scores: &[f32],
    lambda: f32,
    min_units: usize,
    upper_tail: bool,
) -> Vec<usize> {
    let n = scores.len() as f32;
    let mean = scores.iter().sum::<f32>() / n;
    let sd = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f32>() / n).sqrt();
    // Scores equal up to rounding have no outliers (a spread of a few ulps is not a tail).
    if sd <= 1e-5 * mean.abs() {
        return (0..scores.len()).collect();
    }
    let (lo, hi) = (
        mean - lambda * sd,
        if upper_tail {
            mean + lambda * sd
        } else {
            f32::INFINITY
        },
    );
    let mut keep: Vec<usize> = (0..scores.len())
        .filter(|&j| scores[j] >= lo && scores[j] <= hi)
        .collect();
    let floor = min_units.min(scores.len());
    if keep.len() < floor {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        keep = order[..floor].to_vec();
        keep.sort_unstable();
    }
    keep
}

/// A narrower copy of `state`: for each layer with `Some(kept units)`, only those units remain,
/// and the next layer keeps only the inputs that read them (through pooling and flattening).
/// Surviving weights are copied exactly. A mask, if any, is dropped.
pub fn shrink(state: &ModelState, keep: &[Option<Vec<usize>>]) -> ModelState {
    let arch = &state.arch;
    assert_eq!(keep.len(), arch.layers.len(), "one entry per layer");
    let mut params = Vec::new();
    let mut layers = Vec::new();
    // Old indices of the channels (image) or features (flat) the current activation keeps.
    let mut kept_in: Option<Vec<usize>> = None;
    let [_, mut h, mut w] = arch.input;
    // Activation rows and columns are tracked so Flatten knows which features a channel owns.
    for (i, layer) in arch.layers.iter().enumerate() {
        match *layer {
            Layer::Dense { inputs, units } => {
                let (ws, bs) = arch
                    .weight_and_bias(i)
                    .expect("dense and conv layers have a weight and a bias");
                let rows = kept_in.clone().unwrap_or_else(|| (0..inputs).collect());
                let cols = keep[i].clone().unwrap_or_else(|| (0..units).collect());
                let wt = &state.params[ws.offset..ws.offset + ws.len];
                for &r in &rows {
                    params.extend(cols.iter().map(|&j| wt[r * units + j]));
                }
                params.extend(cols.iter().map(|&j| state.params[bs.offset + j]));
                layers.push(Layer::Dense {
                    inputs: rows.len(),
                    units: cols.len(),
                });
                kept_in = if cols.len() == units {
                    None
                } else {
                    Some(cols)
                };
            }
            Layer::Conv {
                in_channels,
                filters,
                kernel,
                padding,
            } => {
                let (ws, bs) = arch
                    .weight_and_bias(i)
                    .expect("dense and conv layers have a weight and a bias");
                let ins = kept_in
                    .clone()
                    .unwrap_or_else(|| (0..in_channels).collect());
                let outs = keep[i].clone().unwrap_or_else(|| (0..filters).collect());
                let kk = kernel * kernel;
                let wt = &state.params[ws.offset..ws.offset + ws.len];
                for &f in &outs {
                    for &ch in &ins {
                        let at = (f * in_channels + ch) * kk;
                        params.extend_from_slice(&wt[at..at + kk]);
                    }
                }
                params.extend(outs.iter().map(|&f| state.params[bs.offset + f]));
                layers.push(Layer::Conv {
                    in_channels: ins.len(),
                    filters: outs.len(),
                    kernel,
                    padding,
                });
                if padding == Padding::Valid {
                    h = h + 1 - kernel;
                    w = w + 1 - kernel;
                }
                kept_in = if outs.len() == filters {
                    None
                } else {
                    Some(outs)
                };
            }
            Layer::MaxPool2 => {
                h /= 2;
                w /= 2;
                layers.push(Layer::MaxPool2);
            }
            Layer::Flatten => {
                // Channel ch of [C, H, W] becomes features ch·H·W … (ch+1)·H·W − 1.
                let hw = h * w;
                kept_in =
                    kept_in.map(|chs| chs.iter().flat_map(|&ch| ch * hw..(ch + 1) * hw).collect());
                layers.push(Layer::Flatten);
            }
            Layer::GlobalAvgPool => layers.push(Layer::GlobalAvgPool),
            Layer::Relu => layers.push(Layer::Relu),
        }
    }
    let new = Arch {
        input: arch.input,
        classes: arch.classes,
        layers,
    };
    debug_assert_eq!(params.len(), new.num_params());
    ModelState {
        arch: new,
        params,
        mask: None,
        mask_version: state.mask_version,
    }
}

/// Every hidden layer cut to its first `keep` fraction of units (at least one): a narrower model
/// of the same family, for benchmarks that compare widths.
pub fn shrink_to(state: &ModelState, keep: f32) -> ModelState {
    if keep >= 1.0 {
        return state.clone();
    }
    let cut: Vec<Option<Vec<usize>>> = unit_scores(state)
        .into_iter()
        .map(|s| s.map(|s| (0..((s.len() as f32 * keep).ceil() as usize).max(1)).collect()))
        .collect();
    shrink(state, &cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_drop_both_tails() {
        // Eight ordinary units, one far above and one far below: μ = 1.8, σ ≈ 2.75.
        let scores = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0, 10.0, 0.0];
        assert_eq!(
            keep_within_bounds(&scores, 0.5, 2, true),
            vec![0, 1, 2, 3, 4, 5, 6, 7]
        );
        // λ = 1.5 keeps the low one (μ − 1.5σ < 0) and drops only the high one.
        assert_eq!(
            keep_within_bounds(&scores, 1.5, 2, true),
            vec![0, 1, 2, 3, 4, 5, 6, 7, 9]
        );
        // Without the upper tail, the strong unit stays.
        assert_eq!(
            keep_within_bounds(&scores, 0.5, 2, false),
            vec![0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        // A wide band keeps everything; the floor keeps the strongest when the band is empty.
        assert_eq!(keep_within_bounds(&scores, 10.0, 2, true).len(), 10);
        assert_eq!(
            keep_within_bounds(&[1.0, 5.0, 3.0], 0.0, 2, true),
            vec![1, 2]
        );
    }

    #[test]
    fn scores_are_l1_norms_of_each_unit() {
        let arch = Arch {
            input: [1, 1, 2],
            classes: 2,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 2,
                    units: 3,
                },
                Layer::Relu,
                Layer::Dense {
                    inputs: 3,
                    units: 2,
                },
            ],
        };
        let mut s = ModelState::init(arch, 1);
        // Weight [2, 3] row-major: unit j is column j.
        s.params[..6].copy_from_slice(&[1.0, -2.0, 0.5, 3.0, 0.0, -0.5]);
        let scores = unit_scores(&s);
        assert_eq!(scores[1], Some(vec![4.0, 2.0, 1.0]));
        assert_eq!(scores[3], None, "the output layer's units are the classes");
    }

    #[test]
    fn shrinking_a_dense_layer_removes_the_next_layers_rows() {
        let arch = Arch {
            input: [1, 1, 2],
            classes: 2,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 2,
                    units: 3,
                },
                Layer::Relu,
                Layer::Dense {
                    inputs: 3,
                    units: 2,
                },
            ],
        };
        let mut s = ModelState::init(arch, 1);
        let n = s.params.len();
        for (i, v) in s.params.iter_mut().enumerate() {
            *v = i as f32;
        }
        let small = shrink(&s, &[None, Some(vec![0, 2]), None, None]);
        assert_eq!(small.arch.widths(), vec![2, 2]);
        // W1 [2,3] = 0..6 → columns 0 and 2; b1 = 6,7,8 → 6, 8; W2 [3,2] = 9..15 → rows 0 and 2.
        assert_eq!(
            small.params,
            vec![
                0.0, 2.0, 3.0, 5.0, 6.0, 8.0, 9.0, 10.0, 13.0, 14.0, 15.0, 16.0
            ]
        );
        assert_eq!(n, 17);
    }
}
