//! The server's path for untrusted client frames as one function, shared by the property test in
//! the normal suite (`core/tests/frames.rs`) and the cargo-fuzz target (`fuzz/`): decode the
//! frame; if it is a result, accept it against a real pending task (every upload kind, supermask
//! votes included) and feed what is accepted through the robust aggregation layer; if it is an
//! in-round exchange, decode its payload both as a request (what the server reads) and as a reply
//! (what the client reads). Nothing here may panic, whatever the bytes.

use crate::aggregate::robust::{Clip, RobustConfig, Rule, apply};
use crate::codec::exchange::{
    Dropout, cross_entropy_grad, decode_reply, decode_request, encode_reply, encode_request,
};
use crate::codec::model::encode_supermask;
use crate::codec::sparse::encode_sparse;
use crate::codec::supermask;
use crate::model::arch::{Arch, Layer};
use crate::model::state::ModelState;
use crate::protocol::{
    Backend, Bits, Blob, ClientMetrics, ClientMsg, DeviceInfo, Hello, MaskSpec, ModelPayload,
    PROTOCOL_VERSION, Params, ProtocolError, SupermaskKind, Task, TaskResult, Update, UploadSpec,
    decode, encode,
};
use crate::strategy::{Contribution, UploadKind, accept};
use crate::train::{Eval, Optimizer, Progress, TrainSpec};

/// A pending task as the server holds it, with the model it was cut from.
pub struct Target {
    pub task: Task,
    pub global: ModelState,
    pub shard_samples: u64,
}

/// What [`feed`] made of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Tally {
    /// Got past the frame header (magic and protocol version) to postcard.
    pub framed: usize,
    pub decoded: usize,
    pub results: usize,
    pub accepted: usize,
    /// Accepted as supermask votes.
    pub votes: usize,
    pub aggregated: usize,
    /// Exchange messages.
    pub exchanges: usize,
    /// Exchange payloads that decoded as a request (and whose reply was decoded back).
    pub requests: usize,
    /// Exchange payloads that decoded as a reply.
    pub replies: usize,
}

impl Tally {
    pub fn add(&mut self, t: &Tally) {
        self.framed += t.framed;
        self.decoded += t.decoded;
        self.results += t.results;
        self.accepted += t.accepted;
        self.votes += t.votes;
        self.aggregated += t.aggregated;
        self.exchanges += t.exchanges;
        self.requests += t.requests;
        self.replies += t.replies;
    }
}

/// Classes of the tiny model, which exchange labels must stay below.
const CLASSES: usize = 3;
/// The shape of the exchange seed's batch: rows × classes logits.
const EXCHANGE_ROWS: usize = 2;
/// The dropout of the exchange seed that has one.
const SEED_DROPOUT: Dropout = Dropout { seed: 5, keep: 0.5 };

fn tiny_arch() -> Arch {
    Arch {
        input: [1, 2, 2],
        classes: CLASSES,
        layers: vec![
            Layer::Flatten,
            Layer::Dense {
                inputs: 4,
                units: 3,
            },
            Layer::Relu,
            Layer::Dense {
                inputs: 3,
                units: 3,
            },
        ],
    }
}

/// Tasks on a tiny model (27 parameters) for weights, delta, sparse f32, sparse int8 top-k under
/// a mask, and supermask votes (sign, and keep under a mask).
pub fn targets() -> Vec<Target> {
    let global = ModelState::init(tiny_arch(), 3);
    let n = global.params.len();
    let mut masked = global.clone();
    masked.set_mask((0..n).map(|i| i % 4 != 1).collect());
    let values = |g: &ModelState| ModelPayload {
        arch: g.arch.clone(),
        params: Params::Values(Blob::from_f32(&g.params)),
        mask: g.mask.as_ref().map(|m| MaskSpec::Full {
            version: g.mask_version,
            bits: Bits::pack(m),
        }),
    };
    let task = |g: &ModelState, upload: UploadSpec| task_of(values(g), upload);
    let supermask_target = |g: &ModelState, kind: SupermaskKind| Target {
        task: task_of(encode_supermask(g, 3, kind), UploadSpec::Supermask { kind }),
        global: g.clone(),
        shard_samples: 50,
    };
    vec![
        Target {
            task: task(&global, UploadSpec::Weights),
            global: global.clone(),
            shard_samples: 50,
        },
        Target {
            task: task(&global, UploadSpec::Delta),
            global: global.clone(),
            shard_samples: 50,
        },
        // DP-FedAvg's client-side clip: wide enough for the seed frame; mutated ones may not be.
        Target {
            task: task(&global, UploadSpec::ClippedDelta { norm: 1e3 }),
            global: global.clone(),
            shard_samples: 50,
        },
        Target {
            task: task(
                &global,
                UploadSpec::Sparse {
                    int8: false,
                    top_k: 1.0,
                    error_feedback: false,
                },
            ),
            global: global.clone(),
            shard_samples: 50,
        },
        Target {
            task: task(
                &masked,
                UploadSpec::Sparse {
                    int8: true,
                    top_k: 0.3,
                    error_feedback: true,
                },
            ),
            global: masked.clone(),
            shard_samples: 50,
        },
        supermask_target(&global, SupermaskKind::Sign),
        supermask_target(&masked, SupermaskKind::Keep),
    ]
}

