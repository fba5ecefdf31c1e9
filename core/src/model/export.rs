//! The global model as a safetensors file, for tools outside Canopy (PyTorch, burn, numpy).
//!
//! Tensors are named and shaped as a PyTorch `nn.Sequential` of the same layers, kept in a
//! module attribute called `layers`, names them: `layers.1.weight`, `layers.1.bias`... (the
//! index is the layer's place in [`Arch::layers`], activations and pooling included). A dense
//! layer's weight is written `[units, inputs]`, as `nn.Linear` holds it (Canopy keeps it
//! `[inputs, units]` for its matrix product); convolutions are `[filters, in_channels, k, k]` on
//! both sides. Pruned weights are written as zeros. With `with_mask`, every tensor's mask is
//! added as a bool tensor `<name>_mask` (the name `torch.nn.utils.prune` gives its buffers);
//! without it a plain `load_state_dict` takes the file as it is.
//!
//! The header's `__metadata__` (string values only, by the format) carries `format` ("canopy"),
//! `layout` ("pytorch"), `arch` (the [`Arch`] as JSON: enough to rebuild the model),
//! `mask_version` and `sparsity`. [`from_safetensors`] reads such a file back.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::model::arch::{Arch, Layer};
use crate::model::state::ModelState;

/// The `format` entry of the metadata.
pub const FORMAT: &str = "canopy";
/// The `layout` entry: tensors as PyTorch's modules hold them.
pub const LAYOUT: &str = "pytorch";

/// One tensor as the file holds it: its name, shape and values (PyTorch layout).
struct Exported {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
    mask: Option<Vec<bool>>,
}

