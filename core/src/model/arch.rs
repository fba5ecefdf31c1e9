//! Model architectures as plain data.
//!
//! An [`Arch`] is a list of layers plus the input shape. It travels in every task, so a tab can
//! rebuild exactly the model the server holds, and pruning methods that change widths only have
//! to edit this list. Parameters live in one flat `f32` vector whose layout [`Arch::params`]
//! derives from the layers: aggregation, masks and compression all work on that vector and never
//! need to know about burn.

use serde::{Deserialize, Serialize};

/// One layer. Convolutions use stride 1 and "same" or "valid" padding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layer {
    /// Fully connected: weight `[inputs, units]`, bias `[units]`.
    Dense {
        inputs: usize,
        units: usize,
    },
    /// 2-D convolution: weight `[filters, in_channels, kernel, kernel]`, bias `[filters]`.
    Conv {
        in_channels: usize,
        filters: usize,
        kernel: usize,
        #[serde(default)]
        padding: Padding,
    },
    Relu,
    /// 2×2 max pooling with stride 2.
    MaxPool2,
    /// Mean over the spatial dimensions: `[B, C, H, W]` becomes `[B, C]`.
    GlobalAvgPool,
    /// `[B, C, H, W]` becomes `[B, C·H·W]`.
    Flatten,
}

/// Padding of a convolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Output as large as the input (kernel / 2 zeros on each side; odd kernels only).
    #[default]
    Same,
    /// No padding: the output loses kernel − 1 rows and columns (Keras' default, the
    /// structured-pruning paper's CNN).
    Valid,
}

