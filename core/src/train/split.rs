//! Split learning's server half and its narrower fronts.
//!
//! The client trains the front (layers `..cut`) with a remote loss; for every batch the server
//! runs the back (layers `cut..`) on the front's output, takes one optimizer step on the back and
//! returns the gradient at the cut ([`back_step`]). A front pruned at rate ρ is made physically
//! narrower with the structured-pruning surgery ([`Front::pruned`]): units with the smallest L1
//! norm go, so the tab computes less and sends fewer activations; the server maps what it gets
//! back to the full model.

use burn::tensor::{Device, Tensor, TensorData};

use crate::codec::exchange::Batch;
use crate::model::arch::Arch;
use crate::model::state::ModelState;
use crate::model::surgery;
use crate::model::{Act, forward, read_f32};
use crate::train::step::cross_entropy;

/// The back of one client (or the shared one): its parameters (the full model's tensors from
/// the cut on, in order) and what an optimizer step needs to remember.
#[derive(Clone, Debug)]
pub struct Back {
    pub params: Vec<f32>,
    velocity: Vec<f32>,
    /// Samples and batches it has been trained on this round.
    pub samples: u64,
    pub batches: u64,
}

impl Back {
    pub fn new(params: Vec<f32>) -> Back {
        Back {
            params,
            velocity: Vec::new(),
            samples: 0,
            batches: 0,
        }
    }
}

/// Where the back's parameters start in the full model's flat vector.
pub fn back_offset(arch: &Arch, cut: usize) -> usize {
    arch.params()
        .get(arch.first_tensor(cut))
        .map_or(arch.num_params(), |p| p.offset)
}

/// One SGD step (with `momentum`, PyTorch-style) of `back` on `batch`, the front's full flat
/// output (dropped entries zero, kept ones rescaled). Returns the batch's mean cross-entropy and
/// its gradient with respect to the batch's values.
pub async fn back_step(
    arch: &Arch,
    cut: usize,
    back: &mut Back,
    batch: &Batch,
    lr: f64,
    momentum: f64,
    device: &Device,
) -> Result<(f32, Vec<f32>), String> {
    let ad = device.clone().autodiff();
    let specs = arch.params();
    let (first, base) = (arch.first_tensor(cut), back_offset(arch, cut));
    if back.params.len() != arch.num_params() - base {
        return Err(format!(
            "back of {} values, the model's back has {}",
            back.params.len(),
            arch.num_params() - base
        ));
    }
    let weights: Vec<Tensor<1>> = specs[first..]
        .iter()
        .map(|p| {
            Tensor::from_data(
                TensorData::new(
                    back.params[p.offset - base..p.offset - base + p.len].to_vec(),
                    [p.len],
                ),
                &ad,
            )
            .require_grad()
        })
        .collect();
    let x = Tensor::<2>::from_data(
        TensorData::new(batch.values.clone(), [batch.rows, batch.cols]),
        &ad,
    )
    .require_grad();
    let logits = forward(arch, &weights, Act::Flat(x.clone()), cut..arch.layers.len()).into_flat();
    let [rows, classes] = logits.dims();
    let mut onehot = vec![0f32; rows * classes];
    for (r, l) in batch.labels.iter().enumerate() {
        onehot[r * classes + *l as usize] = 1.0;
    }
    let loss = cross_entropy(
        logits,
        Tensor::from_data(TensorData::new(onehot, [rows, classes]), &ad),
    );
    let grads = loss.backward();
    let loss = read_f32(loss.detach()).await?[0];
    let grad_x = read_f32(x.grad(&grads).ok_or("no gradient at the cut")?).await?;
    let mut g = Vec::with_capacity(back.params.len());
    for w in &weights {
        g.extend(read_f32(w.grad(&grads).ok_or("no gradient for a back tensor")?).await?);
    }
    if momentum > 0.0 {
        if back.velocity.len() != g.len() {
            back.velocity = g.clone();
        } else {
            for (v, gi) in back.velocity.iter_mut().zip(&g) {
                *v = (momentum as f32) * *v + gi;
            }
        }
        for (p, v) in back.params.iter_mut().zip(&back.velocity) {
            *p -= lr as f32 * v;
        }
    } else {
        for (p, gi) in back.params.iter_mut().zip(&g) {
            *p -= lr as f32 * gi;
        }
    }
    back.samples += rows as u64;
    back.batches += 1;
    Ok((loss, grad_x))
}

