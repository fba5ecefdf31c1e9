//! `canopy bench`: speed figures for the native side, printed as a table.
//! Each row compares against a baseline measured in the same run.

use std::time::Instant;

use burn::tensor::Device;
use canopy_core::aggregate::weighted_mean;
use canopy_core::data::Dataset;
use canopy_core::model::arch::Arch;
use canopy_core::model::conv::{ConvPath, set_path};
use canopy_core::model::state::ModelState;
use canopy_core::protocol::{ServerMsg, decode, encode};
use canopy_core::strategy::{Fold, RunningSum, StrategyConfig, train_task};
use canopy_core::train::{Host, Optimizer, Progress, TrainSpec, train_local};

struct Clock(Instant);

impl Host for Clock {
    fn now_ms(&self) -> f64 {
        self.0.elapsed().as_secs_f64() * 1000.0
    }
    async fn progress(&mut self, _p: &Progress) {}
}

/// Samples/s training `model` with every hidden layer cut to `keep` of its units (structured
/// pruning's surgery; 1.0: the full model).
fn train_rate(model: &str, data: &Dataset, batch: usize, keep: f32) -> f64 {
    let arch = Arch::preset(model, data.shape, data.classes).expect("preset");
    let state = canopy_core::model::surgery::shrink_to(&ModelState::init(arch, 1), keep);
    let arch = state.arch.clone();
    let spec = TrainSpec {
        epochs: 1,
        batch_size: batch,
        lr: 0.05,
        optimizer: Optimizer::Sgd { momentum: 0.0 },
        seed: 1,
        patience: 0,
        step: Default::default(),
    };
    let mut clock = Clock(Instant::now());
    let t = pollster::block_on(train_local(
        &arch,
        &state.params,
        None,
        data,
        &spec,
        &Device::flex(),
        &mut clock,
    ))
    .expect("training");
    t.samples_per_sec()
}

pub fn run(train: &Dataset) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let small = train.select(&(0..train.len().min(2000)).collect::<Vec<_>>());
    let mlp = train_rate("mlp", &small, 32, 1.0);
    rows.push((
        "native training, mlp, batch 32".into(),
        format!("{mlp:.0} samples/s (baseline)"),
    ));
    let mlp128 = train_rate("mlp", &small, 128, 1.0);
    rows.push((
        "native training, mlp, batch 128".into(),
        format!("{mlp128:.0} samples/s ({:.2}× batch 32)", mlp128 / mlp),
    ));
    let half = train_rate("mlp", &small, 32, 0.5);
    rows.push((
        "native training, mlp at half width".into(),
        format!("{half:.0} samples/s ({:.2}× full width)", half / mlp),
    ));
    // Convolutions: burn's conv2d (the default) against the im2col convolution
    // (core/src/model/conv.rs), alternately, in this run.
    let tiny = small.select(&(0..small.len().min(512)).collect::<Vec<_>>());
    for (model, name) in [
        ("cnn", "FedAvg cnn"),
        ("cnn-small", "cnn-small"),
        ("cnn-paper", "cnn-paper"),
    ] {
        let burn = train_rate(model, &tiny, 32, 1.0);
        set_path(ConvPath::Im2col);
        let im2col = train_rate(model, &tiny, 32, 1.0);
        set_path(ConvPath::Burn);
        rows.push((
            format!("native training, {name}, burn conv2d"),
            format!("{burn:.0} samples/s (baseline, {:.4}× mlp)", burn / mlp),
        ));
        rows.push((
            format!("native training, {name}, im2col conv"),
            format!("{im2col:.0} samples/s ({:.2}× burn conv2d)", im2col / burn),
        ));
    }
    let small_cnn = train_rate("cnn-small", &tiny, 32, 1.0);
    let small_half = train_rate("cnn-small", &tiny, 32, 0.5);
    rows.push((
        "native training, cnn-small at half width".into(),
        format!(
            "{small_half:.0} samples/s ({:.2}× full width)",
            small_half / small_cnn
        ),
    ));
    rows.extend(crate::lab::bench_split::rows(&small, &tiny));

    let arch = Arch::preset("mlp", train.shape, train.classes).expect("preset");
    let global = ModelState::init(arch.clone(), 1);
    let task = ServerMsg::Task(train_task(
        1,
        &global,
        &StrategyConfig::default(),
        1,
        canopy_core::protocol::UploadSpec::Weights,
    ));
    let reps = 50;
    let t0 = Instant::now();
    let mut frame = Vec::new();
    for _ in 0..reps {
        frame = encode(&task);
    }
    let enc = t0.elapsed().as_secs_f64() / reps as f64;
    let t0 = Instant::now();
    for _ in 0..reps {
        let _: ServerMsg = decode(&frame).expect("decode");
    }
    let dec = t0.elapsed().as_secs_f64() / reps as f64;
    let mb = frame.len() as f64 / 1e6;
    rows.push((
        "task frame, mlp".into(),
        format!(
            "{} bytes ({:.3}× raw f32 params)",
            frame.len(),
            frame.len() as f64 / (4 * arch.num_params()) as f64
        ),
    ));
    rows.push((
        "encode / decode".into(),
        format!("{:.0} / {:.0} MB/s", mb / enc, mb / dec),
    ));

    let updates: Vec<Vec<f32>> = (0..20)
        .map(|k| global.params.iter().map(|v| v + k as f32 * 1e-3).collect())
        .collect();
    let items: Vec<(&[f32], u64)> = updates.iter().map(|u| (u.as_slice(), 100)).collect();
    // Best of 5: a few milliseconds are easily disturbed by whatever else runs.
    let best = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let agg = best(&mut || {
        let _ = weighted_mean(&items);
    });
    rows.push((
        // Buffered (`aggregate::weighted_mean`, what echo, split and structured pruning use);
        // FedAvg itself aggregates through running sums, the next row.
        "weighted mean, 20 mlp updates, buffered".into(),
        format!(
            "{:.1} ms ({:.0} M params/s)",
            agg * 1000.0,
            20.0 * arch.num_params() as f64 / agg / 1e6
        ),
    ));
    // Streaming: the same updates folded one at a time into running sums, as the server does
    // when results arrive; it keeps the f64 sums instead of every update.
    let streamed = best(&mut || {
        let mut sum = RunningSum::new(arch.num_params(), Fold::default());
        for u in &updates {
            sum.add(u, 100).expect("same length");
        }
        let _ = sum.mean().expect("a mean");
    });
    let n = arch.num_params() as f64;
    rows.extend(fold_rows(&global, &task));
    rows.push((
        "  the same, streamed (running sums, FedAvg's path)".into(),
        format!(
            "{:.1} ms ({:.2}× buffered); keeps {:.1} MB of sums, not {:.1} MB of updates",
            streamed * 1000.0,
            streamed / agg,
            8.0 * n / 1e6,
            20.0 * 4.0 * n / 1e6
        ),
    ));
    rows
}

