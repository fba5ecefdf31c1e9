//! What root and edges say to each other over NATS (postcard-encoded).

use canopy_core::aggregate::robust::{RobustConfig, Verdict};
use canopy_core::protocol::UploadSpec;
use canopy_core::strategy::{Contribution, Fold};
use canopy_core::train::TrainSpec;
use serde::{Deserialize, Serialize};

/// The largest object either side fetches (a model or a partial's sums).
pub const OBJECT_MAX: u64 = 512 << 20;
/// The largest message either side decodes (announcements list every sampled client's task).
pub const MESSAGE_MAX: usize = 8 << 20;

/// Bytes carried in the message itself, or stored in the Object Store under `name`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BlobRef {
    Inline(Vec<u8>),
    Object {
        name: String,
        size: u64,
        sha256: String,
    },
}

impl BlobRef {
    pub fn size(&self) -> u64 {
        match self {
            BlobRef::Inline(b) => b.len() as u64,
            BlobRef::Object { size, .. } => *size,
        }
    }

    pub fn in_store(&self) -> bool {
        matches!(self, BlobRef::Object { .. })
    }
}

/// An edge's report, every half second on `canopy.<run>.presence.<edge>` (core NATS, not kept).
/// The root samples from the idle clients it lists, so it is signed like a partial: a forged
/// report would have the root announce tasks for clients that do not exist, or keep a dead edge
/// alive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub edge: String,
    /// Where its tabs join.
    pub url: String,
    pub connected: usize,
    /// Idle clients: (run-wide id, training samples).
    pub idle: Vec<(u64, u64)>,
    /// Grows with every report of this edge, across its restarts (milliseconds since the Unix
    /// epoch, or one more than the last): the root refuses one not newer than the last it took,
    /// so a recorded report replayed later changes nothing.
    pub seq: u64,
    /// As in [`Partial`]: the signing edge's public NKey and its signature, empty when unsigned.
    pub signer: String,
    pub signature: Vec<u8>,
}

/// One client's task in a round, without its model (the round's `models[model]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgeTask {
    pub client: u64,
    pub model: u32,
    pub train: TrainSpec,
    pub upload: UploadSpec,
    pub deadline_ms: u64,
}

/// The root's round, on `canopy.<run>.round.<r>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundMsg {
    pub round: u32,
    /// Different for every announcement of the round (a retry, a restarted root).
    pub attempt: u64,
    /// Version of the global model the round starts from ([`super::model_version`]).
    pub base: u64,
    pub shape: u64,
    pub mask_version: u64,
    /// The kind of round, for dashboards (`training`, `exploring`...).
    pub phase: String,
    /// Which running sums the round needs.
    pub fold: Fold,
    /// The root's robust layer, applied per result at the edges (rules that stream only).
    pub robust: RobustConfig,
    pub deadline_ms: u64,
    /// Encoded `ModelPayload`s (usually one, shared by every task).
    pub models: Vec<BlobRef>,
    pub tasks: Vec<EdgeTask>,
}

/// What travels on a round's or a partial's subject: the encoded message, or where in the
/// Object Store to find it. NATS limits a message to 1 MiB by default, and an announcement lists
/// every sampled client's task, a partial every result's summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Envelope {
    Inline(Vec<u8>),
    Stored(BlobRef),
}

