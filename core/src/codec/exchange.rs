//! The per-batch traffic of a remote loss: the client sends the output of the layers it runs
//! (with the batch's labels); the server answers with the loss and its gradient with respect to
//! that output, which the client back-propagates. Split learning sends activations at a cut
//! inside the model the same way, and makes both directions smaller:
//! - **activation dropout**: the client sends only a random fraction κ of the values, with the
//!   seed that chose them (8 bytes instead of a bitmap); the server rebuilds the same choice,
//!   puts zeros elsewhere and rescales the kept values by 1/κ (so their expectation is
//!   unchanged). The gradient comes back for the kept values only;
//! - **quantized gradients**: `b` bits per value with stochastic rounding against one scale per
//!   batch, so the decoded gradient is unbiased and within one step of the exact one.

use serde::{Deserialize, Serialize};

use crate::protocol::Blob;

/// Which activations a batch keeps: entry `i` is kept when a hash of (`seed`, `i`) falls below
/// `keep` of its range. Both sides compute the same choice from these two numbers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dropout {
    pub seed: u64,
    pub keep: f32,
}

impl Dropout {
    /// The kept entries of `n`.
    pub fn mask(&self, n: usize) -> Vec<bool> {
        let threshold = (self.keep.clamp(0.0, 1.0) as f64 * u64::MAX as f64) as u64;
        (0..n as u64)
            .map(|i| {
                self.keep >= 1.0
                    || splitmix(self.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) < threshold
            })
            .collect()
    }
}

/// One batch's output at the cut, `rows` × `cols`, and the labels of its rows. With dropout,
/// `values` holds the kept entries only, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub rows: u32,
    pub cols: u32,
    pub values: Blob,
    #[serde(with = "serde_bytes")]
    pub labels: Vec<u8>,
    pub dropout: Option<Dropout>,
}

/// A gradient as it travels: exact f32, or `bits` per value (stochastic rounding, values
/// q·scale / levels with q in −levels..=levels, levels = 2^(bits−1) − 1, stored as q + levels).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Grad {
    F32(Blob),
    Quantized {
        bits: u8,
        scale: f32,
        #[serde(with = "serde_bytes")]
        packed: Vec<u8>,
    },
}

/// The server's answer: the batch's mean loss and ∂loss/∂output for the values the client sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub loss: f32,
    pub grad: Grad,
}

/// A decoded request: the full `rows` × `cols` output (dropped entries zero, kept ones rescaled
/// by 1/κ), and which entries were kept.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
    pub labels: Vec<u8>,
    /// The entries the client sent (None: all of them) and κ.
    pub kept: Option<(Vec<bool>, f32)>,
}

/// How a gradient travels back: 32 (exact f32) or 2..=16 bits per value.
pub fn check_bits(bits: u8) -> Result<(), String> {
    match bits {
        32 | 2..=16 => Ok(()),
        _ => Err(format!("gradient bits {bits}: use 32 (exact) or 2 to 16")),
    }
}

/// Encodes a batch's output (`rows` × `cols`, all values); with `dropout`, only the kept ones
/// travel. Returns the bytes and the kept entries (None: all), which the reply is expanded by.
pub fn encode_request(
    values: &[f32],
    rows: usize,
    cols: usize,
    labels: &[u8],
    dropout: Option<Dropout>,
) -> (Vec<u8>, Option<Vec<bool>>) {
    let kept = dropout
        .filter(|d| d.keep < 1.0)
        .map(|d| d.mask(values.len()));
    let sent: Vec<f32> = match &kept {
        Some(k) => values
            .iter()
            .zip(k)
            .filter(|(_, k)| **k)
            .map(|(v, _)| *v)
            .collect(),
        None => values.to_vec(),
    };
    let r = Request {
        rows: rows as u32,
        cols: cols as u32,
        values: Blob::from_f32(&sent),
        labels: labels.to_vec(),
        dropout: dropout.filter(|d| d.keep < 1.0),
    };
    (postcard::to_allocvec(&r).expect("encoding a request"), kept)
}