fn task_of(model: ModelPayload, upload: UploadSpec) -> Task {
    Task {
        round: 7,
        model: std::sync::Arc::new(model),
        train: TrainSpec {
            epochs: 1,
            batch_size: 8,
            lr: 0.1,
            optimizer: Optimizer::Sgd { momentum: 0.0 },
            seed: 1,
            patience: 0,
            step: Default::default(),
        },
        upload,
        deadline_ms: 1000,
    }
}

/// Real frames a client sends, one per message kind and upload kind: what mutations start from.
pub fn seed_frames(targets: &[Target]) -> Vec<Vec<u8>> {
    let metrics = ClientMetrics {
        exchange_seconds: 0.0,
        train_loss: 0.5,
        local_test: Eval {
            loss: 0.4,
            accuracy: 0.9,
            samples: 5,
        },
        epochs: 1,
        steps: 3,
        train_seconds: 0.1,
        samples_per_sec: 500.0,
        pruned_nonzero: 0,
    };
    let mut frames = vec![
        encode(&ClientMsg::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            name: "tab".into(),
            device: DeviceInfo::new(Backend::WebGpu, "swiftshader", "Mozilla/5.0"),
            resume: Some(3),
            mask_version: Some(1),
        })),
        encode(&ClientMsg::Progress {
            round: 7,
            progress: Progress {
                epoch: 1,
                epochs: 2,
                step: 3,
                steps: 9,
                loss: 0.7,
                samples_per_sec: 120.0,
            },
        }),
        encode(&ClientMsg::Error {
            round: Some(7),
            message: "out of memory".into(),
        }),
        encode(&ClientMsg::Exchange {
            round: 7,
            seq: 1,
            payload: Blob(vec![1, 2, 3, 4]),
        }),
        encode(&ClientMsg::Bye),
        encode(&ClientMsg::Examples {
            train: vec![12, 0, 7],
            test: vec![3, 0, 1],
        }),
    ];
    // Exchange payloads as they really travel: a request with and without dropout, and replies
    // (exact and quantized). Replies come from the server, but their bytes are fuzzed the same way.
    let logits = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0];
    for dropout in [None, Some(SEED_DROPOUT)] {
        let (request, _) = encode_request(&logits, EXCHANGE_ROWS, CLASSES, &[2, 0], dropout);
        let batch = decode_request(&request, CLASSES).expect("an honest request");
        let (loss, grad) = cross_entropy_grad(&batch);
        let replies = [32, 4].map(|bits| encode_reply(loss, &grad, &batch, bits, 1));
        for payload in std::iter::once(request).chain(replies) {
            frames.push(encode(&ClientMsg::Exchange {
                round: 7,
                seq: 2,
                payload: Blob(payload),
            }));
        }
    }
    for t in targets {
        let n = t.global.params.len();
        let mask = t.global.mask.as_deref();
        let delta: Vec<f32> = (0..n)
            .map(|i| {
                if mask.is_none_or(|m| m[i]) {
                    (i as f32 * 0.7).sin() * 0.05
                } else {
                    0.0
                }
            })
            .collect();
        let update = match t.task.upload {
            UploadSpec::Weights => Update::Weights(Blob::from_f32(
                &t.global
                    .params
                    .iter()
                    .zip(&delta)
                    .map(|(g, d)| g + d)
                    .collect::<Vec<_>>(),
            )),
            UploadSpec::Delta | UploadSpec::ClippedDelta { .. } => {
                Update::Delta(Blob::from_f32(&delta))
            }
            UploadSpec::Sparse { int8, top_k, .. } => Update::Sparse(encode_sparse(
                &t.task.model.arch,
                &delta,
                mask,
                int8,
                top_k,
                None,
            )),
            UploadSpec::Supermask { .. } | UploadSpec::ScoreSteps { .. } => {
                let Params::Supermask { bits, .. } = &t.task.model.params else {
                    unreachable!("a supermask target carries its bits")
                };
                let base = bits.unpack().expect("the target's own bits");
                // A client that flipped every third bit of the task's.
                let mine: Vec<bool> = base
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ (i % 3 == 0))
                    .collect();
                Update::Supermask(supermask::encode(&t.task.model.arch, mask, &base, &mine))
            }
        };
        frames.push(encode(&ClientMsg::Result(TaskResult {
            round: 7,
            samples: 40,
            update,
            metrics: metrics.clone(),
            mask_version: Some(t.global.mask_version),
        })));
    }
    frames
}

