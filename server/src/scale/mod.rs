//! Beyond one server: edge aggregators federated through NATS JetStream.
//!
//! An **edge** is an ordinary Canopy server for its own tabs; a **root** runs the strategy. The
//! root announces each round on `canopy.<run>.round.<r>` (the tasks of the clients it sampled,
//! from the idle clients every edge reports on `canopy.<run>.presence.<edge>`); each edge runs the
//! round on its tabs, folds their results into a running sum (streaming aggregation) and
//! publishes one partial on `canopy.<run>.partial.<r>.<edge>`. Only the root divides. Payloads
//! over [`INLINE_MAX`] (models, a partial's sums) travel through the JetStream Object Store with
//! their SHA-256. Both sides are the same binary: `canopy serve --role root|edge --nats URL`.
//!
//! `wire` holds the messages, `root` the root's side of the round loop, `edge` the edge's loop.

pub mod edge;
pub mod root;
pub mod wire;

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, object_store::ObjectStore};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use wire::BlobRef;

/// What this server is in a run.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// One server does everything (the demo).
    #[default]
    Single,
    /// Runs the strategy and combines the edges' partials; serves the dashboard, no tabs.
    Root,
    /// Serves its own tabs and runs the root's rounds on them.
    Edge,
}

/// `[scale]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ScaleConfig {
    pub role: Role,
    /// The NATS server (with JetStream: `nats-server -js`) shared by the run's root and edges.
    pub nats: String,
    /// This edge's name, unique among the run's edges (default: host and port).
    pub edge: Option<String>,
    /// This edge's share of the data shards `[I, N]`: shards I, I+N, I+2N...
    pub edge_shards: Option<[usize; 2]>,
    /// An edge that has not reported for this long is taken as gone: the root stops waiting for
    /// its partial (its clients count as dropped) and samples none of its clients.
    pub edge_timeout_ms: u64,
    /// How long the root waits past a round's deadline for partials still coming.
    pub grace_ms: u64,
    /// A file holding this server's NKey seed (`SU…`, from `nsc` or `nk -gen user`): it
    /// authenticates to NATS with it (the server's `authorization { users = [{ nkey: … }] }`)
    /// and, on an edge, signs every partial with it.
    pub nkey_file: Option<std::path::PathBuf>,
    /// A NATS credentials file (user JWT and NKey seed; decentralised auth), instead of
    /// `nkey_file` for connecting. Partials are signed only with `nkey_file`.
    pub creds_file: Option<std::path::PathBuf>,
    /// The CA certificate (PEM) that signed the NATS server's certificate: the connection must
    /// then use TLS and the server must prove itself with that CA.
    pub tls_ca: Option<std::path::PathBuf>,
    /// A client certificate and key (PEM) for NATS servers that verify clients (`verify: true`).
    pub tls_cert: Option<std::path::PathBuf>,
    /// The key of `tls_cert` (PEM).
    pub tls_key: Option<std::path::PathBuf>,
    /// On a root: each edge's name and the public NKey (`U…`) its partials must be signed with.
    /// Empty: partials are not checked for who sent them (the root says so at start-up).
    pub edge_keys: std::collections::BTreeMap<String, String>,
    /// Set only by the hidden `--lab-poison-partial F` of `canopy attack --edges`, never from a
    /// file: the edge scales its partial's update by F, as a compromised edge would.
    #[serde(skip)]
    pub lab_poison_partial: Option<f64>,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            role: Role::Single,
            nats: "nats://127.0.0.1:4222".into(),
            edge: None,
            edge_shards: None,
            edge_timeout_ms: 3_000,
            grace_ms: 5_000,
            nkey_file: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            edge_keys: Default::default(),
            lab_poison_partial: None,
        }
    }
}

