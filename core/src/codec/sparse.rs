//! Compressed updates: only the mask's kept entries travel, optionally as int8 with one scale per
//! tensor, optionally only the largest `top_k` fraction with error feedback.

use super::kept_indices;
use crate::model::arch::Arch;
use crate::protocol::{Blob, SparseUpdate, Values};

/// The tensor (index into `arch.params()`) of every flat index.
fn tensor_of(arch: &Arch) -> Vec<u16> {
    let mut t = vec![0u16; arch.num_params()];
    for (i, p) in arch.params().iter().enumerate() {
        t[p.offset..p.offset + p.len].fill(i as u16);
    }
    t
}

/// Encodes `delta` (full length). With `residual` (error feedback), what is not sent this time,
/// or lost to quantization, is kept there and added to the next delta.
pub fn encode_sparse(
    arch: &Arch,
    delta: &[f32],
    mask: Option<&[bool]>,
    int8: bool,
    top_k: f32,
    residual: Option<&mut Vec<f32>>,
) -> SparseUpdate {
    let kept = kept_indices(mask, delta.len());
    let mut residual = residual;
    if let Some(r) = residual.as_deref_mut()
        && r.len() != delta.len()
    {
        *r = vec![0.0; delta.len()];
    }
    let value = |i: u32| delta[i as usize] + residual.as_deref().map_or(0.0, |r| r[i as usize]);
    // Which kept entries to send: all, or the top-k by magnitude (positions into `kept`).
    let positions: Option<Vec<u32>> = if top_k > 0.0 && top_k < 1.0 {
        let k = ((kept.len() as f64 * top_k as f64).round() as usize).clamp(1, kept.len().max(1));
        let mut order: Vec<u32> = (0..kept.len() as u32).collect();
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, |a, b| {
                value(kept[*b as usize])
                    .abs()
                    .total_cmp(&value(kept[*a as usize]).abs())
            });
            order.truncate(k);
        }
        order.sort_unstable();
        Some(order)
    } else {
        None
    };
    let sent: Vec<u32> = match &positions {
        Some(p) => p.iter().map(|&j| kept[j as usize]).collect(),
        None => kept.clone(),
    };
    let raw: Vec<f32> = sent.iter().map(|&i| value(i)).collect();
    let (values, decoded) = if int8 {
        let tensors = tensor_of(arch);
        let mut scales = vec![0f32; arch.params().len()];
        for (&i, v) in sent.iter().zip(&raw) {
            let t = tensors[i as usize] as usize;
            scales[t] = scales[t].max(v.abs() / 127.0);
        }
        let q: Vec<u8> = sent
            .iter()
            .zip(&raw)
            .map(|(&i, v)| {
                let s = scales[tensors[i as usize] as usize];
                if s > 0.0 {
                    (v / s).round().clamp(-127.0, 127.0) as i8 as u8
                } else {
                    0
                }
            })
            .collect();
        let decoded: Vec<f32> = sent
            .iter()
            .zip(&q)
            .map(|(&i, b)| *b as i8 as f32 * scales[tensors[i as usize] as usize])
            .collect();
        (
            Values::Int8 {
                scales,
                data: Blob(q),
            },
            decoded,
        )
    } else {
        (Values::F32(Blob::from_f32(&raw)), raw.clone())
    };
    if let Some(r) = residual {
        // Everything kept but unsent carries over; sent entries carry their rounding error.
        for &i in &kept {
            r[i as usize] = value_with(delta, r, i);
        }
        for (&i, d) in sent.iter().zip(&decoded) {
            r[i as usize] -= d;
        }
    }
    let positions = positions.map(|p| Blob(crate::codec::positions::encode(&p, kept.len())));
    SparseUpdate { positions, values }
}

fn value_with(delta: &[f32], r: &[f32], i: u32) -> f32 {
    delta[i as usize] + r[i as usize]
}

/// Decodes to a full-length delta (zeros where nothing was sent), checking every bound.
pub fn decode_sparse(
    arch: &Arch,
    update: &SparseUpdate,
    mask: Option<&[bool]>,
) -> Result<Vec<f32>, String> {
    let n = arch.num_params();
    if mask.is_some_and(|m| m.len() != n) {
        return Err("mask does not match the model".into());
    }
    let kept = kept_indices(mask, n);
    let sent: Vec<u32> = match &update.positions {
        None => kept,
        // Ascending and within the kept entries by construction of the coding.
        Some(b) => crate::codec::positions::decode(&b.0, kept.len())
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|p| kept[p as usize])
            .collect(),
    };
    let values: Vec<f32> = match &update.values {
        Values::F32(b) => b.to_f32().map_err(|e| e.to_string())?,
        Values::Int8 { scales, data } => {
            if scales.len() != arch.params().len() {
                return Err(format!(
                    "{} scales for {} tensors",
                    scales.len(),
                    arch.params().len()
                ));
            }
            if scales.iter().any(|s| !s.is_finite() || *s < 0.0) {
                return Err("int8 scales must be finite and non-negative".into());
            }
            if data.0.len() != sent.len() {
                return Err(format!(
                    "{} int8 values for {} positions",
                    data.0.len(),
                    sent.len()
                ));
            }
            let tensors = tensor_of(arch);
            sent.iter()
                .zip(&data.0)
                .map(|(&i, b)| *b as i8 as f32 * scales[tensors[i as usize] as usize])
                .collect()
        }
    };
    if values.len() != sent.len() {
        return Err(format!(
            "{} values for {} positions",
            values.len(),
            sent.len()
        ));
    }
    let mut full = vec![0f32; n];
    for (&i, v) in sent.iter().zip(values) {
        full[i as usize] = v;
    }
    Ok(full)
}

