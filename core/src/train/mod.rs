//! Local training and evaluation, shared by browser tabs, native clients and the server.
//!
//! Nothing here reads a tensor synchronously: on wasm with WebGPU a synchronous read panics, so
//! every read is awaited. The [`Host`] supplies a clock and receives progress; a browser host
//! yields to its event loop there so the page stays responsive.

pub mod host;
pub mod split;
pub mod step;

use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::model::arch::Arch;
use crate::model::{Act, Net, forward, read_f32};
use crate::train::step::{Anchor, BatchLoss, Frozen, LossValue, Step, batch_loss, reparam};
pub use host::{Host, Progress};

/// In TOML `optimizer = "adam"` or `optimizer = { sgd = { momentum = 0.9 } }` (externally
/// tagged: postcard cannot decode internally tagged enums).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Sgd { momentum: f64 },
    Adam,
}

/// How a client trains in one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub epochs: u32,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: Optimizer,
    /// Seeds the batch order, so a rerun of a round sees batches in the same order.
    pub seed: u64,
    /// Stop early once the epoch's mean training loss has not improved for this many epochs
    /// (0: always run every epoch).
    #[serde(default)]
    pub patience: u32,
    /// What is learned and where the loss comes from (see [`crate::train::step`]).
    #[serde(default)]
    pub step: Step,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Trained {
    pub params: Vec<f32>,
    /// Mean training loss of the last epoch run.
    pub mean_loss: f32,
    pub epochs: u32,
    pub steps: u32,
    pub samples: u64,
    pub seconds: f64,
}

impl Trained {
    pub fn samples_per_sec(&self) -> f64 {
        self.samples as f64 / self.seconds.max(1e-9)
    }
}

/// Reads back the training loss at least this often (in steps): each read waits for the device,
/// which keeps a WebGPU queue from growing without bound.
const REPORT_EVERY: u32 = 8;
/// ... and at least this often in time, so a page training on the CPU backend (where every step
/// blocks) gets back to its event loop several times a second.
const REPORT_MS: f64 = 150.0;

/// Trains from `start` on `data` and returns the new parameters. What is learned and where each
/// batch's loss comes from is `spec.step`; with `mask`, masked-out parameters are zeroed after
/// every optimizer step, so an optimizer's momentum cannot revive them.
pub async fn train_local<H: Host>(
    arch: &Arch,
    start: &[f32],
    mask: Option<&[bool]>,
    data: &Dataset,
    spec: &TrainSpec,
    device: &Device,
    host: &mut H,
) -> Result<Trained, String> {
    train(arch, start, mask, None, data, spec, device, host).await
}