impl ScaleConfig {
    /// Checks the section against the run it belongs to: its name (root and edges find each other
    /// by it) and its aggregation rule (only streaming rules run across edges).
    pub fn validate(
        &self,
        run_name: Option<&str>,
        aggregation: &canopy_core::aggregate::robust::RobustConfig,
    ) -> Result<(), String> {
        if self.role == Role::Single {
            return Ok(());
        }
        let Some(name) = run_name else {
            return Err("a root and its edges find each other by the run's name: set run.name (or --name) on every one".into());
        };
        if token(name).is_empty() {
            return Err(format!(
                "run name '{name}' has no letters or digits to name NATS subjects by"
            ));
        }
        if let Some([i, n]) = self.edge_shards
            && (n == 0 || i >= n)
        {
            return Err(format!("edge_shards {i}/{n}: need 0 ≤ I < N"));
        }
        if self.nkey_file.is_some() && self.creds_file.is_some() {
            return Err("[scale] nkey_file and creds_file: choose one way to authenticate".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("[scale] tls_cert and tls_key go together".into());
        }
        for (edge, key) in &self.edge_keys {
            let ok = nkeys::KeyPair::from_public_key(key)
                .is_ok_and(|k| k.key_pair_type() == nkeys::KeyPairType::User);
            if !ok {
                return Err(format!(
                    "[scale] edge_keys.{edge}: '{key}' is not a public user NKey (U…)"
                ));
            }
        }
        if self.role == Role::Root && !canopy_core::aggregate::robust::streams(aggregation) {
            return Err(format!(
                "[aggregation] rule {:?} with clip {:?} needs every update in one place; across edges only rules that stream work (rule = \"mean\", \"trimmed_mean\" or \"drop_farthest\", streaming = true)",
                aggregation.rule, aggregation.clip
            ));
        }
        Ok(())
    }
}

/// `I/N` → `[I, N]`.
pub fn parse_slice(s: &str) -> Result<[usize; 2], String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("edge shards '{s}': expected I/N, e.g. 0/3"))?;
    let (i, n) = (
        i.trim().parse().map_err(|_| format!("bad I in '{s}'"))?,
        n.trim().parse().map_err(|_| format!("bad N in '{s}'"))?,
    );
    Ok([i, n])
}

/// A name made safe for NATS subjects, stream and bucket names: letters, digits, `-` and `_`.
pub fn token(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_matches('_')
        .to_string()
}

/// FNV-1a, 64 bits: model versions and shape hashes (not a security measure; partials are
/// also checked by size, and their payloads by SHA-256).
pub fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The version of a global model: a hash of its (masked) parameters and mask. An edge's partial
/// counts only if it trained from exactly this model.
pub fn model_version(m: &canopy_core::model::state::ModelState) -> u64 {
    let mut bytes: Vec<u8> = m
        .masked_params()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    if let Some(mask) = &m.mask {
        bytes.extend(mask.iter().map(|k| *k as u8));
    }
    fnv64(&bytes)
}

/// A hash of the model's shape (its layers), so a partial of another shape is never merged.
pub fn shape_hash(arch: &canopy_core::model::arch::Arch) -> u64 {
    fnv64(format!("{:?}", arch.params()).as_bytes())
}

/// Client ids across edges: the edge's hash in the high 32 bits, its own id in the low.
pub fn edge_prefix(edge: &str) -> u64 {
    (fnv64(edge.as_bytes()) & 0xffff_ffff) << 32
}

pub fn global_id(prefix: u64, local: u64) -> u64 {
    prefix | (local & 0xffff_ffff)
}

/// The edge's own id of a run-wide one, if the client is on the edge with this prefix.
pub fn local_id(prefix: u64, global: u64) -> Option<u64> {
    (global & !0xffff_ffff == prefix).then_some(global & 0xffff_ffff)
}

/// Payloads up to this size travel inside the message; larger ones through the Object Store
/// (NATS's default message limit is 1 MiB).
pub const INLINE_MAX: usize = 256 * 1024;

/// This server's NKey from `[scale] nkey_file`, if it has one.
pub fn load_nkey(config: &ScaleConfig) -> Result<Option<std::sync::Arc<nkeys::KeyPair>>, String> {
    let Some(path) = &config.nkey_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("[scale] nkey_file {}: {e}", path.display()))?;
    // The seed alone, or an `nk`/`nsc` file with the seed on a line of its own.
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with('S') && l.len() > 50)
        .ok_or_else(|| {
            format!(
                "[scale] nkey_file {}: no NKey seed (S…) in it",
                path.display()
            )
        })?;
    let key = nkeys::KeyPair::from_seed(seed)
        .map_err(|e| format!("[scale] nkey_file {}: {e}", path.display()))?;
    Ok(Some(std::sync::Arc::new(key)))
}

