//! The update going up: encoded by the client as its task's [`UploadSpec`] asks, decoded and
//! size-checked by the server before any strategy sees it.

use super::sparse::{decode_sparse, encode_sparse};
use crate::arch::Arch;
use crate::protocol::{Blob, MaskSpec, Task, Update, UploadSpec};

/// What a decoded update holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadKind {
    /// Trained parameters.
    Weights,
    /// Trained minus starting parameters.
    Delta,
}

/// The client's update from its starting and trained parameters. `residual` carries what top-k
/// and int8 left out to the next round (error feedback), when the spec asks for it.
pub fn encode_update(spec: UploadSpec, arch: &Arch, start: &[f32], trained: &[f32], mask: Option<&[bool]>, residual: &mut Option<Vec<f32>>) -> Update {
    let delta = || -> Vec<f32> { trained.iter().zip(start).map(|(a, b)| a - b).collect() };
    match spec {
        UploadSpec::Weights => Update::Weights(Blob::from_f32(trained)),
        UploadSpec::Delta => Update::Delta(Blob::from_f32(&delta())),
        UploadSpec::Sparse { int8, top_k, error_feedback } => {
            let carry = if error_feedback { Some(residual.get_or_insert_with(Vec::new)) } else { None };
            Update::Sparse(encode_sparse(arch, &delta(), mask, int8, top_k, carry))
        }
    }
}

/// Decodes an update to a full-length vector, checking it answers what `task` asked for.
/// Values are not yet checked for being finite: that is [`crate::strategy::accept`]'s job.
pub fn decode_update(task: &Task, update: &Update) -> Result<(UploadKind, Vec<f32>), String> {
    let arch = &task.model.arch;
    let mask = match &task.model.mask {
        Some(MaskSpec::Full { bits, .. }) => Some(bits.unpack().map_err(|e| e.to_string())?),
        Some(MaskSpec::Cached { .. }) => return Err("internal: a pending task lost its mask".into()),
        None => None,
    };
    let (kind, values) = match (update, task.upload) {
        (Update::Weights(b), UploadSpec::Weights) => (UploadKind::Weights, b.to_f32().map_err(|e| e.to_string())?),
        (Update::Delta(b), UploadSpec::Delta) => (UploadKind::Delta, b.to_f32().map_err(|e| e.to_string())?),
        (Update::Sparse(u), UploadSpec::Sparse { .. }) => (UploadKind::Delta, decode_sparse(arch, u, mask.as_deref())?),
        _ => return Err(format!("update kind does not match the requested {:?}", task.upload)),
    };
    let n = arch.num_params();
    if values.len() != n {
        return Err(format!("update has {} values, the model has {n}", values.len()));
    }
    Ok((kind, values))
}
