//! The im2col convolution against burn's conv2d: forward outputs and the gradients of input,
//! weight and bias agree to 1e-4 across paddings, kernel sizes, channel counts and
//! non-square inputs.

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};
use canopy_core::model::conv::conv2d_im2col;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    Tensor::from_data(
        TensorData::new(values(shape.iter().product(), seed), shape),
        device,
    )
    .require_grad()
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Output, then gradients of x, weight, bias of `sum(conv(x) ⊙ r)`, for either convolution.
fn run(im2col: bool, [b, c, h, w]: [usize; 4], f: usize, k: usize, pad: usize) -> [Vec<f32>; 4] {
    let device = Device::flex().autodiff();
    let x = tensor([b, c, h, w], 1, &device);
    let wt = tensor([f, c, k, k], 2, &device);
    let bias = tensor([f], 3, &device);
    let out = if im2col {
        conv2d_im2col(x.clone(), wt.clone(), bias.clone(), pad)
    } else {
        conv2d(
            x.clone(),
            wt.clone(),
            Some(bias.clone()),
            ConvOptions::new([1, 1], [pad, pad], [1, 1], 1),
        )
    };
    let r = Tensor::from_data(
        TensorData::new(values(out.shape().num_elements(), 4), out.dims()),
        &device,
    );
    let grads = (out.clone() * r).sum().backward();
    let g = |t: &Tensor<_>| host(t.grad(&grads).expect("gradient"));
    [
        host(out),
        g(&x),
        g(&wt),
        host(bias.grad(&grads).expect("bias gradient")),
    ]
}

#[test]
fn im2col_conv_matches_burn_conv2d_forward_and_gradients() {
    // (input [B, C, H, W], filters, kernel, padding): same and valid, kernels 3 and 5, 1 to 16
    // channels, non-square inputs so rows and columns cannot be swapped unnoticed.
    let cases = [
        ([2, 1, 9, 7], 4, 3, 1),
        ([2, 1, 9, 7], 4, 3, 0),
        ([2, 3, 10, 8], 8, 5, 2),
        ([2, 3, 10, 8], 8, 5, 0),
        ([3, 8, 7, 6], 16, 3, 1),
        ([1, 16, 8, 8], 5, 5, 2),
        ([2, 4, 5, 5], 6, 5, 0),
    ];
    for (shape, f, k, pad) in cases {
        let want = run(false, shape, f, k, pad);
        let got = run(true, shape, f, k, pad);
        for (what, (a, b)) in [
            "output",
            "input gradient",
            "weight gradient",
            "bias gradient",
        ]
        .iter()
        .zip(want.iter().zip(&got))
        {
            let d = max_diff(a, b);
            assert!(
                d <= 1e-4,
                "{what} differs by {d} for input {shape:?}, {f} filters, kernel {k}, padding {pad}"
            );
        }
    }
}