/// How to reach the run's NATS server: TLS and credentials from `[scale]`.
async fn options(
    config: &ScaleConfig,
    key: Option<&nkeys::KeyPair>,
) -> Result<async_nats::ConnectOptions, String> {
    let mut o = async_nats::ConnectOptions::new();
    if let Some(key) = key {
        o = o.nkey(key.seed().map_err(|e| e.to_string())?);
    }
    if let Some(path) = &config.creds_file {
        o = o
            .credentials_file(path)
            .await
            .map_err(|e| format!("[scale] creds_file {}: {e}", path.display()))?;
    }
    if let Some(ca) = &config.tls_ca {
        o = o.require_tls(true).add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        o = o
            .require_tls(true)
            .add_client_certificate(cert.clone(), key.clone());
    }
    Ok(o)
}

/// A connection to the run's NATS server: its JetStream stream and object bucket.
#[derive(Clone)]
pub struct Link {
    /// This server's NKey (`[scale] nkey_file`): an edge signs its partials with it.
    pub key: Option<std::sync::Arc<nkeys::KeyPair>>,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub stream: jetstream::stream::Stream,
    pub store: ObjectStore,
    /// The run's name as a subject token.
    pub run: String,
    /// `[scale] lab_poison_partial` (attack experiments only): an edge scales its partials'
    /// updates by this factor.
    pub poison: Option<f64>,
}

