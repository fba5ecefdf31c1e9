//! Supermasks over frozen random weights (HideNseek's signs, binary keep-masks): one bit per
//! kept entry. Down, the global bits travel bit-packed with the seed that regenerates θ₀. Up,
//! each tensor travels either bit-packed (⌈kept/8⌉ bytes) or as the positions whose bit differs
//! from the task's (LEB128 gaps), whichever is smaller.

use crate::codec::positions;
use crate::model::arch::Arch;
use crate::protocol::{MaskBits, SupermaskKind};

/// The effective weights: θ₀ on the kept entries, shaped by the bits (in kept order).
pub fn effective(
    kind: SupermaskKind,
    theta0: &[f32],
    mask: Option<&[bool]>,
    bits: &[bool],
) -> Vec<f32> {
    let mut out = vec![0f32; theta0.len()];
    let mut b = bits.iter();
    for (i, w) in theta0.iter().enumerate() {
        if mask.is_none_or(|m| m[i]) {
            let bit = *b.next().expect("one bit per kept entry");
            out[i] = match kind {
                SupermaskKind::Sign => {
                    if bit {
                        w.abs()
                    } else {
                        -w.abs()
                    }
                }
                SupermaskKind::Keep => {
                    if bit {
                        *w
                    } else {
                        0.0
                    }
                }
            };
        }
    }
    out
}

/// The bit a supermask model's weight stands for: its sign (sign supermask) or whether it is
/// switched on (keep-mask).
pub fn bit_of_weight(kind: SupermaskKind, w: f32) -> bool {
    match kind {
        SupermaskKind::Sign => w > 0.0,
        SupermaskKind::Keep => w != 0.0,
    }
}

/// The bits (in kept order) of a supermask model's weights.
pub fn bits_of_weights(kind: SupermaskKind, weights: &[f32], mask: Option<&[bool]>) -> Vec<bool> {
    super::compact(weights, mask)
        .iter()
        .map(|w| bit_of_weight(kind, *w))
        .collect()
}

/// The bits (in kept order) of real-valued scores: positive means + (sign) or kept (keep).
pub fn bits_of_scores(scores: &[f32], mask: Option<&[bool]>) -> Vec<bool> {
    scores
        .iter()
        .enumerate()
        .filter(|(i, _)| mask.is_none_or(|m| m[*i]))
        .map(|(_, s)| *s > 0.0)
        .collect()
}

/// Kept entries per parameter tensor.
fn kept_per_tensor(arch: &Arch, mask: Option<&[bool]>) -> Vec<usize> {
    arch.params()
        .iter()
        .map(|p| {
            mask.map_or(p.len, |m| {
                m[p.offset..p.offset + p.len].iter().filter(|k| **k).count()
            })
        })
        .collect()
}

fn pack(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.iter().enumerate() {
        out[i / 8] |= (*b as u8) << (i % 8);
    }
    out
}

/// The positions where `mine` differs from `base`, as varint gaps.
fn flips(mine: &[bool], base: &[bool]) -> Vec<u8> {
    let at: Vec<u32> = mine
        .iter()
        .zip(base)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i as u32)
        .collect();
    positions::varints(&at)
}

/// Encodes a client's bits (kept order) against the task's bits, tensor by tensor.
pub fn encode(arch: &Arch, mask: Option<&[bool]>, base: &[bool], mine: &[bool]) -> Vec<MaskBits> {
    let mut at = 0;
    kept_per_tensor(arch, mask)
        .into_iter()
        .map(|k| {
            let (m, b) = (&mine[at..at + k], &base[at..at + k]);
            at += k;
            let (packed, flipped) = (pack(m), flips(m, b));
            if flipped.len() < packed.len() {
                MaskBits::Flips(flipped)
            } else {
                MaskBits::Packed(packed)
            }
        })
        .collect()
}

/// What a decoded upload held besides its bits: for the round's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Encoding {
    pub payload_bytes: u64,
    /// Tensors sent as flips (the rest bit-packed).
    pub flip_tensors: u32,
    pub tensors: u32,
}