/// The front a client trains this round: possibly narrower than the full model's layers `..cut`.
#[derive(Clone, Debug)]
pub struct Front {
    /// What the client gets: the (narrower) front as a model of its own.
    pub model: ModelState,
    /// For each of its parameters, the index of the full model's parameter it is.
    pub positions: Vec<usize>,
    /// For each of its output features, the index of the full front's output feature it is.
    pub features: Vec<usize>,
    /// Width of the full front's output.
    pub full_width: usize,
}

impl Front {
    /// Layers `..cut` of `global` (`params` overrides the global values of those layers, for
    /// a client's own front), with the fraction `rho` of each layer's units of smallest L1 norm
    /// removed (at least one unit stays).
    pub fn pruned(
        global: &ModelState,
        params: Option<&[f32]>,
        cut: usize,
        rho: f32,
    ) -> Result<Front, String> {
        let arch = global.arch.front(cut)?;
        let n = arch.num_params();
        let values = params.unwrap_or(&global.params[..n]);
        if values.len() != n {
            return Err(format!(
                "front of {} values for {n} parameters",
                values.len()
            ));
        }
        let full_width = arch.classes;
        let full = ModelState {
            arch: arch.clone(),
            params: values.to_vec(),
            mask: None,
            mask_version: 0,
        };
        if rho <= 0.0 {
            return Ok(Front {
                model: full,
                positions: (0..n).collect(),
                features: (0..full_width).collect(),
                full_width,
            });
        }
        // Norms on the whole model so the front's last layer counts as hidden (it is).
        let mut whole = global.params.clone();
        whole[..n].copy_from_slice(values);
        let norms = surgery::unit_norms(&global.arch, &whole, false);
        let keep: Vec<Option<Vec<usize>>> = norms[..cut]
            .iter()
            .map(|s| {
                s.as_ref().map(|s| {
                    let k = ((s.len() as f32 * (1.0 - rho)).ceil() as usize).clamp(1, s.len());
                    let mut order: Vec<usize> = (0..s.len()).collect();
                    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
                    let mut kept = order[..k].to_vec();
                    kept.sort_unstable();
                    kept
                })
            })
            .collect();
        let mut model = surgery::shrink(&full, &keep);
        model.arch = model.arch.front(cut)?;
        // The same surgery on parameter indices says where each kept value came from (exact:
        // indices stay far below 2^24).
        let index = ModelState {
            arch: arch.clone(),
            params: (0..n).map(|i| i as f32).collect(),
            mask: None,
            mask_version: 0,
        };
        let positions = surgery::shrink(&index, &keep)
            .params
            .iter()
            .map(|&i| i as usize)
            .collect();
        // The output features: those of the kept units of the last weight layer (a conv
        // filter owns h·w features after Flatten, one after global pooling).
        let last = (0..cut)
            .rev()
            .find(|&l| norms[l].is_some())
            .ok_or("the front has no weight layer")?;
        let units = norms[last].as_ref().map_or(1, |s| s.len());
        let per = full_width / units;
        let features = keep[last]
            .as_ref()
            .expect("last weight layer kept")
            .iter()
            .flat_map(|&u| u * per..(u + 1) * per)
            .collect();
        Ok(Front {
            model,
            positions,
            features,
            full_width,
        })
    }

    /// Writes a trained (narrow) front back into `into`, a full model's front values; pruned
    /// units keep what they had.
    pub fn expand_into(&self, trained: &[f32], into: &mut [f32]) -> Result<(), String> {
        if trained.len() != self.positions.len() {
            return Err(format!(
                "front of {} values, expected {}",
                trained.len(),
                self.positions.len()
            ));
        }
        for (v, &at) in trained.iter().zip(&self.positions) {
            into[at] = *v;
        }
        Ok(())
    }

    /// The full front output of a batch whose values are this front's outputs (`rows` ×
    /// its width): zeros for pruned units' features.
    pub fn widen(&self, rows: usize, values: &[f32]) -> Vec<f32> {
        let w = self.features.len();
        let mut full = vec![0f32; rows * self.full_width];
        for r in 0..rows {
            for (j, &f) in self.features.iter().enumerate() {
                full[r * self.full_width + f] = values[r * w + j];
            }
        }
        full
    }

    /// The gradient for this front's outputs, from the one for the full front's outputs.
    pub fn narrow(&self, rows: usize, grad: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * self.features.len());
        for r in 0..rows {
            out.extend(self.features.iter().map(|&f| grad[r * self.full_width + f]));
        }
        out
    }
}
