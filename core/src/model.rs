//! The burn side of a model: parameters as burn tensors and the forward pass.
//!
//! Every parameter tensor is kept rank-1 and reshaped in the forward pass. That keeps one
//! generic container for all layer kinds and makes going to and from the flat vector of
//! [`ModelState`](crate::state::ModelState) a slice per tensor.

use burn::module::{Module, Param};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};

use crate::arch::{Arch, Layer};

#[derive(Module, Debug)]
pub struct Net {
    pub params: Vec<Param<Tensor<1>>>,
}

impl Net {
    /// Uploads `flat` (layout of [`Arch::params`]) to `device`.
    pub fn from_flat(arch: &Arch, flat: &[f32], device: &Device) -> Net {
        assert_eq!(flat.len(), arch.num_params(), "parameter vector does not match the architecture");
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

    /// Logits `[B, classes]` for inputs `[B, C, H, W]`.
    pub fn forward(&self, arch: &Arch, x: Tensor<4>) -> Tensor<2> {
        let mut image = Some(x);
        let mut flat: Option<Tensor<2>> = None;
        let mut next_param = 0;
        let mut take = |n: usize| {
            let i = next_param;
            next_param += n;
            i
        };
        for layer in &arch.layers {
            match *layer {
                Layer::Dense { inputs, units } => {
                    let i = take(2);
                    let w = self.params[i].val().reshape([inputs, units]);
                    let b = self.params[i + 1].val().reshape([1, units]);
                    flat = Some(flat.take().expect("validated").matmul(w) + b);
                }
                Layer::Conv { in_channels, filters, kernel, padding } => {
                    let i = take(2);
                    let w = self.params[i].val().reshape([filters, in_channels, kernel, kernel]);
                    let b = self.params[i + 1].val();
                    let pad = padding.pad(kernel);
                    let opts = ConvOptions::new([1, 1], [pad, pad], [1, 1], 1);
                    image = Some(conv2d(image.take().expect("validated"), w, Some(b), opts));
                }
                Layer::Relu => {
                    if let Some(x) = image.take() {
                        image = Some(burn::tensor::activation::relu(x));
                    } else if let Some(x) = flat.take() {
                        flat = Some(burn::tensor::activation::relu(x));
                    }
                }
                Layer::MaxPool2 => {
                    image = Some(max_pool2d(image.take().expect("validated"), MaxPoolOptions::new([2, 2])));
                }
                Layer::GlobalAvgPool => {
                    let x = image.take().expect("validated");
                    let [b, c, h, w] = x.dims();
                    flat = Some(x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c]));
                }
                Layer::Flatten => {
                    let x = image.take().expect("validated");
                    let [b, c, h, w] = x.dims();
                    flat = Some(x.reshape([b, c * h * w]));
                }
            }
        }
        flat.expect("validated architectures end flat")
    }
}

/// Reads a float tensor to the host without a synchronous read.
pub async fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, String> {
    let data = t.into_data_async().await.map_err(|e| format!("reading tensor: {e:?}"))?;
    data.try_into_vec::<f32>().map_err(|e| format!("reading tensor: {e:?}"))
}
