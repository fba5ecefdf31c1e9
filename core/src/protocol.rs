//! The wire protocol between the server and its clients (browser tabs and native clients).
//!
//! Every message is one binary WebSocket frame: the bytes `C N`, a protocol version byte, then a
//! postcard-encoded message. Tensors travel as raw little-endian bytes ([`Blob`]). Decoding never
//! panics: every failure is a [`ProtocolError`] the receiver can report back.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::bytes::{Bits, Blob};
use crate::data::partition::Shard;
use crate::model::arch::Arch;
pub use crate::train::step::SupermaskKind;
use crate::train::{Eval, Progress, TrainSpec};

pub const PROTOCOL_VERSION: u8 = 7;
const MAGIC: [u8; 2] = *b"CN";

/// Largest frame either side accepts. The biggest built-in model (FedAvg's CNN, 1.66 M
/// parameters) is 6.7 MB as f32, so this leaves room without letting one client exhaust memory.
pub const MAX_FRAME_BYTES: usize = 32 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("frame too short or not a Canopy frame")]
    NotCanopy,
    #[error("protocol version {got}, this side speaks {PROTOCOL_VERSION}")]
    Version { got: u8 },
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Named in JSON as its `Display` form (postcard sends the variant index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    /// WebGPU in a browser (a real GPU or a software adapter).
    #[serde(rename = "webgpu")]
    WebGpu,
    /// burn's CPU backend compiled to wasm.
    #[serde(rename = "cpu")]
    WasmCpu,
    /// A native client process.
    #[serde(rename = "native")]
    Native,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::WebGpu => "webgpu",
            Backend::WasmCpu => "cpu",
            Backend::Native => "native",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub backend: Backend,
    /// GPU adapter description, or the reason WebGPU was not used.
    pub adapter: String,
    pub user_agent: String,
    /// What a tab measured when it chose its backend: one entry per backend it timed. Empty
    /// when only one backend was available or `?backend=` forced one.
    pub speeds: Vec<BackendSpeed>,
}

impl DeviceInfo {
    /// A client that did not choose between backends.
    pub fn new(
        backend: Backend,
        adapter: impl Into<String>,
        user_agent: impl Into<String>,
    ) -> Self {
        DeviceInfo {
            backend,
            adapter: adapter.into(),
            user_agent: user_agent.into(),
            speeds: Vec::new(),
        }
    }
}

/// Training speed of one backend from the short timed run a tab makes at start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendSpeed {
    pub backend: Backend,
    /// `None`: not timed (a software WebGPU adapter is skipped unless asked for; see `note`).
    pub samples_per_sec: Option<f32>,
    /// How it was timed, or why not.
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u8,
    pub name: String,
    pub device: DeviceInfo,
    /// The id a reconnecting client had, so it keeps its data shard.
    pub resume: Option<u64>,
    /// Version of the pruning mask the client holds, so the server need not send it again.
    pub mask_version: Option<u64>,
}

/// What the run is, for the client page to show.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run_id: String,
    pub strategy: String,
    pub model: String,
    pub dataset: String,
    pub partition: String,
    pub rounds: u32,
    /// The class names of a run whose data the tabs bring themselves (`dataset = "tab"`): the
    /// welcome's shard is then empty and each tab labels its own examples with these names.
    /// Empty for a run whose server deals the data.
    pub classes: Vec<String>,
}

/// Most classes a run on the tabs' own data may name.
pub const MAX_TAB_CLASSES: usize = 16;
/// Longest class name, in characters.
pub const MAX_CLASS_NAME: usize = 32;
/// Most examples per class (training and held-out each) a tab may report: a tab holds its
/// examples in memory to train on them, so more than this is not a classroom's camera.
pub const MAX_EXAMPLES_PER_CLASS: u32 = 5_000;