impl Link {
    /// Connects (retrying for `patience`), then creates or opens the run's stream and bucket.
    /// After that the client reconnects by itself whenever NATS goes away.
    pub async fn connect(
        config: &ScaleConfig,
        run: &str,
        who: &str,
        patience: Duration,
    ) -> Result<Link, String> {
        let url = config.nats.as_str();
        let key = load_nkey(config)?;
        let until = tokio::time::Instant::now() + patience;
        let client = loop {
            let options = options(config, key.as_deref())
                .await?
                .name(who)
                .connection_timeout(Duration::from_secs(3))
                .event_callback(|e| async move { tracing::info!("nats: {e}") });
            match options.connect(url).await {
                Ok(c) => break c,
                Err(e)
                    if matches!(
                        e.kind(),
                        async_nats::ConnectErrorKind::AuthorizationViolation
                            | async_nats::ConnectErrorKind::Tls
                    ) =>
                {
                    return Err(format!(
                        "NATS at {url} refused this server: {e} (check [scale] nkey_file / creds_file and tls_ca)"
                    ));
                }
                Err(e) if tokio::time::Instant::now() < until => {
                    tracing::warn!("cannot reach NATS at {url} yet ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    return Err(format!(
                        "cannot reach NATS at {url}: {e} (is `nats-server -js` running? `just setup` installs it)"
                    ));
                }
            }
        };
        let js = jetstream::new(client.clone());
        let run = token(run);
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: format!("CANOPY_{run}"),
                subjects: vec![format!("canopy.{run}.round.*"), format!("canopy.{run}.partial.*.*")],
                // Long enough for a restarted root to find the partials of its round.
                max_age: Duration::from_secs(6 * 3600),
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("NATS at {url}: cannot open the run's JetStream stream: {e} (start nats-server with -js)"))?;
        let bucket = format!("canopy-{run}");
        let store = match js.get_object_store(&bucket).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(jetstream::object_store::Config {
                    bucket: bucket.clone(),
                    max_age: Duration::from_secs(6 * 3600),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("NATS at {url}: cannot create object bucket {bucket}: {e}"))?,
        };
        Ok(Link {
            key,
            client,
            js,
            stream,
            store,
            run,
            poison: config.lab_poison_partial,
        })
    }

    pub fn subject(&self, what: &str) -> String {
        format!("canopy.{}.{what}", self.run)
    }

    /// Stores `bytes` for a message: inline when small, else as object `name` with its SHA-256.
    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<BlobRef, String> {
        if bytes.len() <= INLINE_MAX {
            return Ok(BlobRef::Inline(bytes));
        }
        let sha256 = hex(&Sha256::digest(&bytes));
        let size = bytes.len() as u64;
        self.store
            .put(name, &mut bytes.as_slice())
            .await
            .map_err(|e| format!("object store: putting {name}: {e}"))?;
        Ok(BlobRef::Object {
            name: name.to_string(),
            size,
            sha256,
        })
    }

    /// The bytes behind a [`BlobRef`], checked against its size and SHA-256.
    pub async fn get(&self, blob: &BlobRef) -> Result<Vec<u8>, String> {
        match blob {
            BlobRef::Inline(b) => Ok(b.clone()),
            BlobRef::Object { name, size, sha256 } => {
                if *size > wire::OBJECT_MAX {
                    return Err(format!(
                        "object {name} claims {size} bytes, over the {} limit",
                        wire::OBJECT_MAX
                    ));
                }
                let mut object = self
                    .store
                    .get(name)
                    .await
                    .map_err(|e| format!("object store: getting {name}: {e}"))?;
                let mut out = Vec::with_capacity(*size as usize);
                (&mut object)
                    .take(*size + 1)
                    .read_to_end(&mut out)
                    .await
                    .map_err(|e| format!("object store: reading {name}: {e}"))?;
                if out.len() as u64 != *size {
                    return Err(format!(
                        "object {name}: {} bytes, expected {size}",
                        out.len()
                    ));
                }
                let got = hex(&Sha256::digest(&out));
                if &got != sha256 {
                    return Err(format!(
                        "object {name}: SHA-256 {got} differs from the announced {sha256}"
                    ));
                }
                Ok(out)
            }
        }
    }

    /// Publishes to the run's stream and waits for JetStream's acknowledgement; `msg_id`
    /// de-duplicates retries. Returns whether JetStream took it as a duplicate.
    pub async fn publish(
        &self,
        subject: String,
        msg_id: &str,
        payload: Vec<u8>,
    ) -> Result<bool, String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
            .map_err(|e| format!("publishing {subject}: {e}"))?;
        let ack = ack
            .await
            .map_err(|e| format!("publishing {subject}: no acknowledgement: {e}"))?;
        Ok(ack.duplicate)
    }

    /// [`Link::publish`] of an encoded message, through the Object Store (as `object`) when it is
    /// too large to travel inline.
    pub async fn publish_large(
        &self,
        subject: String,
        msg_id: &str,
        object: &str,
        bytes: Vec<u8>,
    ) -> Result<bool, String> {
        let envelope = match self.put(object, bytes).await? {
            BlobRef::Inline(b) => wire::Envelope::Inline(b),
            stored => wire::Envelope::Stored(stored),
        };
        self.publish(subject, msg_id, wire::encode(&envelope)).await
    }

    /// The message inside what [`Link::publish_large`] sent.
    pub async fn open(&self, payload: &[u8], what: &str) -> Result<Vec<u8>, String> {
        match wire::decode::<wire::Envelope>(payload, what)? {
            wire::Envelope::Inline(b) => Ok(b),
            wire::Envelope::Stored(blob) => self.get(&blob).await,
        }
    }

    /// Messages of the run's stream on `filter`, in order: from the first one kept (`from_start`)
    /// or from those published after this call. JetStream loses an ephemeral consumer when the
    /// NATS server restarts; the follower then opens a new one at the next sequence it has not
    /// seen, so nothing is skipped or seen twice.
    pub async fn follow(
        &self,
        filter: String,
        from_start: bool,
    ) -> Result<UnboundedReceiver<Followed>, String> {
        let mut next = if from_start {
            1
        } else {
            let mut stream = self.stream.clone();
            stream
                .info()
                .await
                .map_err(|e| format!("following {filter}: {e}"))?
                .state
                .last_sequence
                + 1
        };
        let (tx, rx) = unbounded_channel();
        let stream = self.stream.clone();
        tokio::spawn(async move {
            loop {
                let config = jetstream::consumer::pull::OrderedConfig {
                    filter_subject: filter.clone(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    },
                    ..Default::default()
                };
                let messages = match stream.create_consumer(config).await {
                    Ok(c) => c.messages().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match messages {
                    Ok(mut messages) => {
                        while let Some(m) = messages.next().await {
                            match m {
                                Ok(m) => {
                                    if let Ok(info) = m.info() {
                                        next = info.stream_sequence + 1;
                                    }
                                    if tx
                                        .send(Followed {
                                            subject: m.subject.to_string(),
                                            payload: m.payload.clone(),
                                        })
                                        .is_err()
                                    {
                                        return;
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!(
                                        "following {filter}: {e}; following again from message {next}"
                                    );
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!("following {filter}: {e}; trying again"),
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(rx)
    }
}

/// A message of the run's stream, as [`Link::follow`] hands it on.
pub struct Followed {
    pub subject: String,
    pub payload: bytes::Bytes,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