/// The frame through decode → accept (against every target) → the robust layer (with an honest
/// result beside it, under each rule). Returns what happened; panics only on a bug.
pub fn feed(frame: &[u8], targets: &[Target]) -> Tally {
    let mut tally = Tally::default();
    let msg = match decode::<ClientMsg>(frame) {
        Ok(msg) => msg,
        Err(ProtocolError::Malformed(_)) => {
            tally.framed = 1;
            return tally;
        }
        Err(_) => return tally,
    };
    tally.framed = 1;
    tally.decoded = 1;
    let result = match msg {
        ClientMsg::Result(result) => result,
        ClientMsg::Exchange { payload, .. } => {
            feed_exchange(&payload.0, &mut tally);
            return tally;
        }
        // A tab's example counts: checked against a run of three classes, never trusted.
        ClientMsg::Examples { train, test } => {
            let _ = crate::protocol::check_example_counts(3, &train, &test);
            return tally;
        }
        _ => return tally,
    };
    tally.results = 1;
    for t in targets {
        let Ok(c) = accept(9, &t.task, result.clone(), t.shard_samples) else {
            continue;
        };
        tally.accepted += 1;
        tally.votes += (c.kind == UploadKind::Votes) as usize;
        let reference = t.global.masked_params();
        let honest = Contribution {
            client: 1,
            samples: 10,
            kind: c.kind,
            values: if c.kind == UploadKind::Weights {
                reference.clone()
            } else {
                vec![0.0; reference.len()]
            },
            metrics: ClientMetrics::default(),
            encoding: Default::default(),
        };
        for (rule, clip) in [
            (Rule::Mean, Clip::None),
            (Rule::Mean, Clip::Median),
            (Rule::Median, Clip::None),
            (Rule::TrimmedMean, Clip::None),
            (Rule::MultiKrum, Clip::Median),
        ] {
            let config = RobustConfig {
                rule,
                clip,
                ..RobustConfig::default()
            };
            if let Ok((out, _)) = apply(
                &config,
                &reference,
                None,
                vec![honest.clone(), c.clone(), honest.clone()],
            ) {
                assert!(
                    out.iter().all(|o| o.values.len() == reference.len()
                        && o.values.iter().all(|v| v.is_finite())),
                    "the robust layer let a bad vector through"
                );
                tally.aggregated += 1;
            }
        }
    }
    tally
}

/// An exchange payload as the server reads a request (then answers it, and the answer must decode
/// back to a gradient of the request's size) and as the client reads a reply.
fn feed_exchange(payload: &[u8], tally: &mut Tally) {
    tally.exchanges = 1;
    if let Ok(batch) = decode_request(payload, CLASSES) {
        assert_eq!(batch.values.len(), batch.rows * batch.cols, "{batch:?}");
        assert!(batch.labels.iter().all(|l| (*l as usize) < CLASSES));
        // The server's own loss needs one logit per class.
        if batch.cols == CLASSES {
            let (loss, grad) = cross_entropy_grad(&batch);
            let kept = batch.kept.as_ref().map(|(k, _)| k.as_slice());
            for bits in [32, 4] {
                let reply = encode_reply(loss, &grad, &batch, bits, 1);
                let (_, back) = decode_reply(&reply, batch.values.len(), kept)
                    .expect("the server's reply to a request it accepted decodes");
                assert_eq!(back.len(), batch.values.len());
            }
        }
        tally.requests = 1;
    }
    // As the client reads the replies to the seed's requests: all values, or those its dropout kept.
    let n = EXCHANGE_ROWS * CLASSES;
    let dropped = SEED_DROPOUT.mask(n);
    for kept in [None, Some(dropped.as_slice())] {
        if let Ok((loss, grad)) = decode_reply(payload, n, kept) {
            assert!(loss.is_finite() && grad.len() == n && grad.iter().all(|g| g.is_finite()));
            tally.replies = 1;
        }
    }
}