/// Decodes and checks a request: sizes agree, values are finite, labels below `classes`, κ in
/// (0, 1].
pub fn decode_request(bytes: &[u8], classes: usize) -> Result<Batch, String> {
    let r: Request =
        postcard::from_bytes(bytes).map_err(|e| format!("malformed exchange request: {e}"))?;
    let (rows, cols) = (r.rows as usize, r.cols as usize);
    let sent = r.values.to_f32().map_err(|e| e.to_string())?;
    let n = rows
        .checked_mul(cols)
        .filter(|n| *n <= crate::protocol::MAX_FRAME_BYTES)
        .ok_or("request shape too large")?;
    if rows == 0 || r.labels.len() != rows {
        return Err(format!(
            "request of {} labels for {rows} rows",
            r.labels.len()
        ));
    }
    if let Some(i) = sent.iter().position(|v| !v.is_finite()) {
        return Err(format!("request value {i} is {} (not finite)", sent[i]));
    }
    if let Some(l) = r.labels.iter().find(|l| **l as usize >= classes) {
        return Err(format!("label {l} is not below {classes}"));
    }
    let (values, kept) = match r.dropout {
        None => (sent, None),
        Some(d) if !(d.keep > 0.0 && d.keep <= 1.0) => {
            return Err(format!("dropout keeps {} (not in (0, 1])", d.keep));
        }
        Some(d) => {
            let mask = d.mask(n);
            let mut it = sent.iter();
            let scale = 1.0 / d.keep;
            let full: Vec<f32> = mask
                .iter()
                .map(|&k| {
                    if k {
                        it.next().map_or(f32::NAN, |v| v * scale)
                    } else {
                        0.0
                    }
                })
                .collect();
            if it.next().is_some() || full.iter().any(|v| v.is_nan()) {
                return Err(format!(
                    "request sends {} values, its dropout keeps {}",
                    sent.len(),
                    mask.iter().filter(|k| **k).count()
                ));
            }
            // A finite value can overflow once rescaled by 1/κ; the loss would then be NaN.
            if full.iter().any(|v| v.is_infinite()) {
                return Err(format!(
                    "request values overflow when rescaled by 1/{} (dropout)",
                    d.keep
                ));
            }
            (full, Some((mask, d.keep)))
        }
    };
    if values.len() != n {
        return Err(format!(
            "request of {} values for {rows} × {cols}",
            values.len()
        ));
    }
    Ok(Batch {
        rows,
        cols,
        values,
        labels: r.labels,
        kept,
    })
}

/// Encodes the reply to `batch`: `grad` is ∂loss/∂(the values the server used), full size. The
/// client gets ∂loss/∂(what it sent): the kept entries only, times 1/κ, at `bits` per value
/// (stochastic rounding drawn from `seed`).
pub fn encode_reply(loss: f32, grad: &[f32], batch: &Batch, bits: u8, seed: u64) -> Vec<u8> {
    let sent: Vec<f32> = match &batch.kept {
        Some((mask, keep)) => grad
            .iter()
            .zip(mask)
            .filter(|(_, k)| **k)
            .map(|(g, _)| g / keep)
            .collect(),
        None => grad.to_vec(),
    };
    let grad = if bits >= 32 {
        Grad::F32(Blob::from_f32(&sent))
    } else {
        quantize(&sent, bits, seed)
    };
    postcard::to_allocvec(&Reply { loss, grad }).expect("encoding a reply")
}

/// Decodes a reply to a request of `expected` values whose kept entries were `kept` (None: all),
/// checking sizes and finiteness; returns the loss and the full-size gradient (zeros where
/// nothing was sent).
pub fn decode_reply(
    bytes: &[u8],
    expected: usize,
    kept: Option<&[bool]>,
) -> Result<(f32, Vec<f32>), String> {
    let r: Reply =
        postcard::from_bytes(bytes).map_err(|e| format!("malformed exchange reply: {e}"))?;
    let sent_len = kept.map_or(expected, |k| k.iter().filter(|k| **k).count());
    let grad = match r.grad {
        Grad::F32(b) => b.to_f32().map_err(|e| e.to_string())?,
        Grad::Quantized {
            bits,
            scale,
            packed,
        } => dequantize(bits, scale, &packed, sent_len)?,
    };
    if grad.len() != sent_len {
        return Err(format!(
            "reply has {} gradient values, expected {sent_len}",
            grad.len()
        ));
    }
    if !r.loss.is_finite() || grad.iter().any(|g| !g.is_finite()) {
        return Err("reply has non-finite values".into());
    }
    let full = match kept {
        None => grad,
        Some(k) => {
            let mut it = grad.into_iter();
            k.iter()
                .map(|&k| if k { it.next().unwrap_or(0.0) } else { 0.0 })
                .collect()
        }
    };
    Ok((r.loss, full))
}

fn levels(bits: u8) -> u32 {
    (1u32 << (bits - 1)) - 1
}

/// `bits`-bit stochastic rounding of `values` against their largest magnitude: unbiased (the
/// expected decoded value is the input) and never more than one step (scale / levels) off.
pub fn quantize(values: &[f32], bits: u8, seed: u64) -> Grad {
    let l = levels(bits) as f64;
    let scale = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut w = BitWriter::default();
    let mut state = seed;
    for v in values {
        let x = if scale > 0.0 {
            *v as f64 / scale as f64 * l
        } else {
            0.0
        };
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let u = (splitmix(state) >> 11) as f64 / (1u64 << 53) as f64;
        let q = (x.floor() + ((x - x.floor()) > u) as u8 as f64).clamp(-l, l);
        w.put((q + l) as u32, bits);
    }
    Grad::Quantized {
        bits,
        scale,
        packed: w.bytes,
    }
}