/// Checks the class names of a run on the tabs' own data: 2 to [`MAX_TAB_CLASSES`] names, each
/// 1 to [`MAX_CLASS_NAME`] characters of printable text, no two alike.
pub fn check_class_names(classes: &[String]) -> Result<(), String> {
    if !(2..=MAX_TAB_CLASSES).contains(&classes.len()) {
        return Err(format!(
            "data.classes names {} classes: a run on the tabs' own data needs 2 to {MAX_TAB_CLASSES}",
            classes.len()
        ));
    }
    for (i, c) in classes.iter().enumerate() {
        let n = c.chars().count();
        if c.trim().is_empty() || n > MAX_CLASS_NAME || c.chars().any(char::is_control) {
            return Err(format!(
                "data.classes[{i}] {c:?}: a class name is 1 to {MAX_CLASS_NAME} printable characters"
            ));
        }
        if classes[..i].contains(c) {
            return Err(format!("data.classes names {c:?} twice"));
        }
    }
    Ok(())
}

/// Checks the example counts a tab reports (`ClientMsg::Examples`) against the run's `classes`:
/// one training and one held-out count per class, each at most [`MAX_EXAMPLES_PER_CLASS`].
/// Returns the training total, the most samples a result from that tab may then claim.
pub fn check_example_counts(classes: usize, train: &[u32], test: &[u32]) -> Result<u64, String> {
    if classes == 0 {
        return Err("this run's data is dealt by the server: it takes no example counts".into());
    }
    if train.len() != classes || test.len() != classes {
        return Err(format!(
            "example counts for {} and {} classes: this run has {classes}",
            train.len(),
            test.len()
        ));
    }
    if let Some(n) = train
        .iter()
        .chain(test)
        .find(|&&n| n > MAX_EXAMPLES_PER_CLASS)
    {
        return Err(format!(
            "{n} examples in one class: at most {MAX_EXAMPLES_PER_CLASS} a class"
        ));
    }
    Ok(train.iter().map(|&n| n as u64).sum())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub client_id: u64,
    pub run: RunInfo,
    pub shard: Shard,
}

/// The model a task starts from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelPayload {
    pub arch: Arch,
    pub params: Params,
    /// Entries outside the mask are zero and stay exactly zero during training.
    pub mask: Option<MaskSpec>,
}

/// How the parameters travel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Params {
    /// f32 little-endian: every parameter without a mask; with one, only the kept entries in order.
    Values(Blob),
    /// A supermask over frozen random weights: the client regenerates θ₀ bit-exactly from `seed`
    /// (the same `ModelState::init` both sides run), and `bits` has one bit per kept entry.
    Supermask {
        seed: u64,
        kind: SupermaskKind,
        bits: Bits,
    },
}

/// A pruning mask travels once; afterwards the server names the version the client holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MaskSpec {
    Full { version: u64, bits: Bits },
    Cached { version: u64 },
}

impl MaskSpec {
    pub fn version(&self) -> u64 {
        match self {
            MaskSpec::Full { version, .. } | MaskSpec::Cached { version } => *version,
        }
    }
}

