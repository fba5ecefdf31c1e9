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

/// A score-steps upload's bits (kept order), from `moved`, how far the task moved each score.
/// Per tensor, with `center`, each output unit's moves (a dense column, a conv filter) first
/// lose their mean over the unit's kept entries: a client that lowers every weight into a unit
/// (a class it never sees, a unit it wants off) says nothing about which of them matter. Then
/// entry i is set with probability ½ + ½·clamp(mᵢ / s, −1, 1), s being `sure_at` times the
/// tensor's root-mean-square move (`sure_at` = 0: its largest move, so the rounding is
/// unbiased), so that a set bit counted +1 and a clear one −1 average to mᵢ / s: an entry the
/// client barely moved is a coin toss and cancels out in the server's sum, one it moved by s or
/// more is sure. A tensor nobody moved is all coin tosses.
pub fn step_bits(
    arch: &Arch,
    mask: Option<&[bool]>,
    moved: &[f32],
    center: bool,
    sure_at: f32,
    seed: u64,
) -> Vec<bool> {
    use rand::{RngExt, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5c0e_57e9_b175_0001);
    let mut out = Vec::with_capacity(moved.len());
    for p in arch.params() {
        let on = |i: usize| mask.is_none_or(|m| m[p.offset + i]);
        let mut m: Vec<f32> = moved[p.offset..p.offset + p.len].to_vec();
        if center && p.shape.len() >= 2 {
            for unit in units(&p.shape) {
                let kept: Vec<usize> = unit.into_iter().filter(|&i| on(i)).collect();
                let mean = kept.iter().map(|&i| m[i]).sum::<f32>() / kept.len().max(1) as f32;
                kept.iter().for_each(|&i| m[i] -= mean);
            }
        }
        let kept: Vec<f32> = (0..p.len).filter(|&i| on(i)).map(|i| m[i]).collect();
        let scale = if sure_at > 0.0 {
            let ms = kept.iter().map(|v| v * v).sum::<f32>() / kept.len().max(1) as f32;
            sure_at * ms.sqrt()
        } else {
            kept.iter().fold(0f32, |a, v| a.max(v.abs()))
        };
        out.extend(kept.iter().map(|v| {
            let p = if scale > 0.0 && scale.is_finite() {
                (0.5 + 0.5 * v / scale).clamp(0.0, 1.0)
            } else {
                0.5
            };
            rng.random_range(0.0..1.0f32) < p
        }));
    }
    out
}

/// The entries of each output unit of a weight tensor: a dense layer's `[inputs, units]`
/// column, a conv layer's `[filters, …]` filter.
fn units(shape: &[usize]) -> Vec<Vec<usize>> {
    if shape.len() == 2 {
        let (rows, cols) = (shape[0], shape[1]);
        (0..cols)
            .map(|c| (0..rows).map(|r| r * cols + c).collect())
            .collect()
    } else {
        let per: usize = shape[1..].iter().product();
        (0..shape[0])
            .map(|f| (f * per..(f + 1) * per).collect())
            .collect()
    }
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
    fn step_bits_average_to_the_scaled_move() {
        let a = arch();
        // Weights: entry i moved by (i − 30)/30 (the largest move, −1, at entry 0); the bias
        // did not move.
        let moved: Vec<f32> = (0..63)
            .map(|i| {
                if i < 60 {
                    (i as f32 - 30.0) / 30.0
                } else {
                    0.0
                }
            })
            .collect();
        let draws = 4000;
        let mut mean = vec![0f64; 63];
        for seed in 0..draws {
            for (m, b) in mean
                .iter_mut()
                .zip(step_bits(&a, None, &moved, false, 0.0, seed))
            {
                *m += if b { 1.0 } else { -1.0 } / draws as f64;
            }
        }
        for i in 0..63 {
            // 4,000 ±1 draws: a standard error of at most 1/√4000 ≈ 0.016.
            assert!(
                (mean[i] - moved[i] as f64).abs() < 0.06,
                "entry {i}: mean vote {} for a move of {}",
                mean[i],
                moved[i]
            );
        }
        // The sure ends are sure; the same seed draws the same bits.
        let bits = step_bits(&a, None, &moved, false, 0.0, 1);
        assert!(!bits[0]);
        assert_eq!(bits, step_bits(&a, None, &moved, false, 0.0, 1));
        // A mask leaves its pruned entries out.
        let mask: Vec<bool> = (0..63).map(|i| i % 2 == 0).collect();
        assert_eq!(step_bits(&a, Some(&mask), &moved, false, 0.0, 1).len(), 32);
    }

    #[test]
    fn centred_steps_leave_out_a_units_level_and_sure_at_scales_by_the_rms() {
        let a = arch();
        // Weights [20 inputs, 3 units]: unit 0 lowered everywhere by 1 (its level) plus a
        // pattern ±0.1; units 1 and 2 unmoved but for one entry each.
        let mut moved = vec![0f32; 63];
        for r in 0..20 {
            moved[r * 3] = -1.0 + if r % 2 == 0 { 0.1 } else { -0.1 };
        }
        moved[3 + 1] = 0.5;
        moved[6 + 2] = -0.5;
        let draws = 3000;
        let mean = |center: bool, sure_at: f32| -> Vec<f64> {
            let mut mean = vec![0f64; 63];
            for seed in 0..draws {
                for (m, b) in mean
                    .iter_mut()
                    .zip(step_bits(&a, None, &moved, center, sure_at, seed))
                {
                    *m += if b { 1.0 } else { -1.0 } / draws as f64;
                }
            }
            mean
        };
        // Uncentred, unit 0 is voted down on every input.
        let plain = mean(false, 0.0);
        assert!((0..20).all(|r| plain[r * 3] < -0.7), "{:?}", &plain[..6]);
        // Centred, only its pattern is left: up on even inputs, down on odd ones.
        let centred = mean(true, 0.0);
        for r in 0..20 {
            let v = centred[r * 3];
            assert!(
                if r % 2 == 0 { v > 0.05 } else { v < -0.05 },
                "input {r}: {v}"
            );
        }
        // The lone moves of units 1 and 2 keep their directions; the largest centred move
        // (0.475) is sure.
        assert!(centred[3 + 1] > 0.9 && centred[6 + 2] < -0.9);
        // sure_at = 2: a move of two root-mean-square moves or more is sure, smaller ones
        // proportionally: the ±0.1 pattern (about one RMS move here) votes harder than
        // against the largest move (0.47 against 0.21).
        let rms = mean(true, 2.0);
        assert!(
            rms[0] > centred[0] + 0.1,
            "{} against {}",
            rms[0],
            centred[0]
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