impl Padding {
    /// Zeros added on each side for a `kernel`-wide convolution.
    pub fn pad(self, kernel: usize) -> usize {
        match self {
            Padding::Same => kernel / 2,
            Padding::Valid => 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arch {
    /// Channels, height, width of one input sample.
    pub input: [usize; 3],
    pub classes: usize,
    pub layers: Vec<Layer>,
}

/// Where one parameter tensor sits in the flat vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// For example `layers.3.weight`.
    pub name: String,
    pub layer: usize,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

/// Shape of the activations between layers, without the batch dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Image([usize; 3]),
    Flat(usize),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchError {
    #[error("layer {layer} ({what}): {why}")]
    Mismatch {
        layer: usize,
        what: String,
        why: String,
    },
    #[error("the model ends with {0} outputs but the data has {1} classes")]
    Classes(usize, usize),
    #[error("unknown model '{0}' (known: mlp, cnn, cnn-small, cnn-paper)")]
    Unknown(String),
}

impl Arch {
    /// Built-in models, chosen by name in the config.
    pub fn preset(name: &str, input: [usize; 3], classes: usize) -> Result<Arch, ArchError> {
        use Layer::*;
        let [c, h, w] = input;
        let layers = match name {
            // FedAvg's "2NN".
            "mlp" => vec![
                Flatten,
                Dense {
                    inputs: c * h * w,
                    units: 200,
                },
                Relu,
                Dense {
                    inputs: 200,
                    units: 200,
                },
                Relu,
                Dense {
                    inputs: 200,
                    units: classes,
                },
            ],
            // FedAvg's CNN: two 5×5 convs with pooling, dense 512.
            "cnn" => [
                conv_stack(c, Padding::Same),
                vec![
                    Flatten,
                    Dense {
                        inputs: 64 * (h / 4) * (w / 4),
                        units: 512,
                    },
                    Relu,
                    Dense {
                        inputs: 512,
                        units: classes,
                    },
                ],
            ]
            .concat(),
            // The structured-pruning paper's small CNN with "same" padding: the same convs,
            // global average pooling, a dense head (works on inputs as small as 4×4).
            "cnn-small" => [
                conv_stack(c, Padding::Same),
                vec![
                    GlobalAvgPool,
                    Dense {
                        inputs: 64,
                        units: classes,
                    },
                ],
            ]
            .concat(),
            // The structured-pruning paper's CNN exactly (NguyenThaiVu/prune_fl_project,
            // `Define_Simple_CNN_Model`): Keras' default "valid" padding, so 28×28 → 24 → 12 → 8 → 4;
            // 56,126 parameters and ~7.5 MFLOPs with FEMNIST's 62 classes.
            "cnn-paper" => [
                conv_stack(c, Padding::Valid),
                vec![
                    GlobalAvgPool,
                    Dense {
                        inputs: 64,
                        units: classes,
                    },
                ],
            ]
            .concat(),
            other => return Err(ArchError::Unknown(other.to_string())),
        };
        let arch = Arch {
            input,
            classes,
            layers,
        };
        arch.validate()?;
        Ok(arch)
    }

    /// Checks that every layer's inputs match the previous layer's outputs.
    pub fn validate(&self) -> Result<(), ArchError> {
        let out = self.walk(|_, _, _| {})?;
        if out != self.classes {
            return Err(ArchError::Classes(out, self.classes));
        }
        Ok(())
    }

    /// Where split learning cuts: after the first `weight_layers` dense or conv layers and what
    /// follows them (activation, pooling, flattening) up to the next one. Returns the number of
    /// layers in the front; its output must be flat (cut after Flatten or GlobalAvgPool).
    pub fn split_point(&self, weight_layers: usize) -> Result<usize, String> {
        let weights: Vec<usize> = (0..self.layers.len())
            .filter(|&i| matches!(self.layers[i], Layer::Dense { .. } | Layer::Conv { .. }))
            .collect();
        if weight_layers == 0 || weight_layers >= weights.len() {
            return Err(format!(
                "cut {weight_layers}: the model has {} weight layers, so cut must be 1 to {}",
                weights.len(),
                weights.len() - 1
            ));
        }
        let end = weights[weight_layers];
        self.front(end)
            .map_err(|e| format!("cut {weight_layers}: {e}"))?;
        Ok(end)
    }

    /// Layers `..n` as a model of their own (split learning's front). Its `classes` is the width
    /// of its flat output, which is what it sends to the server.
    pub fn front(&self, n: usize) -> Result<Arch, String> {
        let mut front = Arch {
            input: self.input,
            classes: 0,
            layers: self.layers[..n.min(self.layers.len())].to_vec(),
        };
        front.classes = front.walk(|_, _, _| {}).map_err(|e| {
            format!("the front does not end flat ({e}); cut after Flatten or GlobalAvgPool")
        })?;
        Ok(front)
    }

    /// Layout of the flat parameter vector.
    pub fn params(&self) -> Vec<ParamSpec> {
        let mut specs = Vec::new();
        let mut offset = 0;
        for (i, layer) in self.layers.iter().enumerate() {
            let shapes: Vec<(&str, Vec<usize>)> = match *layer {
                Layer::Dense { inputs, units } => {
                    vec![("weight", vec![inputs, units]), ("bias", vec![units])]
                }
                Layer::Conv {
                    in_channels,
                    filters,
                    kernel,
                    ..
                } => vec![
                    ("weight", vec![filters, in_channels, kernel, kernel]),
                    ("bias", vec![filters]),
                ],
                _ => vec![],
            };
            for (kind, shape) in shapes {
                let len = shape.iter().product();
                specs.push(ParamSpec {
                    name: format!("layers.{i}.{kind}"),
                    layer: i,
                    shape,
                    offset,
                    len,
                });
                offset += len;
            }
        }
        specs
    }

    /// The weight and bias tensors of layer `layer` (Dense and Conv layers have exactly these
    /// two; other layers have none). Everything that walks parameters layer by layer uses this.
    pub fn weight_and_bias(&self, layer: usize) -> Option<(ParamSpec, ParamSpec)> {
        let mut specs = self.params().into_iter().filter(|p| p.layer == layer);
        Some((specs.next()?, specs.next()?))
    }

    /// Index into [`Arch::params`] of the first tensor of layer `layer`.
    pub fn first_tensor(&self, layer: usize) -> usize {
        self.params().iter().filter(|p| p.layer < layer).count()
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.len).sum()
    }

    /// Forward-pass floating point operations for one sample (a multiply-add counts as two).
    pub fn flops_per_sample(&self) -> u64 {
        let mut flops = 0u64;
        // validate() has accepted the shapes, so walk cannot fail here.
        let _ = self.walk(|layer, before, after| {
            flops += match (layer, after) {
                (Layer::Dense { inputs, units }, _) => {
                    2 * (*inputs * *units) as u64 + *units as u64
                }
                (
                    Layer::Conv {
                        in_channels,
                        kernel,
                        ..
                    },
                    Act::Image([f, h, w]),
                ) => (2 * in_channels * kernel * kernel + 1) as u64 * (f * h * w) as u64,
                (Layer::Relu | Layer::MaxPool2 | Layer::GlobalAvgPool, _) => act_len(before) as u64,
                _ => 0,
            }
        });
        flops
    }

    /// FLOPs per sample when pruned weights cost nothing: each dense or conv layer's
    /// multiply-adds scale with the fraction of its weights the mask keeps.
    pub fn effective_flops(&self, mask: Option<&[bool]>) -> u64 {
        let Some(mask) = mask else {
            return self.flops_per_sample();
        };
        let mut density = vec![1.0f64; self.layers.len()];
        for p in self.params().iter().filter(|p| p.shape.len() > 1) {
            let kept = mask[p.offset..p.offset + p.len]
                .iter()
                .filter(|k| **k)
                .count();
            density[p.layer] = kept as f64 / p.len.max(1) as f64;
        }
        let mut flops = 0f64;
        let mut i = 0;
        let _ = self.walk(|layer, before, after| {
            flops += match (layer, after) {
                (Layer::Dense { inputs, units }, _) => {
                    2.0 * (*inputs * *units) as f64 * density[i] + *units as f64
                }
                (
                    Layer::Conv {
                        in_channels,
                        kernel,
                        ..
                    },
                    Act::Image([f, h, w]),
                ) => {
                    (2.0 * (in_channels * kernel * kernel) as f64 * density[i] + 1.0)
                        * (f * h * w) as f64
                }
                (Layer::Relu | Layer::MaxPool2 | Layer::GlobalAvgPool, _) => act_len(before) as f64,
                _ => 0.0,
            };
            i += 1;
        });
        flops.round() as u64
    }

    /// Widths of the prunable layers (units or filters), in order; for dashboards and logs.
    pub fn widths(&self) -> Vec<usize> {
        self.layers
            .iter()
            .filter_map(|l| match l {
                Layer::Dense { units, .. } => Some(*units),
                Layer::Conv { filters, .. } => Some(*filters),
                _ => None,
            })
            .collect()
    }

    /// Runs shape inference, calling `visit(layer, input, output)` for each layer, and returns
    /// the flat output width.
    fn walk(&self, mut visit: impl FnMut(&Layer, Act, Act)) -> Result<usize, ArchError> {
        let mut act = Act::Image(self.input);
        for (i, layer) in self.layers.iter().enumerate() {
            let err = |why: String| ArchError::Mismatch {
                layer: i,
                what: format!("{layer:?}"),
                why,
            };
            let next = match (layer, act) {
                (Layer::Dense { inputs, units }, Act::Flat(n)) => {
                    if *inputs != n {
                        return Err(err(format!("expects {inputs} inputs, gets {n}")));
                    }
                    Act::Flat(*units)
                }
                (Layer::Dense { .. }, Act::Image(_)) => {
                    return Err(err("needs Flatten or GlobalAvgPool before it".into()));
                }
                (
                    Layer::Conv {
                        in_channels,
                        filters,
                        kernel,
                        padding,
                    },
                    Act::Image([c, h, w]),
                ) => {
                    if *in_channels != c {
                        return Err(err(format!("expects {in_channels} channels, gets {c}")));
                    }
                    match padding {
                        Padding::Same if kernel % 2 == 0 => {
                            return Err(err("'same' padding needs an odd kernel".into()));
                        }
                        Padding::Same => Act::Image([*filters, h, w]),
                        Padding::Valid if h < *kernel || w < *kernel => {
                            return Err(err(format!(
                                "input {h}×{w} smaller than the {kernel}×{kernel} kernel"
                            )));
                        }
                        Padding::Valid => Act::Image([*filters, h + 1 - kernel, w + 1 - kernel]),
                    }
                }
                (Layer::MaxPool2, Act::Image([c, h, w])) => {
                    if h < 2 || w < 2 {
                        return Err(err(format!("input {h}×{w} too small to pool")));
                    }
                    Act::Image([c, h / 2, w / 2])
                }
                (Layer::GlobalAvgPool, Act::Image([c, _, _])) => Act::Flat(c),
                (Layer::Flatten, Act::Image([c, h, w])) => Act::Flat(c * h * w),
                (Layer::Relu, a) => a,
                (_, Act::Flat(_)) => return Err(err("needs an image input".into())),
            };
            visit(layer, act, next);
            act = next;
        }
        match act {
            Act::Flat(n) => Ok(n),
            Act::Image(_) => Err(ArchError::Mismatch {
                layer: self.layers.len(),
                what: "output".into(),
                why: "the model must end with a flat output".into(),
            }),
        }
    }
}

/// Two 5×5 convolutions (32 and 64 filters), each followed by ReLU and 2×2 max pooling.
fn conv_stack(channels: usize, padding: Padding) -> Vec<Layer> {
    use Layer::*;
    vec![
        Conv {
            in_channels: channels,
            filters: 32,
            kernel: 5,
            padding,
        },
        Relu,
        MaxPool2,
        Conv {
            in_channels: 32,
            filters: 64,
            kernel: 5,
            padding,
        },
        Relu,
        MaxPool2,
    ]
}

fn act_len(a: Act) -> usize {
    match a {
        Act::Image([c, h, w]) => c * h * w,
        Act::Flat(n) => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlp_has_fedavg_2nn_size() {
        let a = Arch::preset("mlp", [1, 28, 28], 10).unwrap();
        assert_eq!(
            a.num_params(),
            784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
        );
        assert_eq!(a.widths(), vec![200, 200, 10]);
    }

    #[test]
    fn cnn_has_fedavg_cnn_size() {
        // FedAvg's paper gives 1,663,370 parameters for this CNN.
        let a = Arch::preset("cnn", [1, 28, 28], 10).unwrap();
        assert_eq!(a.num_params(), 1_663_370);
    }

    #[test]
    fn paper_cnn_matches_the_structured_pruning_paper() {
        // The paper's FEMNIST CNN: 56,126 parameters, 7.53 MFLOPs (TensorFlow's profiler).
        let a = Arch::preset("cnn-paper", [1, 28, 28], 62).unwrap();
        assert_eq!(a.num_params(), 56_126);
        let f = a.flops_per_sample() as f64;
        assert!((f / 7.53e6 - 1.0).abs() < 0.01, "{f}");
        // "Same" padding costs ~3× more: the second conv sees 14×14 instead of 12×12 → 8×8.
        assert!(
            Arch::preset("cnn-small", [1, 28, 28], 62)
                .unwrap()
                .flops_per_sample() as f64
                > 2.5 * f
        );
        assert_eq!(
            Arch::preset("cnn-paper", [1, 28, 28], 10)
                .unwrap()
                .num_params(),
            52_746
        );
        // Too small an input for two valid 5×5 convs is an error, not a panic.
        assert!(Arch::preset("cnn-paper", [1, 8, 8], 10).is_err());
    }

    #[test]
    fn layout_is_contiguous() {
        let a = Arch::preset("cnn", [1, 28, 28], 10).unwrap();
        let specs = a.params();
        let mut next = 0;
        for s in &specs {
            assert_eq!(s.offset, next);
            next += s.len;
        }
        assert_eq!(next, a.num_params());
        assert_eq!(specs[0].shape, vec![32, 1, 5, 5]);
    }

    #[test]
    fn mismatched_widths_are_rejected() {
        let mut a = Arch::preset("mlp", [1, 28, 28], 10).unwrap();
        a.layers[3] = Layer::Dense {
            inputs: 100,
            units: 200,
        };
        assert!(matches!(
            a.validate(),
            Err(ArchError::Mismatch { layer: 3, .. })
        ));
        assert!(Arch::preset("resnet", [1, 28, 28], 10).is_err());
    }

    #[test]
    fn effective_flops_scale_with_density() {
        let a = Arch {
            input: [1, 2, 2],
            classes: 3,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 4,
                    units: 3,
                },
            ],
        };
        let mut mask = vec![true; a.num_params()];
        mask[..6].fill(false);
        assert_eq!(a.effective_flops(Some(&mask)), 12 + 3);
        assert_eq!(a.effective_flops(None), a.flops_per_sample());
    }

    #[test]
    fn flops_count_dense_layers() {
        let a = Arch {
            input: [1, 2, 2],
            classes: 3,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 4,
                    units: 3,
                },
            ],
        };
        assert_eq!(a.flops_per_sample(), 2 * 12 + 3);
    }
}