/// What the client sends back.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum UploadSpec {
    /// The trained parameters.
    Weights,
    /// Trained minus starting parameters.
    Delta,
    /// The delta scaled down to at most this L2 norm by the client (DP-FedAvg's client-side
    /// clipping); the server refuses a larger one.
    ClippedDelta { norm: f32 },
    /// The delta on the mask's kept entries only (all entries without a mask), optionally int8
    /// with one scale per tensor, optionally only the `top_k` fraction largest in magnitude,
    /// with the rest carried to the next round (error feedback).
    Sparse {
        int8: bool,
        top_k: f32,
        error_feedback: bool,
    },
    /// The client's supermask bits on the kept entries, per tensor either bit-packed or as the
    /// positions that differ from the task's bits, whichever is smaller.
    Supermask { kind: SupermaskKind },
    /// One bit per kept entry for the direction this task moved the client's supermask score,
    /// stochastically rounded (an entry the client barely moved is a coin toss): see
    /// [`crate::codec::supermask::step_bits`] for `center` and `sure_at`. Travels as
    /// `Supermask` does, against the task's bits.
    ScoreSteps {
        kind: SupermaskKind,
        center: bool,
        sure_at: f32,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub round: u32,
    /// Shared: a round's sampled clients usually start from the same encoded model, so their
    /// tasks hold one copy of it (it travels as a plain `ModelPayload`).
    pub model: Arc<ModelPayload>,
    pub train: TrainSpec,
    pub upload: UploadSpec,
    /// Milliseconds the server waits for the result.
    pub deadline_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Update {
    Weights(Blob),
    Delta(Blob),
    Sparse(SparseUpdate),
    /// One entry per parameter tensor, in the order of `Arch::params`.
    Supermask(Vec<MaskBits>),
}

/// A tensor's supermask bits on its kept entries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MaskBits {
    /// Every kept entry's bit, LSB first: ⌈kept / 8⌉ bytes.
    Packed(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Only the kept entries whose bit differs from the task's, as gaps between ascending
    /// positions, LEB128 varints.
    Flips(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// Delta entries on the kept positions of the task's mask; see [`crate::codec`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseUpdate {
    /// Ascending indices into the list of kept entries, coded by [`crate::codec::positions`] (a bitmap
    /// or delta varints, whichever is smaller); `None`: all of them.
    pub positions: Option<Blob>,
    pub values: Values,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Values {
    F32(Blob),
    /// One i8 per value; value = i8 × scales[tensor of that value].
    Int8 {
        scales: Vec<f32>,
        data: Blob,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientMetrics {
    pub train_loss: f32,
    pub local_test: Eval,
    /// Epochs actually run (early stopping may end training sooner).
    pub epochs: u32,
    pub steps: u32,
    pub train_seconds: f64,
    pub samples_per_sec: f64,
    /// Pruned parameters that are not exactly zero after training (0 when the mask held).
    pub pruned_nonzero: u64,
    /// Seconds of `train_seconds` spent waiting for the server's replies (a remote loss).
    pub exchange_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub round: u32,
    /// Training samples this update was computed from (the aggregation weight).
    pub samples: u64,
    pub update: Update,
    pub metrics: ClientMetrics,
    /// Version of the pruning mask the client now holds.
    pub mask_version: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    Malformed,
    TooLarge,
    Version,
    /// A result that failed validation (shape, NaN, unknown round...).
    Rejected,
    Internal,
    /// A connection limit: too many connections, frames too fast, no Hello in time.
    Refused,
    /// An admin banned this client; the reason follows.
    Banned,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    Hello(Hello),
    Progress {
        round: u32,
        progress: Progress,
    },
    Result(TaskResult),
    Error {
        round: Option<u32>,
        message: String,
    },
    /// A request within a task, answered by `ServerMsg::Exchange` (or `ExchangeFailed`) with the
    /// same round and sequence number; the client awaits it (split learning's activations).
    Exchange {
        round: u32,
        seq: u32,
        payload: Blob,
    },
    Bye,
    /// How many examples the tab holds per class, for training and held out, in a run on the
    /// tabs' own data (numbers only: the examples never leave the tab). Sent after the welcome
    /// and whenever they change; the server samples only tabs with training examples.
    Examples {
        train: Vec<u32>,
        test: Vec<u32>,
    },
}

// A task is most of what travels and is moved once per client; boxing it would only add an
// allocation to every frame.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    Welcome(Welcome),
    Task(Task),
    /// Nothing to do right now (not sampled, waiting for clients, run finished).
    Wait {
        round: u32,
        reason: String,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The reply to the client's exchange request `seq` of `round`.
    Exchange {
        round: u32,
        seq: u32,
        payload: Blob,
    },
    /// Exchange request `seq` of `round` was refused (stale round, no task, malformed...).
    ExchangeFailed {
        round: u32,
        seq: u32,
        code: ErrorCode,
        message: String,
    },
    Bye {
        reason: String,
    },
}

/// Whether a server frame is an exchange reply (`Exchange` or `ExchangeFailed`), read from its
/// header and postcard's variant index without decoding the rest: a tab routes these past its
/// frame queue, and most other frames are tasks worth not decoding twice.
pub fn is_exchange_reply(frame: &[u8]) -> bool {
    // Variant indices of ServerMsg::Exchange and ServerMsg::ExchangeFailed (checked by a test).
    const EXCHANGE: u8 = 4;
    const EXCHANGE_FAILED: u8 = 5;
    frame.len() > 3 && frame[..2] == MAGIC && matches!(frame[3], EXCHANGE | EXCHANGE_FAILED)
}

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    // postcard to a Vec cannot fail for these types.
    postcard::to_extend(msg, out).expect("postcard encoding")
}

/// Variant index of `ServerMsg::Task` in postcard (checked by a test).
const TASK_VARIANT: u8 = 1;

/// The frame of `ServerMsg::Task(task)` in three parts whose concatenation is exactly
/// `encode(&ServerMsg::Task(task))`: the header and round, the model, and the rest (training,
/// upload, deadline). A server sending one model to many clients encodes the model part once and
/// shares it; only the small parts differ per client.
pub fn encode_task_parts(task: &Task) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    (
        encode_task_head(task),
        encode_model_part(&task.model),
        encode_task_tail(task),
    )
}

/// The first part of [`encode_task_parts`]: frame header, message kind and round.
pub fn encode_task_head(task: &Task) -> Vec<u8> {
    let mut head = Vec::with_capacity(16);
    head.extend_from_slice(&MAGIC);
    head.push(PROTOCOL_VERSION);
    head.push(TASK_VARIANT);
    postcard::to_extend(&task.round, head).expect("postcard encoding")
}

/// The model part of [`encode_task_parts`].
pub fn encode_model_part(model: &ModelPayload) -> Vec<u8> {
    postcard::to_allocvec(model).expect("postcard encoding")
}

/// The per-client part of [`encode_task_parts`]: training, upload and deadline.
pub fn encode_task_tail(task: &Task) -> Vec<u8> {
    postcard::to_allocvec(&(&task.train, &task.upload, task.deadline_ms))
        .expect("postcard encoding")
}

pub fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, ProtocolError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge(frame.len()));
    }
    if frame.len() < 3 || frame[..2] != MAGIC {
        return Err(ProtocolError::NotCanopy);
    }
    if frame[2] != PROTOCOL_VERSION {
        return Err(ProtocolError::Version { got: frame[2] });
    }
    let (msg, rest) = postcard::take_from_bytes(&frame[3..])
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(msg)
}