/// The values of a quantized gradient; `n` of them, or an error if the bytes do not hold exactly
/// that many codes.
pub fn dequantize(bits: u8, scale: f32, packed: &[u8], n: usize) -> Result<Vec<f32>, String> {
    check_bits(bits)?;
    if bits == 32
        || packed.len() != (n * bits as usize).div_ceil(8)
        || !scale.is_finite()
        || scale < 0.0
    {
        return Err(format!(
            "quantized gradient of {} bytes at {bits} bits (scale {scale}) for {n} values",
            packed.len()
        ));
    }
    let l = levels(bits);
    let step = scale / l as f32;
    let mut r = BitReader {
        bytes: packed,
        at: 0,
    };
    (0..n)
        .map(|_| {
            let code = r.take(bits);
            if code > 2 * l {
                return Err(format!("gradient code {code} above {}", 2 * l));
            }
            Ok((code as i64 - l as i64) as f32 * step)
        })
        .collect()
}

#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    used: u32,
}

impl BitWriter {
    /// Appends the low `bits` bits of `v`, least significant first.
    fn put(&mut self, v: u32, bits: u8) {
        for b in 0..bits {
            if self.used.is_multiple_of(8) {
                self.bytes.push(0);
            }
            let last = self.bytes.len() - 1;
            self.bytes[last] |= (((v >> b) & 1) as u8) << (self.used % 8);
            self.used += 1;
        }
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl BitReader<'_> {
    fn take(&mut self, bits: u8) -> u32 {
        let mut v = 0;
        for b in 0..bits {
            v |= (((self.bytes[self.at / 8] >> (self.at % 8)) & 1) as u32) << b;
            self.at += 1;
        }
        v
    }
}

/// SplitMix64: a fast, well-mixed hash of a 64-bit number, the same on every platform.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mean cross-entropy of logits (`rows` × classes) against the labels, and its gradient with
/// respect to the logits: (softmax − one-hot) / rows. Computed in f64.
pub fn cross_entropy_grad(batch: &Batch) -> (f32, Vec<f32>) {
    let (rows, cols) = (batch.rows, batch.cols);
    let mut grad = vec![0f32; rows * cols];
    let mut loss = 0f64;
    for (r, row) in batch.values.chunks(cols).enumerate() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
        let exps: Vec<f64> = row.iter().map(|v| (*v as f64 - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        let label = batch.labels[r] as usize;
        loss += sum.ln() + max - row[label] as f64;
        for (c, e) in exps.iter().enumerate() {
            let p = e / sum - (c == label) as u8 as f64;
            grad[r * cols + c] = (p / rows as f64) as f32;
        }
    }
    ((loss / rows as f64) as f32, grad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply_round_trip_and_check_sizes() {
        let values = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0];
        let (bytes, kept) = encode_request(&values, 2, 3, &[2, 0], None);
        assert!(kept.is_none());
        let b = decode_request(&bytes, 3).unwrap();
        assert_eq!(
            (b.rows, b.cols, b.values.as_slice(), b.labels.as_slice()),
            (2, 3, &values[..], &[2u8, 0][..])
        );
        assert!(decode_request(&bytes, 2).unwrap_err().contains("label 2"));
        assert!(
            decode_request(&encode_request(&values, 3, 3, &[0, 0, 0], None).0, 3).is_err(),
            "size mismatch"
        );
        assert!(decode_request(&encode_request(&[f32::NAN], 1, 1, &[0], None).0, 3).is_err());
        assert!(decode_request(&bytes[..bytes.len() - 1], 3).is_err());
        let (loss, grad) = cross_entropy_grad(&b);
        let reply = encode_reply(loss, &grad, &b, 32, 0);
        assert_eq!(decode_reply(&reply, 6, None).unwrap(), (loss, grad.clone()));
        assert!(decode_reply(&reply, 5, None).is_err());
        // Each row's gradient sums to zero; the labelled entry is negative.
        assert!((grad[..3].iter().sum::<f32>()).abs() < 1e-6 && grad[2] < 0.0 && grad[3] < 0.0);
        // Row 0: logits 1, 2, 0.5, label 2: −log softmax = log(e + e² + e^0.5) − 0.5.
        let row0 = ((1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln() - 0.5) as f32;
        let row1 = ((-1f64).exp() + 1.0 + 3f64.exp()).ln() as f32 + 1.0;
        assert!((loss - (row0 + row1) / 2.0).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn a_value_that_overflows_once_rescaled_is_refused() {
        // Finite as sent; 2 × f32::MAX is infinite after rescaling by 1/κ = 2, and the loss NaN.
        let d = Dropout { seed: 1, keep: 0.5 };
        let values = [f32::MAX; 8];
        let (bytes, kept) = encode_request(&values, 2, 4, &[0, 1], Some(d));
        assert!(kept.unwrap().iter().any(|k| *k));
        let e = decode_request(&bytes, 4).unwrap_err();
        assert!(e.contains("overflow"), "{e}");
        // Without dropout nothing is rescaled: the same values decode.
        let (bytes, _) = encode_request(&values, 2, 4, &[0, 1], None);
        assert!(decode_request(&bytes, 4).is_ok());
    }

    #[test]
    fn dropout_keeps_about_kappa_rescales_and_routes_gradients_back() {
        let n = 20_000;
        let values: Vec<f32> = (0..n).map(|i| (i % 7) as f32 + 1.0).collect();
        let d = Dropout {
            seed: 42,
            keep: 0.5,
        };
        let (bytes, kept) = encode_request(&values, 100, 200, &[0; 100], Some(d));
        let kept = kept.unwrap();
        let frac = kept.iter().filter(|k| **k).count() as f64 / n as f64;
        assert!((frac - 0.5).abs() < 0.02, "kept {frac}");
        // About half the bytes of the full request.
        let full = encode_request(&values, 100, 200, &[0; 100], None).0;
        assert!((bytes.len() as f64 / full.len() as f64 - 0.5).abs() < 0.03);
        let b = decode_request(&bytes, 10).unwrap();
        for i in 0..n {
            assert_eq!(b.values[i], if kept[i] { values[i] * 2.0 } else { 0.0 });
        }
        // The gradient w.r.t. what was sent is the server's gradient times 1/κ, zero elsewhere.
        let g: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
        let (_, back) = decode_reply(&encode_reply(0.5, &g, &b, 32, 0), n, Some(&kept)).unwrap();
        for i in 0..n {
            assert_eq!(back[i], if kept[i] { g[i] * 2.0 } else { 0.0 });
        }
        // Another seed keeps other entries; a wrong count of values is refused.
        assert_ne!(
            Dropout {
                seed: 43,
                keep: 0.5
            }
            .mask(n),
            kept
        );
        let mut r: Request = postcard::from_bytes(&bytes).unwrap();
        r.dropout = Some(Dropout { seed: 7, keep: 0.5 });
        assert!(decode_request(&postcard::to_allocvec(&r).unwrap(), 10).is_err());
        r.dropout = Some(Dropout {
            seed: 42,
            keep: 0.0,
        });
        assert!(
            decode_request(&postcard::to_allocvec(&r).unwrap(), 10)
                .unwrap_err()
                .contains("dropout")
        );
    }

    #[test]
    fn quantizer_is_unbiased_and_within_one_step() {
        let values: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 0.01).collect();
        let scale = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        for bits in [2u8, 4, 8] {
            let step = scale / levels(bits) as f32;
            let draws = 4000;
            let mut mean = vec![0f64; values.len()];
            for s in 0..draws {
                let Grad::Quantized {
                    bits: b,
                    scale: sc,
                    packed,
                } = quantize(&values, bits, s)
                else {
                    panic!()
                };
                assert_eq!(packed.len(), (64 * bits as usize).div_ceil(8));
                let q = dequantize(b, sc, &packed, values.len()).unwrap();
                for (i, (v, x)) in values.iter().zip(&q).enumerate() {
                    assert!(
                        (v - x).abs() <= step * 1.0001,
                        "bits {bits}: {x} is more than a step from {v}"
                    );
                    mean[i] += *x as f64 / draws as f64;
                }
            }
            // Mean error over many draws goes to zero (well under a step / √draws · 4).
            let worst = values
                .iter()
                .zip(&mean)
                .map(|(v, m)| (*v as f64 - m).abs())
                .fold(0f64, f64::max);
            assert!(
                worst < step as f64 * 4.0 / (draws as f64).sqrt(),
                "bits {bits}: mean error {worst}, step {step}"
            );
        }
        // The extremes are exact; a wrong length or a code out of range is refused.
        let Grad::Quantized { packed, .. } = quantize(&[1.0, -1.0], 4, 0) else {
            panic!()
        };
        assert_eq!(dequantize(4, 1.0, &packed, 2).unwrap(), vec![1.0, -1.0]);
        assert!(dequantize(4, 1.0, &packed, 3).is_err());
        assert!(
            dequantize(4, 1.0, &[0xff], 2)
                .unwrap_err()
                .contains("code 15")
        );
        assert!(check_bits(1).is_err() && check_bits(17).is_err() && check_bits(8).is_ok());
    }
}