/// What the round loop does with each result of a streamed round (decode, check, bound, fold;
/// `strategy::accept` and `StreamRound::add`), per result, against copying the result's bytes
/// once in the same run: the floor any fold pays. 1,000 results a measurement, as a round of
/// 1,000 clients would bring; the default defence sized for 10,000 (its trim keeps 3 a side).
fn fold_rows(global: &ModelState, task: &ServerMsg) -> Vec<(String, String)> {
    use canopy_core::aggregate::robust::RobustConfig;
    use canopy_core::aggregate::stream::{Prior, StreamRound};
    use canopy_core::bytes::Blob;
    use canopy_core::protocol::{ClientMetrics, TaskResult, Update};
    use std::sync::Arc;
    let ServerMsg::Task(task) = task else {
        return Vec::new();
    };
    let results = 1000;
    // Two clients' worth of distinct updates, reused: the values matter, not their number.
    let blobs: Vec<Blob> = (0..2)
        .map(|k| {
            let v: Vec<f32> = global
                .params
                .iter()
                .enumerate()
                .map(|(i, g)| g + ((i * 7 + k * 13) % 17) as f32 * 1e-4 - 8e-4)
                .collect();
            Blob::from_f32(&v)
        })
        .collect();
    let result = |i: usize| TaskResult {
        round: task.round,
        samples: 100 + (i % 3) as u64,
        update: Update::Weights(blobs[i % 2].clone()),
        metrics: ClientMetrics::default(),
        mask_version: None,
    };
    let reference = Arc::new(global.params.clone());
    let time = |f: &mut dyn FnMut()| {
        (0..3)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
            / results as f64
    };
    let copy = time(&mut || {
        for i in 0..results {
            let r = result(i);
            std::hint::black_box(&r);
        }
    });
    let fold = |robust: RobustConfig| {
        time(&mut || {
            let mut round = StreamRound::start(
                &robust,
                Some(Fold::default()),
                reference.clone(),
                10_000,
                &Prior {
                    median_norm: Some(1.0),
                    centre: None,
                },
            )
            .expect("streams");
            for i in 0..results {
                let c = canopy_core::strategy::accept(i as u64, task, result(i), 1000)
                    .expect("a valid result");
                round.add(c).expect("folds");
            }
            std::hint::black_box(&round);
        })
    };
    let plain = fold(RobustConfig::plain());
    let default = fold(RobustConfig::default());
    let us = |s: f64| s * 1e6;
    vec![
        (
            "one mlp result: its bytes copied (baseline)".into(),
            format!("{:.0} µs", us(copy)),
        ),
        (
            "  decoded, checked, folded: plain mean".into(),
            format!(
                "{:.0} µs ({:.2}× the copy; {:.1} s for 10,000 results)",
                us(plain),
                plain / copy,
                plain * 1e4
            ),
        ),
        (
            "  the same, default defence (bound + drop-farthest)".into(),
            format!(
                "{:.0} µs ({:.2}× the copy, {:.2}× plain; {:.1} s for 10,000 results)",
                us(default),
                default / copy,
                default / plain,
                default * 1e4
            ),
        ),
    ]
}
