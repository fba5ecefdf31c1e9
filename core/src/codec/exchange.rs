//! The per-batch traffic of a remote loss: the client sends the output of the layers it runs
//! (with the batch's labels); the server answers with the loss and its gradient with respect to
//! that output, which the client back-propagates. Split learning sends activations at a cut
//! inside the model the same way.

use serde::{Deserialize, Serialize};

use crate::protocol::Blob;

/// One batch's output at the cut, `rows` × `cols` f32, and the labels of its rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub rows: u32,
    pub cols: u32,
    pub values: Blob,
    #[serde(with = "serde_bytes")]
    pub labels: Vec<u8>,
}

/// The server's answer: the batch's mean loss and ∂loss/∂output, `rows` × `cols` f32.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub loss: f32,
    pub grad: Blob,
}

/// A decoded request.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
    pub labels: Vec<u8>,
}

pub fn encode_request(values: &[f32], rows: usize, cols: usize, labels: &[u8]) -> Vec<u8> {
    let r = Request { rows: rows as u32, cols: cols as u32, values: Blob::from_f32(values), labels: labels.to_vec() };
    postcard::to_allocvec(&r).expect("encoding a request")
}

/// Decodes and checks a request: sizes agree, values are finite, labels below `classes`.
pub fn decode_request(bytes: &[u8], classes: usize) -> Result<Batch, String> {
    let r: Request = postcard::from_bytes(bytes).map_err(|e| format!("malformed exchange request: {e}"))?;
    let (rows, cols) = (r.rows as usize, r.cols as usize);
    let values = r.values.to_f32().map_err(|e| e.to_string())?;
    if rows == 0 || values.len() != rows * cols || r.labels.len() != rows {
        return Err(format!("request of {} values and {} labels for {rows} × {cols}", values.len(), r.labels.len()));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("request value {i} is {} (not finite)", values[i]));
    }
    if let Some(l) = r.labels.iter().find(|l| **l as usize >= classes) {
        return Err(format!("label {l} is not below {classes}"));
    }
    Ok(Batch { rows, cols, values, labels: r.labels })
}

pub fn encode_reply(loss: f32, grad: &[f32]) -> Vec<u8> {
    postcard::to_allocvec(&Reply { loss, grad: Blob::from_f32(grad) }).expect("encoding a reply")
}

/// Decodes a reply, checking it has one finite gradient value per output value.
pub fn decode_reply(bytes: &[u8], expected: usize) -> Result<(f32, Vec<f32>), String> {
    let r: Reply = postcard::from_bytes(bytes).map_err(|e| format!("malformed exchange reply: {e}"))?;
    let grad = r.grad.to_f32().map_err(|e| e.to_string())?;
    if grad.len() != expected {
        return Err(format!("reply has {} gradient values, expected {expected}", grad.len()));
    }
    if !r.loss.is_finite() || grad.iter().any(|g| !g.is_finite()) {
        return Err("reply has non-finite values".into());
    }
    Ok((r.loss, grad))
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
        let bytes = encode_request(&values, 2, 3, &[2, 0]);
        let b = decode_request(&bytes, 3).unwrap();
        assert_eq!((b.rows, b.cols, b.values.as_slice(), b.labels.as_slice()), (2, 3, &values[..], &[2u8, 0][..]));
        assert!(decode_request(&bytes, 2).unwrap_err().contains("label 2"));
        assert!(decode_request(&encode_request(&values, 3, 3, &[0, 0, 0]), 3).is_err(), "size mismatch");
        assert!(decode_request(&encode_request(&[f32::NAN], 1, 1, &[0]), 3).is_err());
        assert!(decode_request(&bytes[..bytes.len() - 1], 3).is_err());
        let (loss, grad) = cross_entropy_grad(&b);
        let reply = encode_reply(loss, &grad);
        assert_eq!(decode_reply(&reply, 6).unwrap(), (loss, grad.clone()));
        assert!(decode_reply(&reply, 5).is_err());
        // Each row's gradient sums to zero; the labelled entry is negative.
        assert!((grad[..3].iter().sum::<f32>()).abs() < 1e-6 && grad[2] < 0.0 && grad[3] < 0.0);
        // Row 0: logits 1, 2, 0.5, label 2: −log softmax = log(e + e² + e^0.5) − 0.5.
        let row0 = ((1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln() - 0.5) as f32;
        let row1 = ((-1f64).exp() + 1.0 + 3f64.exp()).ln() as f32 + 1.0;
        assert!((loss - (row0 + row1) / 2.0).abs() < 1e-5, "{loss}");
    }
}