/// The one training loop. `start` holds the starting values of what is learned (`spec.step`):
/// the weights, or the scores over `frozen` weights. `Trained::params` returns the same kind.
#[allow(clippy::too_many_arguments)]
pub async fn train<H: Host>(
    arch: &Arch,
    start: &[f32],
    mask: Option<&[bool]>,
    frozen: Option<Frozen<'_>>,
    data: &Dataset,
    spec: &TrainSpec,
    device: &Device,
    host: &mut H,
) -> Result<Trained, String> {
    if data.is_empty() {
        return Err("no training data".into());
    }
    if spec.batch_size == 0 || spec.lr.is_nan() || spec.lr <= 0.0 {
        return Err(format!(
            "bad training settings: batch {} lr {}",
            spec.batch_size, spec.lr
        ));
    }
    let layers = spec.step.layers(arch)?;
    spec.step.penalty.check()?;
    let ad = device.clone().autodiff();
    let step_kind = reparam(spec.step.learn, arch, mask, frozen, &ad)?;
    let net = step_kind.after_step(Net::from_flat(arch, start, &ad));
    // The client learns the tensors of the layers it runs; the rest (a split model's back)
    // stay as they came.
    let (front, back) = {
        let n = arch.first_tensor(layers.end);
        let mut all = net.params;
        let back: Vec<_> = all.split_off(n);
        (Net { params: all }, back)
    };
    let mut net = front;
    // FedProx's anchor: the learned tensors as the task gave them.
    let anchor = Anchor::new(spec.step.penalty, &net);
    let mut optim = match spec.optimizer {
        Optimizer::Sgd { momentum } if momentum > 0.0 => SgdConfig::new()
            .with_momentum(Some(MomentumConfig {
                momentum,
                dampening: 0.0,
                nesterov: false,
            }))
            .init(),
        Optimizer::Sgd { .. } => SgdConfig::new().init(),
        Optimizer::Adam => AdamConfig::new().init(),
    };
    let steps_per_epoch = data.len().div_ceil(spec.batch_size) as u32;
    let total_steps = steps_per_epoch * spec.epochs;
    let t0 = host.now_ms();
    let (mut step, mut samples) = (0u32, 0u64);
    let mut loss_total = 0f64;
    let (mut best, mut since_best, mut epochs_run, mut last_epoch_loss) =
        (f64::INFINITY, 0u32, 0u32, 0f64);
    let (mut window_loss, mut window_known, mut window_steps) = (None::<Tensor<1>>, 0f64, 0u32);
    let (mut window_t, mut window_samples) = (t0, 0u64);
    let mut order: Vec<usize> = (0..data.len()).collect();
    for epoch in 0..spec.epochs {
        order.shuffle(&mut StdRng::seed_from_u64(
            spec.seed.wrapping_add(epoch as u64),
        ));
        let (epoch_start_loss, epoch_start_step) = (loss_total, step);
        let epoch_end = step + steps_per_epoch;
        for batch in order.chunks(spec.batch_size) {
            let (x, y) = batch_tensors(data, batch, &ad);
            let labels: Vec<u8> = batch.iter().map(|&i| data.labels[i]).collect();
            let out = forward(
                arch,
                &step_kind.weights(&net),
                Act::Image(x),
                layers.clone(),
            );
            let BatchLoss { backward, value } =
                batch_loss(spec.step.loss, out, y, &labels, step, spec.seed, host).await?;
            // The reported loss stays the batch's own; only the gradient sees the penalty.
            let backward = match &anchor {
                Some(a) => backward + a.term(&net),
                None => backward,
            };
            let grads = GradientsParams::from_grads(backward.backward(), &net);
            net = step_kind.after_step(optim.step(spec.lr, net, grads));
            match value {
                LossValue::Pending(l) => {
                    window_loss = Some(match window_loss.take() {
                        Some(acc) => acc + l,
                        None => l,
                    })
                }
                LossValue::Known(l) => window_known += l as f64,
            }
            step += 1;
            window_steps += 1;
            samples += batch.len() as u64;
            window_samples += batch.len() as u64;
            if window_steps == REPORT_EVERY
                || step == epoch_end
                || host.now_ms() - window_t >= REPORT_MS
            {
                let pending = match window_loss.take() {
                    Some(l) => read_f32(l).await?[0],
                    None => 0.0,
                };
                let sum = pending + std::mem::take(&mut window_known) as f32;
                if !sum.is_finite() {
                    return Err(format!("training diverged at step {step}: loss {sum}"));
                }
                loss_total += sum as f64;
                let now = host.now_ms();
                let p = Progress {
                    epoch: epoch + 1,
                    epochs: spec.epochs,
                    step,
                    steps: total_steps,
                    loss: sum / window_steps as f32,
                    samples_per_sec: (window_samples as f64 * 1000.0 / (now - window_t).max(1e-3))
                        as f32,
                };
                host.progress(&p).await;
                window_steps = 0;
                window_samples = 0;
                window_t = now;
            }
        }
        epochs_run += 1;
        last_epoch_loss = (loss_total - epoch_start_loss) / (step - epoch_start_step).max(1) as f64;
        if spec.patience > 0 {
            if last_epoch_loss < best - 1e-4 {
                best = last_epoch_loss;
                since_best = 0;
            } else {
                since_best += 1;
                if since_best >= spec.patience {
                    break;
                }
            }
        }
    }
    net.params.extend(back);
    let params = net.to_flat().await?;
    let seconds = (host.now_ms() - t0) / 1000.0;
    Ok(Trained {
        params,
        mean_loss: last_epoch_loss as f32,
        epochs: epochs_run,
        steps: step,
        samples,
        seconds,
    })
}

/// Global loss and accuracy of a model on `data`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    pub loss: f32,
    pub accuracy: f32,
    pub samples: u64,
}

pub async fn evaluate(
    arch: &Arch,
    params: &[f32],
    data: &Dataset,
    device: &Device,
) -> Result<Eval, String> {
    let net = Net::from_flat(arch, params, device);
    let (mut loss, mut correct) = (0f64, 0u64);
    let order: Vec<usize> = (0..data.len()).collect();
    for batch in order.chunks(500) {
        let (x, _) = batch_tensors(data, batch, device);
        let logits = read_f32(net.forward(arch, x)).await?;
        for (row, &i) in logits.chunks(arch.classes).zip(batch) {
            let label = data.labels[i] as usize;
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            loss += (lse - row[label]) as f64;
            let pred = row
                .iter()
                .enumerate()
                .fold(0, |b, (j, v)| if *v > row[b] { j } else { b });
            correct += (pred == label) as u64;
        }
    }
    let n = data.len().max(1) as f64;
    Ok(Eval {
        loss: (loss / n) as f32,
        accuracy: (correct as f64 / n) as f32,
        samples: data.len() as u64,
    })
}

/// Class probabilities for one sample (pixels in [0, 1]); for "try the model" panels.
pub async fn predict(
    arch: &Arch,
    params: &[f32],
    pixels: &[f32],
    device: &Device,
) -> Result<Vec<f32>, String> {
    let net = Net::from_flat(arch, params, device);
    let [c, h, w] = arch.input;
    let x = Tensor::<4>::from_data(TensorData::new(pixels.to_vec(), [1, c, h, w]), device);
    read_f32(burn::tensor::activation::softmax(net.forward(arch, x), 1)).await
}

fn batch_tensors(data: &Dataset, batch: &[usize], device: &Device) -> (Tensor<4>, Tensor<2>) {
    let [c, h, w] = data.shape;
    let x = TensorData::new(data.pixels(batch), [batch.len(), c, h, w]);
    let mut y = vec![0f32; batch.len() * data.classes];
    for (r, &i) in batch.iter().enumerate() {
        y[r * data.classes + data.labels[i] as usize] = 1.0;
    }
    (
        Tensor::from_data(x, device),
        Tensor::from_data(TensorData::new(y, [batch.len(), data.classes]), device),
    )
}
