//! The model going down: architecture, parameters (only the kept ones under a mask) and the mask,
//! which travels once per client and is named by its version afterwards.

use super::{compact, expand, supermask};
use crate::model::arch::Arch;
use crate::model::state::ModelState;
use crate::protocol::{Bits, Blob, MaskSpec, ModelPayload, Params, SupermaskKind};

/// The global model as a task carries it, mask in full.
pub fn encode_model(global: &ModelState) -> ModelPayload {
    let mask = global.mask.as_deref();
    ModelPayload {
        arch: global.arch.clone(),
        params: Params::Values(Blob::from_f32(&compact(&global.params, mask))),
        mask: mask.map(|m| MaskSpec::Full {
            version: global.mask_version,
            bits: Bits::pack(m),
        }),
    }
}

/// A supermask model: the seed of θ₀ (`ModelState::init(arch, seed)` on both sides) and one bit
/// per kept entry read off the global model's effective weights.
pub fn encode_supermask(global: &ModelState, seed: u64, kind: SupermaskKind) -> ModelPayload {
    let mask = global.mask.as_deref();
    let bits = supermask::bits_of_weights(kind, &global.params, mask);
    ModelPayload {
        arch: global.arch.clone(),
        params: Params::Supermask {
            seed,
            kind,
            bits: Bits::pack(&bits),
        },
        mask: mask.map(|m| MaskSpec::Full {
            version: global.mask_version,
            bits: Bits::pack(m),
        }),
    }
}

/// The mask a client holds, with its version: the server sends it only once.
#[derive(Clone, Debug, Default)]
pub struct MaskCache(Option<(u64, Vec<bool>)>);

impl MaskCache {
    pub fn version(&self) -> Option<u64> {
        self.0.as_ref().map(|(v, _)| *v)
    }

    /// The mask held, if any.
    pub fn mask(&self) -> Option<&[bool]> {
        self.0.as_ref().map(|(_, m)| m.as_slice())
    }

    /// The task's mask: sent in full (and remembered when `remember`), or named by a version
    /// held here.
    fn resolve(
        &mut self,
        spec: Option<&MaskSpec>,
        len: usize,
        remember: bool,
    ) -> Result<Option<Vec<bool>>, String> {
        match spec {
            None => Ok(None),
            Some(MaskSpec::Full { version, bits }) => {
                let m = bits.unpack().map_err(|e| e.to_string())?;
                if m.len() != len {
                    return Err(format!("mask has {} entries, the model {len}", m.len()));
                }
                if remember {
                    self.0 = Some((*version, m.clone()));
                }
                Ok(Some(m))
            }
            Some(MaskSpec::Cached { version }) => match &self.0 {
                Some((v, m)) if v == version && m.len() == len => Ok(Some(m.clone())),
                _ => {
                    if remember {
                        self.0 = None;
                    }
                    Err(format!(
                        "mask version {version} is not cached here; please resend it"
                    ))
                }
            },
        }
    }
}

/// A decoded model: full-length parameters (zeros where pruned) and the mask, if any.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub arch: Arch,
    /// The weights the model computes with (for a supermask, the effective ones).
    pub params: Vec<f32>,
    pub mask: Option<Vec<bool>>,
    pub supermask: Option<Supermask>,
}

/// A supermask model's parts: what the client learns over.
#[derive(Clone, Debug, PartialEq)]
pub struct Supermask {
    pub kind: SupermaskKind,
    /// The frozen weights, regenerated from the seed.
    pub theta0: Vec<f32>,
    /// The task's bits, in kept order.
    pub bits: Vec<bool>,
}

/// Decodes a task's model, checking every size; a mask sent in full is cached for next time
/// (`cache` is only read when `remember` is false: "try the model" panels peek this way).
pub fn decode_model(
    payload: &ModelPayload,
    cache: &mut MaskCache,
    remember: bool,
) -> Result<Model, String> {
    let arch = payload.arch.clone();
    arch.validate().map_err(|e| e.to_string())?;
    let n = arch.num_params();
    let mask = cache.resolve(payload.mask.as_ref(), n, remember)?;
    match &payload.params {
        Params::Values(blob) => {
            let values = blob.to_f32().map_err(|e| e.to_string())?;
            let params = expand(&values, mask.as_deref(), n)?;
            Ok(Model {
                arch,
                params,
                mask,
                supermask: None,
            })
        }
        Params::Supermask { seed, kind, bits } => {
            let bits = bits.unpack().map_err(|e| e.to_string())?;
            let kept = mask
                .as_ref()
                .map_or(n, |m| m.iter().filter(|k| **k).count());
            if bits.len() != kept {
                return Err(format!(
                    "supermask has {} bits for {kept} kept entries",
                    bits.len()
                ));
            }
            let theta0 = ModelState::init(arch.clone(), *seed).params;
            let params = supermask::effective(*kind, &theta0, mask.as_deref(), &bits);
            Ok(Model {
                arch,
                params,
                mask,
                supermask: Some(Supermask {
                    kind: *kind,
                    theta0,
                    bits,
                }),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_model_round_trips_and_the_mask_travels_once() {
        let arch = Arch::preset("mlp", [1, 2, 2], 2).unwrap();
        let mut g = ModelState::init(arch, 3);
        let mask: Vec<bool> = (0..g.params.len()).map(|i| i % 3 != 0).collect();
        g.set_mask(mask.clone());
        let full = encode_model(&g);
        let Params::Values(values) = &full.params else {
            panic!("plain values")
        };
        assert_eq!(
            values.len(),
            4 * mask.iter().filter(|k| **k).count(),
            "only kept values travel"
        );
        let mut cache = MaskCache::default();
        let m = decode_model(&full, &mut cache, true).unwrap();
        assert_eq!(
            (m.params.clone(), m.mask.clone()),
            (g.params.clone(), Some(mask.clone()))
        );
        assert_eq!(cache.version(), Some(g.mask_version));
        // Next time only the version travels, and the cached mask fills it in.
        let short = ModelPayload {
            mask: Some(MaskSpec::Cached {
                version: g.mask_version,
            }),
            ..full.clone()
        };
        assert_eq!(decode_model(&short, &mut cache, true).unwrap(), m);
        // A version this client does not hold is an error that asks for the mask again.
        assert!(
            decode_model(&short, &mut MaskCache::default(), true)
                .unwrap_err()
                .contains("resend")
        );
    }

    #[test]
    fn a_supermask_travels_as_a_seed_and_bits() {
        let arch = Arch::preset("mlp", [1, 2, 2], 2).unwrap();
        let mut g = ModelState::init(arch.clone(), 9);
        let mask: Vec<bool> = (0..g.params.len()).map(|i| i % 2 == 0).collect();
        g.set_mask(mask.clone());
        // Flip a few signs: the global model is |θ₀| with signs of its own.
        for (i, v) in g.params.iter_mut().enumerate() {
            if i % 6 == 0 {
                *v = -*v;
            }
        }
        let p = encode_supermask(&g, 9, SupermaskKind::Sign);
        let Params::Supermask { bits, .. } = &p.params else {
            panic!("supermask")
        };
        assert_eq!(
            bits.bytes.len(),
            mask.iter().filter(|k| **k).count().div_ceil(8),
            "one bit per kept entry"
        );
        let m = decode_model(&p, &mut MaskCache::default(), true).unwrap();
        assert_eq!(
            m.params, g.params,
            "θ₀ regenerated from the seed, signs from the bits"
        );
        assert_eq!(
            m.supermask.unwrap().theta0,
            ModelState::init(arch, 9).params
        );
    }
}
