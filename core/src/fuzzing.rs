//! The server's path for untrusted client frames as one function, shared by the property test in
//! the normal suite (`core/tests/frames.rs`) and the cargo-fuzz target (`fuzz/`): decode the
//! frame; if it is a result, accept it against a real pending task; feed what is accepted
//! through the robust aggregation layer. Nothing here may panic, whatever the bytes.

use crate::aggregate::robust::{Clip, RobustConfig, Rule, apply};
use crate::codec::sparse::encode_sparse;
use crate::model::arch::{Arch, Layer};
use crate::model::state::ModelState;
use crate::protocol::{
    Backend, Bits, Blob, ClientMetrics, ClientMsg, DeviceInfo, Hello, MaskSpec, ModelPayload,
    PROTOCOL_VERSION, Params, Task, TaskResult, Update, UploadSpec, decode, encode,
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
    pub decoded: usize,
    pub results: usize,
    pub accepted: usize,
    pub aggregated: usize,
}

fn tiny_arch() -> Arch {
    Arch {
        input: [1, 2, 2],
        classes: 3,
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

/// Tasks on a tiny model (27 parameters) for weights, delta, sparse f32, and sparse int8 top-k
/// under a mask. Supermask (vote) uploads are not covered yet.
pub fn targets() -> Vec<Target> {
    let global = ModelState::init(tiny_arch(), 3);
    let n = global.params.len();
    let mut masked = global.clone();
    masked.set_mask((0..n).map(|i| i % 4 != 1).collect());
    let task = |g: &ModelState, upload: UploadSpec| Task {
        round: 7,
        model: std::sync::Arc::new(ModelPayload {
            arch: g.arch.clone(),
            params: Params::Values(Blob::from_f32(&g.params)),
            mask: g.mask.as_ref().map(|m| MaskSpec::Full {
                version: g.mask_version,
                bits: Bits::pack(m),
            }),
        }),
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
            global: masked,
            shard_samples: 50,
        },
    ]
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
    ];
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
            UploadSpec::Delta => Update::Delta(Blob::from_f32(&delta)),
            UploadSpec::Sparse { int8, top_k, .. } => Update::Sparse(encode_sparse(
                &t.task.model.arch,
                &delta,
                mask,
                int8,
                top_k,
                None,
            )),
            UploadSpec::Supermask { .. } => continue,
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
    let Ok(msg) = decode::<ClientMsg>(frame) else {
        return tally;
    };
    tally.decoded = 1;
    let ClientMsg::Result(result) = msg else {
        return tally;
    };
    tally.results = 1;
    for t in targets {
        let Ok(c) = accept(9, &t.task, result.clone(), t.shard_samples) else {
            continue;
        };
        tally.accepted += 1;
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
