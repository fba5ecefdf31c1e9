//! `canopy bench` rows for split learning: what a tab computes per batch for its front, full and
//! pruned (ρ = 0.5, physically narrower), and what the server spends on the back per batch.

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Device;
use canopy_core::codec::{self, MaskCache};
use canopy_core::data::Dataset;
use canopy_core::model::arch::Arch;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::Blob;
use canopy_core::strategy::{ClientView, Exchange, Split, SplitConfig, Strategy, StrategyConfig};
use canopy_core::train::{Host, Progress, train};
use rand::SeedableRng;

/// A client whose batches go straight to the strategy's back server, timing the wait.
struct Direct {
    t0: Instant,
    handler: Arc<dyn Exchange>,
    waited_ms: f64,
}

impl Host for Direct {
    fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }
    async fn progress(&mut self, _p: &Progress) {}
    async fn exchange(&mut self, seq: u32, request: Vec<u8>) -> Result<Blob, String> {
        let t = self.now_ms();
        let reply = self.handler.handle(1, 1, seq, &request).map(Blob);
        self.waited_ms += self.now_ms() - t;
        reply
    }
}

/// (tab ms per batch, server ms per batch, front parameters) for one epoch on `data`.
fn per_batch(model: &str, data: &Dataset, cut: usize, prune: f32) -> (f64, f64, usize) {
    let arch = Arch::preset(model, data.shape, data.classes).expect("preset");
    let global = ModelState::init(arch, 1);
    let config = StrategyConfig {
        epochs: 1,
        batch_size: 32,
        ..Default::default()
    };
    let mut s = Split::new(
        config,
        SplitConfig {
            cut,
            prune,
            bits: 8,
            ..Default::default()
        },
    );
    let clients = [ClientView {
        id: 1,
        samples: data.len() as u64,
    }];
    let mut plan = s.configure_round(
        1,
        &global,
        &clients,
        &mut rand::rngs::StdRng::seed_from_u64(1),
    );
    let (_, task) = plan.tasks.remove(0);
    let front = codec::decode_model(&task.model, &mut MaskCache::default(), true).expect("front");
    let mut host = Direct {
        t0: Instant::now(),
        handler: plan.exchange.expect("split answers batches"),
        waited_ms: 0.0,
    };
    let t = pollster::block_on(train(
        &front.arch,
        &front.params,
        None,
        None,
        data,
        &task.train,
        &Device::flex(),
        &mut host,
    ))
    .expect("training");
    let steps = t.steps.max(1) as f64;
    (
        (t.seconds * 1000.0 - host.waited_ms) / steps,
        host.waited_ms / steps,
        front.params.len(),
    )
}

pub fn rows(mlp_data: &Dataset, cnn_data: &Dataset) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for (model, cut, data) in [("mlp", 1, mlp_data), ("cnn-small", 2, cnn_data)] {
        let (tab, server, params) = per_batch(model, data, cut, 0.0);
        rows.push((
            format!("split {model} cut {cut}: tab front step"),
            format!(
                "{tab:.2} ms/batch, {params} params (baseline); server back {server:.2} ms/batch"
            ),
        ));
        let (tab_p, server_p, params_p) = per_batch(model, data, cut, 0.5);
        rows.push((format!("split {model} cut {cut}: front pruned ρ = 0.5"), format!("{tab_p:.2} ms/batch ({:.2}× full front), {params_p} params; server back {server_p:.2} ms/batch", tab_p / tab)));
    }
    rows
}
