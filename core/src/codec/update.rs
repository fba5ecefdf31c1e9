//! The update going up: encoded by the client as its task's [`UploadSpec`] asks, decoded and
//! size-checked by the server before any strategy sees it.

use super::sparse::{decode_sparse, encode_sparse};
use super::supermask::{self, Encoding};
use crate::model::arch::Arch;
use crate::protocol::{Blob, MaskSpec, Params, Task, Update, UploadSpec};

/// What a decoded update holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum UploadKind {
    /// Trained parameters.
    Weights,
    /// Trained minus starting parameters.
    Delta,
    /// A supermask's bits as votes: +1 (bit set) or −1 on kept entries, 0 on pruned ones.
    Votes,
}

/// The client's update from its starting and trained parameters. `residual` carries what top-k
/// and int8 left out to the next round (error feedback), when the spec asks for it. `moved` is
/// how far training moved what it learned when that is not the weights (a supermask's scores),
/// for `ScoreSteps`; `seed` draws its bits.
#[allow(clippy::too_many_arguments)]
pub fn encode_update(
    spec: UploadSpec,
    arch: &Arch,
    start: &[f32],
    trained: &[f32],
    mask: Option<&[bool]>,
    residual: &mut Option<Vec<f32>>,
    moved: Option<&[f32]>,
    seed: u64,
) -> Update {
    let delta = || -> Vec<f32> { trained.iter().zip(start).map(|(a, b)| a - b).collect() };
    match spec {
        UploadSpec::Weights => Update::Weights(Blob::from_f32(trained)),
        UploadSpec::Delta => Update::Delta(Blob::from_f32(&delta())),
        UploadSpec::ClippedDelta { norm } => {
            let mut d = delta();
            let n = crate::aggregate::robust::l2_distance(&d, None);
            if n > norm as f64 {
                // A hair under the norm, so f32 rounding cannot put it over on the server.
                let scale = (norm as f64 * (1.0 - 1e-6) / n) as f32;
                d.iter_mut().for_each(|v| *v *= scale);
            }
            Update::Delta(Blob::from_f32(&d))
        }
        UploadSpec::Sparse {
            int8,
            top_k,
            error_feedback,
        } => {
            let carry = if error_feedback {
                Some(residual.get_or_insert_with(Vec::new))
            } else {
                None
            };
            Update::Sparse(encode_sparse(arch, &delta(), mask, int8, top_k, carry))
        }
        UploadSpec::Supermask { kind } => {
            // `start` and `trained` are the effective weights: their bits are the task's and ours.
            let (base, mine) = (
                supermask::bits_of_weights(kind, start, mask),
                supermask::bits_of_weights(kind, trained, mask),
            );
            Update::Supermask(supermask::encode(arch, mask, &base, &mine))
        }
        UploadSpec::ScoreSteps {
            kind,
            center,
            sure_at,
        } => {
            let base = supermask::bits_of_weights(kind, start, mask);
            // Without learned scores, the move of the weights themselves.
            let moved = moved.map_or_else(delta, <[f32]>::to_vec);
            let mine = supermask::step_bits(arch, mask, &moved, center, sure_at, seed);
            Update::Supermask(supermask::encode(arch, mask, &base, &mine))
        }
    }
}

/// A decoded update.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    pub kind: UploadKind,
    /// Full length, in the model's layout.
    pub values: Vec<f32>,
    /// How a supermask upload travelled (zeros for other kinds).
    pub encoding: Encoding,
}

