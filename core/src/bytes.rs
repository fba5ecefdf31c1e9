//! The byte types every payload is made of: raw tensors ([`Blob`]) and packed bit vectors
//! ([`Bits`]). A leaf: the protocol, the codec and training all build on it.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BytesError {
    #[error("tensor payload of {0} bytes is not a whole number of f32 values")]
    Tensor(usize),
    #[error("malformed message: {len} bits in {bytes} bytes")]
    Bits { len: usize, bytes: usize },
}

/// Raw bytes; tensors are little-endian f32.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Blob(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl Blob {
    pub fn from_f32(values: &[f32]) -> Blob {
        let mut b = Vec::with_capacity(values.len() * 4);
        for v in values {
            b.extend_from_slice(&v.to_le_bytes());
        }
        Blob(b)
    }

    pub fn to_f32(&self) -> Result<Vec<f32>, BytesError> {
        if !self.0.len().is_multiple_of(4) {
            return Err(BytesError::Tensor(self.0.len()));
        }
        Ok(self
            .0
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A packed bit vector (LSB first), used for masks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Bits {
    pub len: u64,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl Bits {
    pub fn pack(bits: &[bool]) -> Bits {
        let mut bytes = vec![0u8; bits.len().div_ceil(8)];
        for (i, &b) in bits.iter().enumerate() {
            if b {
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        Bits {
            len: bits.len() as u64,
            bytes,
        }
    }

    pub fn unpack(&self) -> Result<Vec<bool>, BytesError> {
        let len = self.len as usize;
        if self.bytes.len() != len.div_ceil(8) {
            return Err(BytesError::Bits {
                len,
                bytes: self.bytes.len(),
            });
        }
        Ok((0..len)
            .map(|i| self.bytes[i / 8] >> (i % 8) & 1 == 1)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_raw_little_endian() {
        assert_eq!(Blob(vec![0, 0, 128, 63]).to_f32().unwrap(), vec![1.0]);
        assert_eq!(Blob(vec![1, 2, 3]).to_f32(), Err(BytesError::Tensor(3)));
    }

    #[test]
    fn bits_pack_round_trip() {
        let bits: Vec<bool> = (0..19).map(|i| i % 3 == 0).collect();
        let p = Bits::pack(&bits);
        assert_eq!(p.bytes.len(), 3);
        assert_eq!(p.unpack().unwrap(), bits);
        assert!(
            Bits {
                len: 30,
                bytes: vec![0; 2]
            }
            .unpack()
            .is_err()
        );
    }
}
