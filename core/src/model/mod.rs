//! The burn side of a model: parameters as burn tensors and the forward pass.
//!
//! Every parameter tensor is kept rank-1 and reshaped in the forward pass. That keeps one
//! generic container for all layer kinds and makes going to and from the flat vector of
//! [`ModelState`](crate::model::state::ModelState) a slice per tensor. The forward pass takes the
//! weights as a list rather than reading them from a `Net`, so a training step can compute the
//! weights it uses from what it learns (see [`crate::train::step`]), and it can run any range of
//! layers (split learning runs the front on the client and the back on the server).

pub mod arch;
pub mod conv;
// Native only (the server exports the model; tabs never do): see core/Cargo.toml.
#[cfg(not(target_arch = "wasm32"))]
pub mod export;
pub mod state;
pub mod surgery;
pub mod synflow;

use std::ops::Range;

use burn::module::{Module, Param};
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;
use burn::tensor::{Device, Tensor, TensorData};

use crate::model::arch::{Arch, Layer};

#[derive(Module, Debug)]
pub struct Net {
    pub params: Vec<Param<Tensor<1>>>,
}

/// An activation between layers: images `[B, C, H, W]` until flattened, then `[B, F]`.
#[derive(Clone, Debug)]
pub enum Act {
    Image(Tensor<4>),
    Flat(Tensor<2>),
}

impl Act {
    /// As a matrix `[B, features]` (images are flattened).
    pub fn into_flat(self) -> Tensor<2> {
        match self {
            Act::Flat(x) => x,
            Act::Image(x) => {
                let [b, c, h, w] = x.dims();
                x.reshape([b, c * h * w])
            }
        }
    }
}

impl Net {
    /// Uploads `flat` (layout of [`Arch::params`]) to `device`.
    pub fn from_flat(arch: &Arch, flat: &[f32], device: &Device) -> Net {
        assert_eq!(
            flat.len(),
            arch.num_params(),
            "parameter vector does not match the architecture"
        );
        let params = arch
            .params()
            .iter()
            .map(|p| {
                let data = TensorData::new(flat[p.offset..p.offset + p.len].to_vec(), [p.len]);
                Param::from_tensor(Tensor::from_data(data, device))
            })
            .collect();
        Net { params }
    }

    /// Reads all parameters back as one flat vector. Async: a synchronous read panics on WebGPU.
    pub async fn to_flat(&self) -> Result<Vec<f32>, String> {
        let all = Tensor::cat(self.params.iter().map(|p| p.val()).collect(), 0);
        read_f32(all).await
    }

    /// The parameter tensors as the forward pass takes them.
    pub fn weights(&self) -> Vec<Tensor<1>> {
        self.params.iter().map(|p| p.val()).collect()
    }

    /// Logits `[B, classes]` for inputs `[B, C, H, W]`.
    pub fn forward(&self, arch: &Arch, x: Tensor<4>) -> Tensor<2> {
        forward(arch, &self.weights(), Act::Image(x), 0..arch.layers.len()).into_flat()
    }
}

/// Runs layers `layers` of `arch` on `x`. `weights` holds the tensors of exactly those layers,
/// in the order of [`Arch::params`].
pub fn forward(arch: &Arch, weights: &[Tensor<1>], x: Act, layers: Range<usize>) -> Act {
    let mut x = x;
    let mut next = 0;
    for layer in &arch.layers[layers] {
        x = match (layer.clone(), x) {
            (Layer::Dense { inputs, units }, x) => {
                let w = weights[next].clone().reshape([inputs, units]);
                let b = weights[next + 1].clone().reshape([1, units]);
                next += 2;
                Act::Flat(x.into_flat().matmul(w) + b)
            }
            (
                Layer::Conv {
                    in_channels,
                    filters,
                    kernel,
                    padding,
                },
                Act::Image(x),
            ) => {
                let w = weights[next]
                    .clone()
                    .reshape([filters, in_channels, kernel, kernel]);
                let b = weights[next + 1].clone();
                next += 2;
                Act::Image(crate::model::conv::conv2d_stride1(
                    x,
                    w,
                    b,
                    padding.pad(kernel),
                ))
            }
            (Layer::Relu, Act::Image(x)) => Act::Image(burn::tensor::activation::relu(x)),
            (Layer::Relu, Act::Flat(x)) => Act::Flat(burn::tensor::activation::relu(x)),
            (Layer::MaxPool2, Act::Image(x)) => {
                Act::Image(max_pool2d(x, MaxPoolOptions::new([2, 2])))
            }
            (Layer::GlobalAvgPool, Act::Image(x)) => {
                let [b, c, h, w] = x.dims();
                Act::Flat(x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c]))
            }
            (Layer::Flatten, x) => Act::Flat(x.into_flat()),
            (layer, _) => panic!(
                "layer {layer:?} needs an image input (architectures are validated before use)"
            ),
        };
    }
    x
}

/// Reads a float tensor to the host without a synchronous read.
pub async fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, String> {
    let data = t
        .into_data_async()
        .await
        .map_err(|e| format!("reading tensor: {e:?}"))?;
    data.try_into_vec::<f32>()
        .map_err(|e| format!("reading tensor: {e:?}"))
}
