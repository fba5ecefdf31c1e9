//! Times local training of a preset on random data (for `perf record`).
//! `cargo run --release -p canopy-core --example step_profile -- cnn 20`
use std::time::Instant;

use burn::tensor::Device;
use canopy_core::data::Dataset;
use canopy_core::model::arch::Arch;
use canopy_core::model::conv::{ConvPath, set_path};
use canopy_core::model::state::ModelState;
use canopy_core::train::{Host, Optimizer, Progress, TrainSpec, train_local};

struct Clock(Instant);
impl Host for Clock {
    fn now_ms(&self) -> f64 {
        self.0.elapsed().as_secs_f64() * 1000.0
    }
    async fn progress(&mut self, _p: &Progress) {}
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).map(String::as_str).unwrap_or("cnn");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let batch = 32;
    let n = batch * steps;
    let data = Dataset {
        shape: [1, 28, 28],
        classes: 10,
        images: (0..n * 784).map(|i| (i * 7919 % 251) as u8).collect(),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
    };
    let arch = Arch::preset(model, [1, 28, 28], 10).unwrap();
    let state = ModelState::init(arch.clone(), 1);
    let spec = TrainSpec {
        epochs: 1,
        batch_size: batch,
        lr: 0.01,
        optimizer: Optimizer::Sgd { momentum: 0.0 },
        seed: 1,
        patience: 0,
        step: Default::default(),
    };
    let paths = match std::env::var("CONV").as_deref() {
        Ok("burn") => vec![ConvPath::Burn],
        Ok("im2col") => vec![ConvPath::Im2col],
        _ => vec![
            ConvPath::Burn,
            ConvPath::Im2col,
            ConvPath::Burn,
            ConvPath::Im2col,
        ],
    };
    for p in paths {
        set_path(p);
        let mut clock = Clock(Instant::now());
        let t = pollster::block_on(train_local(
            &arch,
            &state.params,
            None,
            &data,
            &spec,
            &Device::flex(),
            &mut clock,
        ))
        .unwrap();
        println!(
            "{model} {p:?}: {:.0} samples/s, {:.1} ms/step, loss {}",
            t.samples_per_sec(),
            1000.0 * t.seconds / t.steps as f64,
            t.mean_loss
        );
    }
}
