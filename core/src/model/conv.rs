//! 2-D convolution (stride 1) written as im2col + one matrix product, from plain
//! differentiable tensor ops, so burn's autodiff derives the backward pass and the same code
//! runs natively, in a tab on wasm and on WebGPU.
//!
//! Why it exists: the patches are gathered once per forward pass (one `select`), the forward
//! pass and both gradients are one well-shaped GEMM each (`[F, C·K²] × [C·K², B·H·W]` for the
//! whole batch), and the input gradient ends in one scatter-add (the `select`'s backward),
//! where burn's CPU conv2d computes the weight gradient as a second convolution with the batch
//! as channels. Measured (docs/src/benchmarks/convolutions.md), it is no faster than burn's conv2d on the
//! CPU backend: burn-flex already runs convolutions as tiled im2col + GEMM, and the tab's real
//! cost was a GEMM without SIMD. So burn's conv2d stays the default ([`ConvPath::Burn`]) and
//! this path is kept, tested against it, for `canopy bench` and `just bench-browser` to compare
//! in the same run.

use std::sync::atomic::{AtomicU8, Ordering};

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Int, Tensor, TensorData};

/// Which convolution the forward pass uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPath {
    /// burn's own `conv2d`; the default.
    Burn,
    /// im2col + matrix product ([`conv2d_im2col`]).
    Im2col,
}

static PATH: AtomicU8 = AtomicU8::new(0);

/// Sets the convolution every later forward pass in this process uses (for benchmarks).
pub fn set_path(path: ConvPath) {
    PATH.store(matches!(path, ConvPath::Im2col) as u8, Ordering::Relaxed);
}

pub fn path() -> ConvPath {
    if PATH.load(Ordering::Relaxed) == 1 {
        ConvPath::Im2col
    } else {
        ConvPath::Burn
    }
}

/// `x` `[B, C, H, W]`, `weight` `[F, C, K, K]`, `bias` `[F]`, stride 1, `pad` zeros on every
/// side: `[B, F, H + 2·pad − K + 1, W + 2·pad − K + 1]`, by the process's [`ConvPath`].
pub fn conv2d_stride1(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, pad: usize) -> Tensor<4> {
    match path() {
        ConvPath::Im2col => conv2d_im2col(x, weight, bias, pad),
        ConvPath::Burn => conv2d(
            x,
            weight,
            Some(bias),
            ConvOptions::new([1, 1], [pad, pad], [1, 1], 1),
        ),
    }
}

/// The im2col formulation (see the module comment). Same result as burn's conv2d.
pub fn conv2d_im2col(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, pad: usize) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let [f, wc, k, k2] = weight.dims();
    assert!(
        wc == c && k == k2,
        "conv weight {:?} does not fit input {:?}",
        weight.dims(),
        x.dims()
    );
    assert!(
        h + 2 * pad >= k && w + 2 * pad >= k,
        "conv kernel {k} larger than the padded input {h}×{w} (+{pad})"
    );
    let (ho, wo) = (h + 2 * pad - k + 1, w + 2 * pad - k + 1);
    let device = x.device();
    // Channel-major planes [C, B·(H·W + 1)]: one zero after every plane stands for the
    // padding (out-of-image taps read it).
    let planes = x.swap_dims(0, 1).reshape([c * b, h * w]);
    let planes = Tensor::cat(vec![planes, Tensor::zeros([c * b, 1], &device)], 1)
        .reshape([c, b * (h * w + 1)]);
    let idx = Tensor::<1, Int>::from_data(
        TensorData::new(patch_indices(b, h, w, k, pad), [k * k * b * ho * wo]),
        &device,
    );
    // [C, K²·B·Ho·Wo] = [C·K², B·Ho·Wo]: rows in the weight's [F, C·K²] order, one column per
    // output pixel of the whole batch, so each product is a single well-shaped GEMM.
    let cols = planes.select(1, idx).reshape([c * k * k, b * ho * wo]);
    let out = weight.reshape([f, c * k * k]).matmul(cols) + bias.reshape([f, 1]);
    // Back to [B, F, Ho, Wo]. The reshape through a matrix makes the swapped view contiguous
    // here, once: pooling and the layers after it are several times slower on a strided input.
    out.reshape([f, b, ho * wo])
        .swap_dims(0, 1)
        .reshape([b, f * ho * wo])
        .reshape([b, f, ho, wo])
}

/// For tap (ky, kx), sample s and output pixel (oy, ox), in that order, the index into `b`
/// planes of `h·w` pixels each followed by one zero, of the input pixel the tap reads.
fn patch_indices(b: usize, h: usize, w: usize, k: usize, pad: usize) -> Vec<i32> {
    let (ho, wo) = (h + 2 * pad - k + 1, w + 2 * pad - k + 1);
    let plane = h * w + 1;
    let mut idx = Vec::with_capacity(k * k * b * ho * wo);
    for ky in 0..k {
        for kx in 0..k {
            for s in 0..b {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let (iy, ix) = (
                            (oy + ky) as isize - pad as isize,
                            (ox + kx) as isize - pad as isize,
                        );
                        let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                        let pixel = if inside {
                            iy as usize * w + ix as usize
                        } else {
                            h * w
                        };
                        idx.push((s * plane + pixel) as i32);
                    }
                }
            }
        }
    }
    idx
}