/// The model as safetensors bytes: masked parameters in PyTorch layout, the architecture in
/// the metadata, and each tensor's mask as `<name>_mask` when `with_mask` (and the model has one).
pub fn to_safetensors(model: &ModelState, with_mask: bool) -> Result<Vec<u8>, String> {
    let params = model.masked_params();
    let mask = model.mask.as_deref().filter(|_| with_mask);
    let mut tensors = Vec::new();
    for spec in model.arch.params() {
        let range = spec.offset..spec.offset + spec.len;
        let (shape, values, m) = match (&model.arch.layers[spec.layer], spec.shape.as_slice()) {
            (Layer::Dense { .. }, &[inputs, units]) => (
                vec![units, inputs],
                transpose(&params[range.clone()], inputs, units),
                mask.map(|m| transpose(&m[range], inputs, units)),
            ),
            _ => (
                spec.shape.clone(),
                params[range.clone()].to_vec(),
                mask.map(|m| m[range].to_vec()),
            ),
        };
        tensors.push(Exported {
            name: spec.name,
            shape,
            values,
            mask: m,
        });
    }
    let bytes: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .into_iter()
        .flat_map(|t| {
            let mut out = vec![(
                t.name.clone(),
                t.shape.clone(),
                Dtype::F32,
                t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )];
            if let Some(m) = t.mask {
                out.push((
                    format!("{}_mask", t.name),
                    t.shape,
                    Dtype::BOOL,
                    m.iter().map(|k| *k as u8).collect(),
                ));
            }
            out
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, dtype, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("tensor {name}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let arch = serde_json::to_string(&model.arch).map_err(|e| e.to_string())?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("layout".to_string(), LAYOUT.to_string()),
        ("arch".to_string(), arch),
        ("mask_version".to_string(), model.mask_version.to_string()),
        ("sparsity".to_string(), model.sparsity().to_string()),
    ]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

/// A model written by [`to_safetensors`]: the architecture from the metadata, the parameters
/// back in Canopy's layout, and the mask if the file carries one for every tensor.
pub fn from_safetensors(bytes: &[u8]) -> Result<ModelState, String> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let meta = header
        .metadata()
        .as_ref()
        .ok_or("the file has no __metadata__")?;
    let entry = |key: &str| {
        meta.get(key)
            .ok_or_else(|| format!("the metadata has no '{key}'"))
    };
    if entry("format")? != FORMAT || entry("layout")? != LAYOUT {
        return Err("not a Canopy model in PyTorch layout".into());
    }
    let arch: Arch = serde_json::from_str(entry("arch")?).map_err(|e| format!("arch: {e}"))?;
    arch.validate().map_err(|e| e.to_string())?;
    let mask_version = entry("mask_version")?
        .parse()
        .map_err(|e| format!("mask_version: {e}"))?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut params = vec![0f32; arch.num_params()];
    let mut mask = vec![true; arch.num_params()];
    let mut masks = 0;
    let specs = arch.params();
    for spec in &specs {
        let dense = matches!(arch.layers[spec.layer], Layer::Dense { .. });
        let shape = match spec.shape.as_slice() {
            &[inputs, units] if dense => vec![units, inputs],
            s => s.to_vec(),
        };
        let t = file
            .tensor(&spec.name)
            .map_err(|e| format!("{}: {e}", spec.name))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
            return Err(format!(
                "{}: expected f32 {shape:?}, found {:?} {:?}",
                spec.name,
                t.dtype(),
                t.shape()
            ));
        }
        let values: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let out = &mut params[spec.offset..spec.offset + spec.len];
        match spec.shape.as_slice() {
            &[inputs, units] if dense => out.copy_from_slice(&transpose(&values, units, inputs)),
            _ => out.copy_from_slice(&values),
        }
        if let Ok(m) = file.tensor(&format!("{}_mask", spec.name)) {
            if m.dtype() != Dtype::BOOL || m.shape() != shape.as_slice() {
                return Err(format!("{}_mask: expected bool {shape:?}", spec.name));
            }
            let m: Vec<bool> = m.data().iter().map(|b| *b != 0).collect();
            let out = &mut mask[spec.offset..spec.offset + spec.len];
            match spec.shape.as_slice() {
                &[inputs, units] if dense => out.copy_from_slice(&transpose(&m, units, inputs)),
                _ => out.copy_from_slice(&m),
            }
            masks += 1;
        }
    }
    let mask = match masks {
        0 => None,
        n if n == specs.len() => Some(mask),
        _ => return Err("the file has masks for some tensors only".into()),
    };
    Ok(ModelState {
        arch,
        params,
        mask,
        mask_version,
    })
}

/// A row-major `[rows, cols]` matrix as `[cols, rows]`.
fn transpose<T: Copy>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| m[r * cols + c]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Net;
    use burn::tensor::{Device, Tensor, TensorData};
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    /// A model with a mask pruning about a third of its parameters, and inputs to try it on.
    fn pruned(name: &str, input: [usize; 3]) -> (ModelState, Vec<f32>) {
        let arch = Arch::preset(name, input, 10).unwrap();
        let mut model = ModelState::init(arch, 3);
        let mut rng = StdRng::seed_from_u64(4);
        let mask = (0..model.params.len())
            .map(|_| rng.random_range(0.0..1.0) > 0.3)
            .collect();
        model.set_mask(mask);
        let [c, h, w] = input;
        let x = (0..8 * c * h * w)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        (model, x)
    }

    fn logits(model: &ModelState, x: &[f32]) -> Vec<f32> {
        let device = Device::flex();
        let [c, h, w] = model.arch.input;
        let n = x.len() / (c * h * w);
        let net = Net::from_flat(&model.arch, &model.params, &device);
        let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [n, c, h, w]), &device);
        pollster::block_on(crate::model::read_f32(net.forward(&model.arch, x))).unwrap()
    }

    fn argmax(row: &[f32]) -> usize {
        (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b })
    }

    #[test]
    fn a_pruned_model_comes_back_from_its_file_with_the_same_predictions() {
        for (name, input) in [("mlp", [1, 28, 28]), ("cnn-small", [1, 8, 8])] {
            let (model, x) = pruned(name, input);
            let bytes = to_safetensors(&model, true).unwrap();
            let back = from_safetensors(&bytes).unwrap();
            assert_eq!(back.arch, model.arch, "{name}");
            assert_eq!(back.mask, model.mask, "{name}");
            assert_eq!(back.mask_version, model.mask_version);
            let (want, got) = (logits(&model, &x), logits(&back, &x));
            assert_eq!(want.len(), 8 * 10);
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() <= 1e-6, "{name}: {a} vs {b}");
            }
            for (a, b) in want.chunks(10).zip(got.chunks(10)) {
                assert_eq!(argmax(a), argmax(b), "{name}");
            }
        }
    }

    #[test]
    fn the_file_reads_as_pytorch_modules_with_pruned_weights_at_zero() {
        let (model, x) = pruned("mlp", [1, 28, 28]);
        // The same mask over weights it has not zeroed: the export must zero them itself.
        let mut raw = ModelState::init(model.arch.clone(), 3);
        raw.mask = model.mask.clone();
        assert_ne!(raw.params, model.params);
        let bytes = to_safetensors(&raw, false).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = file.names();
        names.sort();
        assert_eq!(
            names,
            [
                "layers.1.bias",
                "layers.1.weight",
                "layers.3.bias",
                "layers.3.weight",
                "layers.5.bias",
                "layers.5.weight"
            ],
            "no mask tensors unless asked"
        );
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().as_ref().unwrap();
        let arch: Arch = serde_json::from_str(&meta["arch"]).unwrap();
        assert_eq!(arch, model.arch);
        assert!((meta["sparsity"].parse::<f64>().unwrap() - model.sparsity()).abs() < 1e-12);
        let read = |name: &str| -> (Vec<usize>, Vec<f32>) {
            let t = file.tensor(name).unwrap();
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (t.shape().to_vec(), v)
        };
        // nn.Linear: weight [out_features, in_features], y = x·Wᵀ + b, then ReLU between.
        let mask = model.mask.as_ref().unwrap();
        let mut pruned_weights = 0;
        let mut act: Vec<Vec<f32>> = x.chunks(784).map(<[f32]>::to_vec).collect();
        for (i, layer) in [1, 3, 5].into_iter().enumerate() {
            let (shape, w) = read(&format!("layers.{layer}.weight"));
            let (_, b) = read(&format!("layers.{layer}.bias"));
            let (out, inp) = (shape[0], shape[1]);
            let spec = &model.arch.params()[2 * i];
            assert_eq!((spec.layer, &spec.shape), (layer, &vec![inp, out]));
            for o in 0..out {
                for j in 0..inp {
                    if !mask[spec.offset + j * out + o] {
                        assert_eq!(w[o * inp + j], 0.0, "pruned weight {layer}[{o},{j}]");
                        pruned_weights += 1;
                    }
                }
            }
            act = act
                .iter()
                .map(|a| {
                    (0..out)
                        .map(|o| {
                            let y = b[o] + (0..inp).map(|j| a[j] * w[o * inp + j]).sum::<f32>();
                            if i < 2 { y.max(0.0) } else { y }
                        })
                        .collect()
                })
                .collect();
        }
        assert!(pruned_weights > 50_000, "{pruned_weights}");
        let want = logits(&model, &x);
        for (a, b) in want.chunks(10).zip(&act) {
            assert_eq!(argmax(a), argmax(b));
            for (u, v) in a.iter().zip(b) {
                assert!((u - v).abs() < 1e-4, "{u} vs {v}");
            }
        }
    }

    #[test]
    fn a_file_that_is_not_a_canopy_model_is_refused() {
        let (model, _) = pruned("mlp", [1, 28, 28]);
        let bytes = to_safetensors(&model, false).unwrap();
        assert_eq!(from_safetensors(&bytes).unwrap().mask, None);
        let plain = safetensors::serialize(
            [(
                "w",
                TensorView::new(Dtype::F32, vec![1], &[0u8, 0, 0, 0]).unwrap(),
            )],
            None,
        )
        .unwrap();
        assert_eq!(
            from_safetensors(&plain).unwrap_err(),
            "the file has no __metadata__"
        );
    }
}
