//! Surgery keeps the function of the kept units: a shrunk model computes exactly what the full
//! model computes once the pruned units are silenced.

use burn::tensor::{Device, Tensor, TensorData};
use canopy_core::model::arch::{Arch, Layer, Padding};
use canopy_core::model::state::ModelState;
use canopy_core::model::surgery::shrink;
use canopy_core::model::{Net, read_f32};

/// Zeroes the pruned units' own weights and biases. Every hidden layer is followed by ReLU (and
/// pooling), so a silenced unit outputs exactly 0 and contributes nothing downstream.
fn silence(state: &ModelState, keep: &[Option<Vec<usize>>]) -> Vec<f32> {
    let mut p = state.params.clone();
    let specs = state.arch.params();
    for (i, k) in keep.iter().enumerate() {
        let Some(k) = k else { continue };
        let ws = specs
            .iter()
            .find(|s| s.layer == i && s.shape.len() > 1)
            .unwrap();
        let bs = specs
            .iter()
            .find(|s| s.layer == i && s.shape.len() == 1)
            .unwrap();
        match state.arch.layers[i] {
            Layer::Dense { inputs, units } => {
                for j in (0..units).filter(|j| !k.contains(j)) {
                    for r in 0..inputs {
                        p[ws.offset + r * units + j] = 0.0;
                    }
                    p[bs.offset + j] = 0.0;
                }
            }
            Layer::Conv { filters, .. } => {
                let per = ws.len / filters;
                for f in (0..filters).filter(|f| !k.contains(f)) {
                    p[ws.offset + f * per..ws.offset + (f + 1) * per].fill(0.0);
                    p[bs.offset + f] = 0.0;
                }
            }
            _ => unreachable!(),
        }
    }
    p
}

fn logits(arch: &Arch, params: &[f32], x: &[f32], n: usize) -> Vec<f32> {
    let device = Device::flex();
    let [c, h, w] = arch.input;
    let net = Net::from_flat(arch, params, &device);
    let input = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [n, c, h, w]), &device);
    pollster::block_on(read_f32(net.forward(arch, input))).unwrap()
}

fn check(model: &str, keep: Vec<Option<Vec<usize>>>) {
    check_arch(Arch::preset(model, [1, 8, 8], 10).unwrap(), model, keep);
}

fn check_arch(arch: Arch, model: &str, keep: Vec<Option<Vec<usize>>>) {
    let mut state = ModelState::init(arch.clone(), 3);
    // Biases are zero at init in many frameworks; make them matter here.
    for p in arch.params().iter().filter(|p| p.shape.len() == 1) {
        for (j, v) in state.params[p.offset..p.offset + p.len]
            .iter_mut()
            .enumerate()
        {
            *v = 0.05 * (j % 3) as f32;
        }
    }
    let small = shrink(&state, &keep);
    small.arch.validate().unwrap();
    assert!(small.arch.num_params() < arch.num_params());
    let n = 4;
    let x: Vec<f32> = (0..n * 64)
        .map(|i| ((i * 37 % 101) as f32) / 101.0)
        .collect();
    let full = logits(&arch, &silence(&state, &keep), &x, n);
    let shrunk = logits(&small.arch, &small.params, &x, n);
    let diff = full
        .iter()
        .zip(&shrunk)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "{model}: outputs differ by {diff}");
    // And silencing really changed the function (the check is not vacuous).
    let original = logits(&arch, &state.params, &x, n);
    assert!(
        original
            .iter()
            .zip(&full)
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "{model}: pruned units did nothing"
    );
}

#[test]
fn mlp_surgery_preserves_kept_units() {
    let keep = vec![
        None,
        Some((0..200).filter(|j| j % 3 != 1).collect()),
        None,
        Some((0..200).filter(|j| j % 5 != 0).collect()),
        None,
        None,
    ];
    check("mlp", keep);
}

#[test]
fn cnn_surgery_preserves_kept_units_through_pooling_and_flatten() {
    // Conv 32 → pool → conv 64 → pool → flatten → dense 512 → dense 10.
    let keep = vec![
        Some((0..32).filter(|f| f % 4 != 0).collect()),
        None,
        None,
        Some((0..64).filter(|f| f % 3 != 2).collect()),
        None,
        None,
        None,
        Some((0..512).filter(|j| j % 2 == 0).collect()),
        None,
        None,
    ];
    check("cnn", keep);
}

#[test]
fn small_cnn_surgery_preserves_kept_units_through_global_pooling() {
    let keep = vec![
        Some(vec![0, 3, 5, 8, 13, 21, 30]),
        None,
        None,
        Some((0..64).filter(|f| f % 2 == 1).collect()),
        None,
        None,
        None,
        None,
    ];
    check("cnn-small", keep);
}

#[test]
fn valid_padding_surgery_maps_flattened_features_of_the_smaller_image() {
    // 8×8 → valid 3×3 conv → 6×6 → pool → 3×3 → flatten: each kept filter owns 9 features.
    let arch = Arch {
        input: [1, 8, 8],
        classes: 10,
        layers: vec![
            Layer::Conv {
                in_channels: 1,
                filters: 6,
                kernel: 3,
                padding: Padding::Valid,
            },
            Layer::Relu,
            Layer::MaxPool2,
            Layer::Flatten,
            Layer::Dense {
                inputs: 6 * 9,
                units: 10,
            },
        ],
    };
    arch.validate().unwrap();
    check_arch(
        arch,
        "valid conv + flatten",
        vec![Some(vec![1, 2, 4]), None, None, None, None],
    );
}