/// Bytes of an update on the wire, without the envelope.
pub fn payload_bytes(update: &SparseUpdate) -> usize {
    update.positions.as_ref().map_or(0, |p| p.len())
        + match &update.values {
            Values::F32(b) => b.len(),
            Values::Int8 { scales, data } => 4 * scales.len() + data.len(),
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Layer;

    fn arch() -> Arch {
        Arch {
            input: [1, 2, 2],
            classes: 3,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 4,
                    units: 3,
                },
            ],
        }
    }

    /// Distinct magnitudes, so top-k has no ties.
    fn delta() -> Vec<f32> {
        (0..15)
            .map(|i| (i as f32 - 7.0) * 0.1 + i as f32 * 0.001)
            .collect()
    }

    #[test]
    fn f32_round_trip_is_exact_on_kept_entries() {
        let a = arch();
        let mask: Vec<bool> = (0..15).map(|i| i % 3 != 0).collect();
        let u = encode_sparse(&a, &delta(), Some(&mask), false, 1.0, None);
        assert_eq!(payload_bytes(&u), 4 * 10, "only the 10 kept entries travel");
        let back = decode_sparse(&a, &u, Some(&mask)).unwrap();
        for i in 0..15 {
            assert_eq!(back[i], if mask[i] { delta()[i] } else { 0.0 });
        }
    }

    #[test]
    fn int8_is_four_times_smaller_and_close() {
        let a = arch();
        let d: Vec<f32> = (0..15)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.013)
            .collect();
        let u = encode_sparse(&a, &d, None, true, 1.0, None);
        assert_eq!(payload_bytes(&u), 15 + 4 * 2);
        let back = decode_sparse(&a, &u, None).unwrap();
        let max = d.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in back.iter().zip(&d) {
            assert!((x - y).abs() <= max / 127.0 * 0.5 + 1e-7, "{x} vs {y}");
        }
    }

    #[test]
    fn top_k_sends_the_largest_and_keeps_the_rest() {
        let a = arch();
        let d = delta();
        let mut residual = Vec::new();
        let u = encode_sparse(&a, &d, None, false, 0.2, Some(&mut residual));
        let back = decode_sparse(&a, &u, None).unwrap();
        let sent: Vec<usize> = (0..15).filter(|&i| back[i] != 0.0).collect();
        assert_eq!(
            sent,
            vec![0, 13, 14],
            "the three largest magnitudes: {back:?}"
        );
        // Error feedback: sent + residual reconstructs the delta exactly.
        for i in 0..15 {
            assert!((back[i] + residual[i] - d[i]).abs() < 1e-6);
        }
        // Next round the residual is added: a zero delta now sends what was held back.
        let u2 = encode_sparse(&a, &[0.0; 15], None, false, 0.2, Some(&mut residual));
        let back2 = decode_sparse(&a, &u2, None).unwrap();
        assert_eq!(
            (0..15).filter(|&i| back2[i] != 0.0).collect::<Vec<_>>(),
            vec![1, 2, 12]
        );
    }

    #[test]
    fn top_k_positions_cost_at_most_a_bit_or_a_byte_each() {
        // 1,000 kept entries, top 30%: a bitmap (126 bytes) instead of 1,200 bytes of u32s.
        let a = Arch {
            input: [1, 10, 10],
            classes: 10,
            layers: vec![
                Layer::Flatten,
                Layer::Dense {
                    inputs: 100,
                    units: 10,
                },
            ],
        };
        let d: Vec<f32> = (0..1010)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 1e-3)
            .collect();
        let u = encode_sparse(&a, &d, None, true, 0.3, None);
        assert_eq!(
            u.positions.as_ref().unwrap().len(),
            1 + 1010usize.div_ceil(8)
        );
        let back = decode_sparse(&a, &u, None).unwrap();
        assert_eq!(back.iter().filter(|v| **v != 0.0).count(), 303);
        // Top 2%: delta varints, about a byte each.
        let u = encode_sparse(&a, &d, None, true, 0.02, None);
        assert!(
            u.positions.as_ref().unwrap().len() <= 1 + 2 * 20,
            "{}",
            u.positions.as_ref().unwrap().len()
        );
        assert_eq!(
            decode_sparse(&a, &u, None)
                .unwrap()
                .iter()
                .filter(|v| **v != 0.0)
                .count(),
            20
        );
    }

    #[test]
    fn malformed_updates_are_errors() {
        let a = arch();
        let mut u = encode_sparse(&a, &delta(), None, true, 0.5, None);
        assert!(decode_sparse(&a, &u, None).is_ok());
        let good = u.clone();
        u.positions = Some(Blob(vec![5, 0, 0, 0, 1, 0, 0, 0]));
        assert!(
            decode_sparse(&a, &u, None)
                .unwrap_err()
                .contains("unknown coding")
        );
        u.positions = Some(Blob(vec![crate::codec::positions::VARINTS, 99]));
        assert!(decode_sparse(&a, &u, None).unwrap_err().contains("beyond"));
        u.positions = Some(Blob(vec![crate::codec::positions::VARINTS, 0x80]));
        assert!(decode_sparse(&a, &u, None).is_err());
        let mut u = good.clone();
        if let Values::Int8 { scales, .. } = &mut u.values {
            scales[0] = f32::NAN;
        }
        assert!(decode_sparse(&a, &u, None).is_err());
        let mut u = good;
        if let Values::Int8 { data, .. } = &mut u.values {
            data.0.pop();
        }
        assert!(decode_sparse(&a, &u, None).is_err());
        assert!(
            decode_sparse(
                &a,
                &encode_sparse(&a, &delta(), None, false, 1.0, None),
                Some(&[true; 3])
            )
            .is_err()
        );
    }
}