impl ProtocolError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::TooLarge(_) => ErrorCode::TooLarge,
            ProtocolError::Version { .. } => ErrorCode::Version,
            _ => ErrorCode::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Optimizer;

    fn task() -> Task {
        let arch = Arch::preset("mlp", [1, 4, 4], 3).unwrap();
        Task {
            round: 3,
            model: Arc::new(ModelPayload {
                params: Params::Values(Blob::from_f32(&vec![0.5; arch.num_params()])),
                arch,
                mask: Some(MaskSpec::Full {
                    version: 2,
                    bits: Bits::pack(&[true, false, true]),
                }),
            }),
            train: TrainSpec {
                epochs: 1,
                batch_size: 10,
                lr: 0.1,
                optimizer: Optimizer::Sgd { momentum: 0.0 },
                seed: 1,
                patience: 0,
                step: Default::default(),
            },
            upload: UploadSpec::Weights,
            deadline_ms: 1000,
        }
    }

    #[test]
    fn round_trip() {
        let msg = ServerMsg::Task(task());
        let frame = encode(&msg);
        assert_eq!(decode::<ServerMsg>(&frame).unwrap(), msg);
        let hello = ClientMsg::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            name: "tab".into(),
            device: DeviceInfo::new(Backend::WebGpu, "swiftshader", "x"),
            resume: Some(4),
            mask_version: None,
        });
        assert_eq!(decode::<ClientMsg>(&encode(&hello)).unwrap(), hello);
    }

    #[test]
    fn a_task_frame_is_its_three_parts_end_to_end() {
        for round in [3, 300, 70_000] {
            let t = Task { round, ..task() };
            let (head, model, tail) = encode_task_parts(&t);
            assert_eq!([head, model, tail].concat(), encode(&ServerMsg::Task(t)));
        }
    }

    #[test]
    fn tensors_are_raw_little_endian() {
        let arch_params = 4 * task().model.arch.num_params();
        let frame = encode(&ServerMsg::Task(task()));
        // The parameter bytes appear verbatim in the frame.
        let needle = 0.5f32.to_le_bytes().repeat(8);
        assert!(frame.windows(needle.len()).any(|w| w == needle));
        assert!(
            frame.len() < arch_params + 200,
            "frame {} for {} payload bytes",
            frame.len(),
            arch_params
        );
    }

    #[test]
    fn malformed_frames_are_typed_errors() {
        let frame = encode(&ServerMsg::Task(task()));
        assert_eq!(decode::<ServerMsg>(b"CN"), Err(ProtocolError::NotCanopy));
        assert_eq!(
            decode::<ServerMsg>(b"GET / HTTP/1.1"),
            Err(ProtocolError::NotCanopy)
        );
        let mut old = frame.clone();
        old[2] = 0;
        assert_eq!(
            decode::<ServerMsg>(&old),
            Err(ProtocolError::Version { got: 0 })
        );
        // Every truncation is an error, never a panic.
        for cut in 3..frame.len() {
            assert!(decode::<ServerMsg>(&frame[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = frame.clone();
        extra.push(0);
        assert!(matches!(
            decode::<ServerMsg>(&extra),
            Err(ProtocolError::Malformed(_))
        ));
        let mut garbage = frame.clone();
        garbage[3] = 200;
        assert!(decode::<ServerMsg>(&garbage).is_err());
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert_eq!(
            decode::<ServerMsg>(&big),
            Err(ProtocolError::TooLarge(MAX_FRAME_BYTES + 1))
        );
    }

    #[test]
    fn class_names_are_checked() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_class_names(&names(&["rock", "paper", "scissors"])).is_ok());
        assert!(check_class_names(&names(&["one"])).is_err());
        assert!(check_class_names(&[]).is_err());
        assert!(check_class_names(&names(&["a", "a"])).is_err());
        assert!(check_class_names(&names(&["a", " "])).is_err());
        assert!(check_class_names(&names(&["a", "b\n"])).is_err());
        assert!(check_class_names(&names(&["a", &"x".repeat(MAX_CLASS_NAME + 1)])).is_err());
        let many: Vec<String> = (0..=MAX_TAB_CLASSES).map(|i| format!("c{i}")).collect();
        assert!(check_class_names(&many).is_err());
        assert!(check_class_names(&many[..MAX_TAB_CLASSES]).is_ok());
    }

    #[test]
    fn example_counts_are_checked_and_bounded() {
        assert_eq!(check_example_counts(3, &[1, 2, 3], &[0, 1, 0]), Ok(6));
        assert_eq!(check_example_counts(2, &[0, 0], &[0, 0]), Ok(0));
        // Wrong length, a run with dealt data, a huge (hostile) count.
        assert!(check_example_counts(3, &[1, 2], &[0, 0]).is_err());
        assert!(check_example_counts(2, &[1, 2], &[0, 0, 0]).is_err());
        assert!(check_example_counts(0, &[], &[]).is_err());
        assert!(check_example_counts(2, &[u32::MAX, 1], &[0, 0]).is_err());
        assert!(check_example_counts(2, &[1, 1], &[0, MAX_EXAMPLES_PER_CLASS + 1]).is_err());
        assert_eq!(
            check_example_counts(2, &[MAX_EXAMPLES_PER_CLASS; 2], &[0, 0]),
            Ok(2 * MAX_EXAMPLES_PER_CLASS as u64)
        );
        // The message survives the wire.
        let m = ClientMsg::Examples {
            train: vec![3, 4],
            test: vec![1, 0],
        };
        assert_eq!(decode::<ClientMsg>(&encode(&m)).unwrap(), m);
    }

    #[test]
    fn exchange_replies_are_told_apart_by_their_header() {
        let reply = ServerMsg::Exchange {
            round: 3,
            seq: 7,
            payload: Blob(vec![1, 2]),
        };
        let failed = ServerMsg::ExchangeFailed {
            round: 3,
            seq: 7,
            code: ErrorCode::Rejected,
            message: "no".into(),
        };
        assert!(is_exchange_reply(&encode(&reply)) && is_exchange_reply(&encode(&failed)));
        for other in [
            ServerMsg::Task(task()),
            ServerMsg::Wait {
                round: 1,
                reason: "x".into(),
            },
            ServerMsg::Bye { reason: "x".into() },
        ] {
            assert!(!is_exchange_reply(&encode(&other)), "{other:?}");
        }
        assert!(!is_exchange_reply(b"CN"));
    }
}
