//! Labelled image datasets in memory, and the IDX format (MNIST, Fashion-MNIST, EMNIST).
//!
//! Parsing works on bytes the caller has read, so this stays free of I/O.

pub mod partition;

use std::io::Read;

use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

/// Images as bytes (0–255, row-major `[n, C, H, W]`) and labels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    /// Channels, height, width.
    pub shape: [usize; 3],
    pub classes: usize,
    #[serde(with = "serde_bytes")]
    pub images: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub labels: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DataError {
    #[error("not an IDX file: {0}")]
    Format(String),
    #[error("{images} images but {labels} labels")]
    Count { images: usize, labels: usize },
    #[error("label {label} at index {index} is not below the class count {classes}")]
    Label {
        label: u8,
        index: usize,
        classes: usize,
    },
    #[error("gzip: {0}")]
    Gzip(String),
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Builds a dataset from IDX image and label files (each may be gzipped). Without `classes`,
    /// the class count is the largest label plus one (at least 2).
    pub fn from_idx(
        images: &[u8],
        labels: &[u8],
        classes: Option<usize>,
    ) -> Result<Dataset, DataError> {
        let images = gunzip_if_needed(images)?;
        let labels = gunzip_if_needed(labels)?;
        let (img_dims, img_data) = parse_idx(&images)?;
        let (lbl_dims, lbl_data) = parse_idx(&labels)?;
        if img_dims.len() != 3 {
            return Err(DataError::Format(format!(
                "images need 3 dimensions, found {}",
                img_dims.len()
            )));
        }
        if lbl_dims.len() != 1 {
            return Err(DataError::Format(format!(
                "labels need 1 dimension, found {}",
                lbl_dims.len()
            )));
        }
        let classes = classes
            .unwrap_or_else(|| 1 + lbl_data.iter().copied().max().unwrap_or(1) as usize)
            .max(2);
        let d = Dataset {
            shape: [1, img_dims[1], img_dims[2]],
            classes,
            images: img_data.to_vec(),
            labels: lbl_data.to_vec(),
        };
        d.check()?;
        Ok(d)
    }

    /// Checks counts and labels.
    pub fn check(&self) -> Result<(), DataError> {
        let per = self.sample_len();
        if per == 0 || self.images.len() != self.labels.len() * per {
            return Err(DataError::Count {
                images: self.images.len() / per.max(1),
                labels: self.labels.len(),
            });
        }
        if let Some((index, &label)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= self.classes)
        {
            return Err(DataError::Label {
                label,
                index,
                classes: self.classes,
            });
        }
        Ok(())
    }

    /// The samples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let per = self.sample_len();
        let mut images = Vec::with_capacity(indices.len() * per);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(&self.images[i * per..(i + 1) * per]);
            labels.push(self.labels[i]);
        }
        Dataset {
            shape: self.shape,
            classes: self.classes,
            images,
            labels,
        }
    }

    /// A seeded shuffle split into (first, second) with `fraction` of the samples in the second.
    pub fn split(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(seed));
        let cut = self.len() - ((self.len() as f64 * fraction).round() as usize).min(self.len());
        (self.select(&idx[..cut]), self.select(&idx[cut..]))
    }

    /// Count of samples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }

    /// Pixel values scaled to [0, 1] for samples `start..end`, as the model's input.
    pub fn pixels(&self, indices: &[usize]) -> Vec<f32> {
        let per = self.sample_len();
        let mut out = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            out.extend(
                self.images[i * per..(i + 1) * per]
                    .iter()
                    .map(|&b| b as f32 / 255.0),
            );
        }
        out
    }
}

fn gunzip_if_needed(bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| DataError::Gzip(e.to_string()))?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Parses an unsigned-byte IDX file: magic `00 00 08 <ndims>`, big-endian u32 dims, data.
fn parse_idx(bytes: &[u8]) -> Result<(Vec<usize>, &[u8]), DataError> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::Format("missing the 00 00 magic".into()));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::Format(format!(
            "element type 0x{:02x} is not unsigned byte",
            bytes[2]
        )));
    }
    let ndims = bytes[3] as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::Format("header is cut short".into()));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let total = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match total {
        Some(t) if bytes.len() - header == t => Ok((dims, &bytes[header..])),
        _ => Err(DataError::Format(format!(
            "dimensions {dims:?} do not match {} data bytes",
            bytes.len() - header
        ))),
    }
}

/// Writes an unsigned-byte IDX file (used by tools that convert other formats).
pub fn write_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (Vec<u8>, Vec<u8>) {
        let imgs: Vec<u8> = (0..3 * 4).map(|i| i as u8).collect();
        (write_idx(&[3, 2, 2], &imgs), write_idx(&[3], &[0, 2, 1]))
    }

    #[test]
    fn idx_round_trip_plain_and_gzip() {
        let (i, l) = tiny();
        let d = Dataset::from_idx(&i, &l, Some(3)).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.shape, [1, 2, 2]);
        assert_eq!(d.images[4..8], [4, 5, 6, 7]);
        let gz = |b: &[u8]| {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(b).unwrap();
            e.finish().unwrap()
        };
        assert_eq!(Dataset::from_idx(&gz(&i), &gz(&l), None).unwrap(), d);
    }

    #[test]
    fn idx_errors_are_reported() {
        let (i, l) = tiny();
        assert!(matches!(
            Dataset::from_idx(&i[..10], &l, Some(3)),
            Err(DataError::Format(_))
        ));
        assert!(matches!(
            Dataset::from_idx(&i, &write_idx(&[2], &[0, 1]), Some(3)),
            Err(DataError::Count { .. })
        ));
        assert!(matches!(
            Dataset::from_idx(&i, &l, Some(2)),
            Err(DataError::Label {
                label: 2,
                index: 1,
                ..
            })
        ));
        assert!(matches!(
            Dataset::from_idx(b"hello", &l, Some(3)),
            Err(DataError::Format(_))
        ));
    }

    #[test]
    fn split_is_seeded_and_complete() {
        let (i, l) = tiny();
        let d = Dataset::from_idx(&i, &l, Some(3)).unwrap();
        let (a, b) = d.split(1.0 / 3.0, 1);
        assert_eq!((a.len(), b.len()), (2, 1));
        assert_eq!(d.split(1.0 / 3.0, 1), (a, b));
    }
}