/// An edge's part of a round, on `canopy.<run>.partial.<r>.<edge>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    pub round: u32,
    /// The announcement it answers (with the edge's name, the JetStream `Msg-Id`).
    pub attempt: u64,
    pub base: u64,
    pub shape: u64,
    pub mask_version: u64,
    pub edge: String,
    /// Σ nᵢ and the number of results (also inside the sums; here for logs and checks).
    pub weight: f64,
    pub clients: u64,
    /// Of `clients`, results that came after the previous round's deadline on this edge, folded
    /// in here (the edge's `late_results = "next_round"`); they answer no task of this round.
    pub late: u64,
    /// The encoded `RunningSum`: Σ nᵢ·xᵢ in f64 (and Σ xᵢ² when the round folds squares).
    pub sum: BlobRef,
    /// The results without vectors, and the robust layer's verdict on each.
    pub summaries: Vec<Contribution>,
    pub verdicts: Vec<Verdict>,
    pub sampled: usize,
    pub dropped: usize,
    pub rejected: usize,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The edge's own round time, from tasks out to partial ready.
    pub seconds: f64,
    /// The public NKey (`U…`) of the edge that signed it, and its ed25519 signature over the
    /// partial with this field empty ([`Signed::signed_bytes`]); both empty when unsigned.
    pub signer: String,
    pub signature: Vec<u8>,
}

/// A message an edge signs with its NKey (ed25519): its partials and its reports. What is signed
/// is the message with its signature field empty, so every other field is covered (a partial's
/// sums too: inline they are part of it, in the Object Store by their SHA-256, which the root
/// checks).
pub trait Signed: Serialize + Clone {
    /// The edge it claims to come from.
    fn edge(&self) -> &str;
    fn signer(&self) -> &str;
    fn signature(&self) -> &[u8];
    fn set_signature(&mut self, signer: String, signature: Vec<u8>);

    /// What the edge signs: the message without its signature.
    fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        let signer = self.signer().to_string();
        unsigned.set_signature(signer, Vec::new());
        encode(&unsigned)
    }

    /// Signs it with the edge's NKey.
    fn sign(&mut self, key: &nkeys::KeyPair) -> Result<(), String> {
        let signer = key.public_key();
        self.set_signature(signer.clone(), Vec::new());
        let signature = key
            .sign(&self.signed_bytes())
            .map_err(|e| format!("signing: {e}"))?;
        self.set_signature(signer, signature);
        Ok(())
    }

    /// Whether a root with `keys` (`[scale] edge_keys`) takes it: anything when none are listed
    /// (authentication off, which the root says at start-up), else only what [`Signed::verify`]
    /// passes.
    fn admitted(&self, keys: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
        if keys.is_empty() {
            return Ok(());
        }
        self.verify(keys)
    }

    /// Checks it was signed by the key `keys` lists for its edge's name; why not, otherwise.
    fn verify(&self, keys: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
        let Some(expected) = keys.get(self.edge()) else {
            return Err(format!(
                "edge '{}' is not in [scale] edge_keys",
                self.edge()
            ));
        };
        if self.signature().is_empty() {
            return Err("unsigned".into());
        }
        if self.signer() != expected {
            return Err(format!(
                "signed by {}, not by edge '{}''s key",
                self.signer(),
                self.edge()
            ));
        }
        let key = nkeys::KeyPair::from_public_key(expected).map_err(|e| e.to_string())?;
        key.verify(&self.signed_bytes(), self.signature())
            .map_err(|_| "wrongly signed (the signature does not match its contents)".to_string())
    }
}

/// Implements [`Signed`] for a message with `edge`, `signer` and `signature` fields.
macro_rules! signed_by_edge {
    ($t:ty) => {
        impl Signed for $t {
            fn edge(&self) -> &str {
                &self.edge
            }
            fn signer(&self) -> &str {
                &self.signer
            }
            fn signature(&self) -> &[u8] {
                &self.signature
            }
            fn set_signature(&mut self, signer: String, signature: Vec<u8>) {
                self.signer = signer;
                self.signature = signature;
            }
        }
    };
}
signed_by_edge!(Partial);
signed_by_edge!(Presence);

impl Partial {
    pub fn msg_id(&self) -> String {
        format!("{}-{}-{}", self.edge, self.round, self.attempt)
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("plain data encodes")
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, String> {
    if bytes.len() > MESSAGE_MAX {
        return Err(format!(
            "{what} of {} bytes is over the {MESSAGE_MAX}-byte limit",
            bytes.len()
        ));
    }
    postcard::from_bytes(bytes).map_err(|e| format!("{what} does not decode: {e}"))
}