/// Decodes an upload to bits in kept order, checking every size: a packed tensor must be exactly
/// ⌈kept/8⌉ bytes with zero padding, flips strictly inside the tensor.
pub fn decode(
    arch: &Arch,
    mask: Option<&[bool]>,
    base: &[bool],
    update: &[MaskBits],
) -> Result<(Vec<bool>, Encoding), String> {
    let kept = kept_per_tensor(arch, mask);
    if update.len() != kept.len() {
        return Err(format!(
            "supermask upload has {} tensors, the model {}",
            update.len(),
            kept.len()
        ));
    }
    let mut out = Vec::with_capacity(base.len());
    let mut enc = Encoding {
        tensors: kept.len() as u32,
        ..Default::default()
    };
    let mut at = 0;
    for (t, (k, u)) in kept.iter().zip(update).enumerate() {
        let b = &base[at..at + k];
        at += k;
        match u {
            MaskBits::Packed(bytes) => {
                enc.payload_bytes += bytes.len() as u64;
                if bytes.len() != k.div_ceil(8) {
                    return Err(format!(
                        "tensor {t}: {} bytes for {k} bits (expected {})",
                        bytes.len(),
                        k.div_ceil(8)
                    ));
                }
                if k % 8 != 0 && bytes[k / 8] >> (k % 8) != 0 {
                    return Err(format!("tensor {t}: bits set beyond its {k} entries"));
                }
                out.extend((0..*k).map(|i| bytes[i / 8] >> (i % 8) & 1 == 1));
            }
            MaskBits::Flips(bytes) => {
                enc.payload_bytes += bytes.len() as u64;
                enc.flip_tensors += 1;
                let mut mine = b.to_vec();
                for i in
                    positions::decode_varints(bytes, *k).map_err(|e| format!("tensor {t}: {e}"))?
                {
                    mine[i as usize] = !mine[i as usize];
                }
                out.extend(mine);
            }
        }
    }
    Ok((out, enc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Layer;

    fn arch() -> Arch {
        Arch {
            input: [1, 1, 20],
            classes: 3,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 20,
                    units: 3,
                },
            ],
        }
    }

    #[test]
    fn both_encodings_round_trip_and_the_smaller_wins() {
        let a = arch();
        let mask: Vec<bool> = (0..63).map(|i| i % 5 != 0).collect();
        let kept = mask.iter().filter(|k| **k).count();
        let base: Vec<bool> = (0..kept).map(|i| i % 3 == 0).collect();
        // Few flips: sent as positions.
        let mut few = base.clone();
        few[4] = !few[4];
        few[40] = !few[40];
        let up = encode(&a, Some(&mask), &base, &few);
        assert!(matches!(up[0], MaskBits::Flips(_)));
        let (back, enc) = decode(&a, Some(&mask), &base, &up).unwrap();
        assert_eq!(back, few);
        assert_eq!(
            enc.flip_tensors, 2,
            "the weights as two flips, the unchanged bias as none"
        );
        // Many flips: bit-packed, exactly ⌈kept/8⌉ bytes per tensor.
        let many: Vec<bool> = base.iter().map(|b| !b).collect();
        let up = encode(&a, Some(&mask), &base, &many);
        let kept_w = mask[..60].iter().filter(|k| **k).count();
        assert_eq!(up[0], MaskBits::Packed(pack(&many[..kept_w])));
        let (back, enc) = decode(&a, Some(&mask), &base, &up).unwrap();
        assert_eq!(back, many);
        assert_eq!(
            enc.payload_bytes as usize,
            kept_w.div_ceil(8) + (kept - kept_w).div_ceil(8)
        );
    }

    #[test]
    fn wrong_sizes_are_rejected() {
        let a = arch();
        let base = vec![false; 63];
        let good = encode(&a, None, &base, &[true; 63]);
        assert!(
            decode(&a, None, &base, &good[..1]).is_err(),
            "a tensor missing"
        );
        let mut long = good.clone();
        long[0] = MaskBits::Packed(vec![0xff; 9]);
        assert!(
            decode(&a, None, &base, &long)
                .unwrap_err()
                .contains("bytes for 60 bits")
        );
        let mut pad = good.clone();
        pad[1] = MaskBits::Packed(vec![0xff]);
        assert!(
            decode(&a, None, &base, &pad)
                .unwrap_err()
                .contains("beyond"),
            "3 bias bits: the other 5 must be zero"
        );
        let mut out_of_range = good.clone();
        out_of_range[1] = MaskBits::Flips(vec![3]);
        assert!(decode(&a, None, &base, &out_of_range).is_err());
        let mut truncated = good;
        truncated[1] = MaskBits::Flips(vec![0x81]);
        assert!(
            decode(&a, None, &base, &truncated)
                .unwrap_err()
                .contains("truncated")
        );
    }

    #[test]
    fn effective_weights_follow_the_bits() {
        let theta = [0.5f32, -0.25, 0.125, -1.0];
        let mask = [true, true, false, true];
        let bits = [false, true, true];
        assert_eq!(
            effective(SupermaskKind::Sign, &theta, Some(&mask), &bits),
            vec![-0.5, 0.25, 0.0, 1.0]
        );
        assert_eq!(
            effective(SupermaskKind::Keep, &theta, Some(&mask), &bits),
            vec![0.0, -0.25, 0.0, -1.0]
        );
        assert_eq!(
            bits_of_scores(&[0.1, -0.2, 0.3, 0.0], Some(&mask)),
            vec![true, false, false]
        );
    }
}
