//! Every tensor payload, both ways, in one place.
//!
//! - Down ([`model`]): the global model a task starts from, with only the kept values when a
//!   mask prunes it, and the mask itself once per client (afterwards only its version).
//! - Up ([`update`]): what a client sends back, as the task's [`UploadSpec`] asks (full weights,
//!   a delta, the sparse int8/top-k delta of [`sparse`], or a [`supermask`]'s bits), and the
//!   server's checked decoding.
//! - Within a round ([`exchange`]): the per-batch request and reply of a remote loss.
//!
//! The client runtime, the server's result acceptance, the round loop and the wasm wrapper call
//! these functions and encode or decode no tensor themselves.
//!
//! [`UploadSpec`]: crate::protocol::UploadSpec

pub mod exchange;
pub mod model;
pub mod positions;
pub mod sparse;
pub mod supermask;
pub mod update;

pub use model::{MaskCache, Model, Supermask, decode_model, encode_model, encode_supermask};
pub use sparse::payload_bytes;
pub use update::{decode_update, encode_update};

/// Flat indices the mask keeps (all of them without a mask).
pub fn kept_indices(mask: Option<&[bool]>, len: usize) -> Vec<u32> {
    match mask {
        None => (0..len as u32).collect(),
        Some(m) => m
            .iter()
            .enumerate()
            .filter(|(_, k)| **k)
            .map(|(i, _)| i as u32)
            .collect(),
    }
}

/// Spreads the kept values over a full-length vector (zeros elsewhere).
pub fn expand(values: &[f32], mask: Option<&[bool]>, len: usize) -> Result<Vec<f32>, String> {
    if mask.is_some_and(|m| m.len() != len) {
        return Err(format!(
            "mask has {} entries, the model {len}",
            mask.map_or(0, |m| m.len())
        ));
    }
    let kept = kept_indices(mask, len);
    if values.len() != kept.len() {
        return Err(format!(
            "model has {} values, expected {} (of {len} parameters)",
            values.len(),
            kept.len()
        ));
    }
    let mut full = vec![0f32; len];
    for (&i, v) in kept.iter().zip(values) {
        full[i as usize] = *v;
    }
    Ok(full)
}

/// Only the kept entries, in order: what a masked model sends down.
pub fn compact(values: &[f32], mask: Option<&[bool]>) -> Vec<f32> {
    match mask {
        None => values.to_vec(),
        Some(m) => values
            .iter()
            .zip(m)
            .filter(|(_, k)| **k)
            .map(|(v, _)| *v)
            .collect(),
    }
}
