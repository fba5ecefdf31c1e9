//! What a run folder holds after every round, and how a restarted server resumes from it:
//! `metrics.json`/`metrics.csv` (see [`crate::round::record`]), `model.bin` (the global model) and
//! `checkpoint.bin` (the global model plus the strategy's own state).

use std::path::Path;

use canopy_core::model::state::ModelState;
use serde::{Deserialize, Serialize};

use crate::round::record::RoundRecord;

#[derive(Serialize, Deserialize)]
pub struct Checkpoint {
    /// Rounds completed.
    pub round: u32,
    pub global: ModelState,
    pub strategy: Vec<u8>,
}

/// Writes the model and the checkpoint; each file is written then renamed, so a reader (or a
/// restart after a crash mid-write) never sees half a file.
pub fn save(dir: &Path, ckpt: &Checkpoint) -> Result<(), String> {
    let write = |name: &str, bytes: Vec<u8>| -> Result<(), String> {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, dir.join(name)))
            .map_err(|e| format!("writing {}: {e}", dir.join(name).display()))
    };
    write(
        "model.bin",
        postcard::to_allocvec(&ckpt.global).expect("encoding the model"),
    )?;
    write(
        "checkpoint.bin",
        postcard::to_allocvec(ckpt).expect("encoding the checkpoint"),
    )
}

/// The global model a run folder holds (`model.bin`), checked against its architecture;
/// `path` is the run folder or the file itself. What `canopy export` reads.
pub fn read_model(path: &Path) -> Result<ModelState, String> {
    let file = if path.is_file() {
        path.to_path_buf()
    } else {
        path.join("model.bin")
    };
    let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let model: ModelState =
        postcard::from_bytes(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
    model
        .arch
        .validate()
        .map_err(|e| format!("{}: {e}", file.display()))?;
    if model.params.len() != model.arch.num_params()
        || model
            .mask
            .as_ref()
            .is_some_and(|m| m.len() != model.params.len())
    {
        return Err(format!(
            "{}: parameters do not match the architecture",
            file.display()
        ));
    }
    Ok(model)
}

/// The checkpoint and finished rounds of a run folder, if it has them. A checkpoint that cannot
/// be read is an error rather than a silent fresh start: starting over would overwrite the run.
pub fn resume(dir: &Path) -> Result<Option<(Checkpoint, Vec<RoundRecord>)>, String> {
    let path = dir.join("checkpoint.bin");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let ckpt: Checkpoint =
        postcard::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    ckpt.global
        .arch
        .validate()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if ckpt.global.params.len() != ckpt.global.arch.num_params() {
        return Err(format!(
            "{}: parameters do not match the architecture",
            path.display()
        ));
    }
    let json_path = dir.join("metrics.json");
    let json: serde_json::Value = std::fs::read(&json_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("{}: {e}", json_path.display()))?;
    let rounds: Vec<RoundRecord> = serde_json::from_value(json["rounds"].clone())
        .map_err(|e| format!("{}: {e}", json_path.display()))?;
    let done = ckpt.round;
    Ok(Some((
        ckpt,
        rounds.into_iter().filter(|r| r.round <= done).collect(),
    )))
}