/// Decodes an update to a full-length vector, checking it answers what `task` asked for.
/// Values are not yet checked for being finite: that is [`crate::strategy::accept`]'s job.
pub fn decode_update(task: &Task, update: &Update) -> Result<Decoded, String> {
    let arch = &task.model.arch;
    let mask = match &task.model.mask {
        Some(MaskSpec::Full { bits, .. }) => Some(bits.unpack().map_err(|e| e.to_string())?),
        Some(MaskSpec::Cached { .. }) => {
            return Err("internal: a pending task lost its mask".into());
        }
        None => None,
    };
    let mut encoding = Encoding::default();
    let (kind, values) = match (update, task.upload) {
        (Update::Supermask(u), UploadSpec::Supermask { .. } | UploadSpec::ScoreSteps { .. }) => {
            let Params::Supermask { bits, .. } = &task.model.params else {
                return Err("internal: a supermask upload for a task without a supermask".into());
            };
            let base = bits.unpack().map_err(|e| e.to_string())?;
            let (mine, enc) = supermask::decode(arch, mask.as_deref(), &base, u)?;
            encoding = enc;
            let votes = mine
                .iter()
                .map(|b| if *b { 1.0 } else { -1.0 })
                .collect::<Vec<f32>>();
            (
                UploadKind::Votes,
                super::expand(&votes, mask.as_deref(), arch.num_params())?,
            )
        }
        (Update::Weights(b), UploadSpec::Weights) => {
            (UploadKind::Weights, b.to_f32().map_err(|e| e.to_string())?)
        }
        (Update::Delta(b), UploadSpec::Delta) => {
            (UploadKind::Delta, b.to_f32().map_err(|e| e.to_string())?)
        }
        (Update::Delta(b), UploadSpec::ClippedDelta { norm }) => {
            let values = b.to_f32().map_err(|e| e.to_string())?;
            let n = crate::aggregate::robust::l2_distance(&values, None);
            // NaN fails this test too; `accept` names it.
            if n > norm as f64 * (1.0 + 1e-5) {
                return Err(format!(
                    "update norm {n:.4} exceeds the task's clip {norm} (clip before uploading)"
                ));
            }
            (UploadKind::Delta, values)
        }
        (Update::Sparse(u), UploadSpec::Sparse { .. }) => {
            (UploadKind::Delta, decode_sparse(arch, u, mask.as_deref())?)
        }
        _ => {
            return Err(format!(
                "update kind does not match the requested {:?}",
                task.upload
            ));
        }
    };
    let n = arch.num_params();
    if values.len() != n {
        return Err(format!(
            "update has {} values, the model has {n}",
            values.len()
        ));
    }
    Ok(Decoded {
        kind,
        values,
        encoding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state::ModelState;
    use crate::strategy::{StrategyConfig, train_task};

    #[test]
    fn a_clipped_delta_is_clipped_by_the_client_and_a_larger_one_refused() {
        let global = ModelState::init(Arch::preset("mlp", [1, 2, 2], 2).unwrap(), 1);
        let spec = UploadSpec::ClippedDelta { norm: 0.5 };
        let task = train_task(1, &global, &StrategyConfig::default(), 3, spec);
        let trained: Vec<f32> = global.params.iter().map(|v| v + 0.1).collect();
        let up = encode_update(
            spec,
            &global.arch,
            &global.params,
            &trained,
            None,
            &mut None,
            None,
            0,
        );
        let d = decode_update(&task, &up).unwrap();
        assert_eq!(d.kind, UploadKind::Delta);
        let norm = crate::aggregate::robust::l2_distance(&d.values, None);
        assert!(norm <= 0.5 && norm > 0.499, "{norm}");
        // Its direction is the delta's.
        assert!(
            d.values
                .iter()
                .all(|v| (v - d.values[0]).abs() < 1e-6 && *v > 0.0)
        );
        // A client that ignores the clip.
        let raw: Vec<f32> = trained
            .iter()
            .zip(&global.params)
            .map(|(a, b)| a - b)
            .collect();
        let e = decode_update(&task, &Update::Delta(Blob::from_f32(&raw))).unwrap_err();
        assert!(e.contains("exceeds the task's clip 0.5"), "{e}");
        // A small delta passes as it is.
        let small = vec![1e-4f32; raw.len()];
        let d = decode_update(&task, &Update::Delta(Blob::from_f32(&small))).unwrap();
        assert_eq!(d.values, small);
    }
}
