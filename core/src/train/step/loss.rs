//! A batch's loss: from the client's own labels, or from the server through the exchange.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Tensor, TensorData};

use super::LossSource;
use crate::codec::exchange;
use crate::model::{Act, read_f32};
use crate::train::host::Host;

/// What a batch's loss step produced: a tensor to back-propagate, and the loss value (a tensor
/// to read later, without waiting for the device, or a number the server already computed).
pub(crate) struct BatchLoss {
    pub backward: Tensor<1>,
    pub value: LossValue,
}

// One per training step, consumed at once: a box would cost an allocation per step.
#[allow(clippy::large_enum_variant)]
pub(crate) enum LossValue {
    Pending(Tensor<1>),
    Known(f32),
}

/// The loss of one batch whose client-side output is `out`. `targets` are the one-hot labels;
/// `seq` numbers the batch within the task (the exchange's sequence number); `seed` is the
/// task's, for the dropout draw.
pub(crate) async fn batch_loss<H: Host>(
    source: LossSource,
    out: Act,
    targets: Tensor<2>,
    labels: &[u8],
    seq: u32,
    seed: u64,
    host: &mut H,
) -> Result<BatchLoss, String> {
    match source {
        LossSource::Local => {
            let loss = cross_entropy(out.into_flat(), targets);
            Ok(BatchLoss {
                backward: loss.clone(),
                value: LossValue::Pending(loss.detach().reshape([1])),
            })
        }
        LossSource::Remote { keep, .. } => {
            let out = out.into_flat();
            let [rows, cols] = out.dims();
            let values = read_f32(out.clone().detach()).await?;
            // A different draw of kept activations for every batch of every task.
            let dropout = exchange::Dropout {
                seed: seed ^ (seq as u64).wrapping_mul(0xD134_2543_DE82_EF95),
                keep,
            };
            let (request, kept) =
                exchange::encode_request(&values, rows, cols, labels, Some(dropout));
            let reply = host.exchange(seq, request).await?;
            let (loss, grad) = exchange::decode_reply(&reply.0, rows * cols, kept.as_deref())?;
            let grad = Tensor::<2>::from_data(TensorData::new(grad, [rows, cols]), &out.device());
            // ∂(Σ out ⊙ g)/∂out = g: back-propagating this carries the server's gradient into
            // the client's layers.
            Ok(BatchLoss {
                backward: (out * grad).sum(),
                value: LossValue::Known(loss),
            })
        }
    }
}

/// Mean cross-entropy of `logits` against one-hot `targets`.
pub(crate) fn cross_entropy(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let [b, _] = logits.dims();
    (log_softmax(logits, 1) * targets).sum().neg() / b as f32
}
