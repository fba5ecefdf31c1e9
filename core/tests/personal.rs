//! A supermask client's personalised accuracy: the `local_test` figure it reports (the compare
//! table's "local acc") is its own model after the round's training, on its own held-out split.
//! Under non-IID votes the global signs can become a dead network (every unit negative for
//! every input: no gradient reaches the scores); a client that has learned its classes must
//! still report its own model's accuracy then, not a copy of the dead global one.

mod common;

use std::time::Instant;

use burn::tensor::Device;
use canopy_core::client::{ClientHost, ClientRuntime};
use canopy_core::data::Dataset;
use canopy_core::data::partition::Shard;
use canopy_core::model::arch::Arch;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::{Backend, Blob, ClientMsg, DeviceInfo, SupermaskKind, Task};
use canopy_core::strategy::{ClientView, Strategy, StrategyConfig, Supermask, SupermaskConfig};
use canopy_core::train::step::Personal;
use canopy_core::train::{Host, Progress, evaluate};
use common::blocks;

struct Quiet(Instant);

impl Host for Quiet {
    fn now_ms(&self) -> f64 {
        self.0.elapsed().as_secs_f64() * 1000.0
    }
    async fn progress(&mut self, _p: &Progress) {}
}

impl ClientHost for Quiet {
    fn send(&mut self, _msg: ClientMsg) {}
    async fn request(&mut self, _r: u32, _s: u32, _p: Vec<u8>) -> Result<Blob, String> {
        Err("no exchange in this test".into())
    }
}

/// Two of the ten classes, as a 2-class shard holds.
fn two_classes(n: usize, seed: u64) -> Dataset {
    let all = blocks(n, seed);
    let idx: Vec<usize> = (0..all.len()).filter(|&i| all.labels[i] < 2).collect();
    all.select(&idx)
}

fn task(s: &mut Supermask, round: u32, global: &ModelState) -> Task {
    let client = [ClientView {
        id: 1,
        samples: 200,
    }];
    let mut plan = s.configure_round(
        round,
        global,
        &client,
        &mut rand::SeedableRng::seed_from_u64(round as u64),
    );
    plan.tasks.remove(0).1
}

/// The client's reported local accuracy in round 1 (from θ₀) and in round 2, whose global
/// signs are all negative (a dead network), with the strategy's settings `settings`.
fn local_accuracy_before_and_after_a_dead_vote(settings: SupermaskConfig) -> (f32, f32, f32) {
    let arch = Arch::preset("mlp", [1, 8, 8], 10).unwrap();
    let config = StrategyConfig {
        seed: 7,
        epochs: 3,
        batch_size: 20,
        ..Default::default()
    };
    let mut s = Supermask::new(config, settings, SupermaskKind::Sign).unwrap();
    let info = DeviceInfo::new(Backend::Native, "test", "test");
    let mut rt = ClientRuntime::new(Quiet(Instant::now()), Device::flex(), info, "c".into());
    rt.shard = Some(Shard {
        index: 0,
        train: two_classes(1000, 1),
        test: two_classes(500, 2),
    });
    let global = ModelState::init(arch.clone(), 7);
    let first = pollster::block_on(rt.run_task(task(&mut s, 1, &global))).unwrap();
    // The vote's worst case: every surviving weight and bias negative, θ₀'s magnitudes.
    let mask = rt
        .state
        .mask
        .mask()
        .expect("the first task's mask")
        .to_vec();
    let mut dead = global.clone();
    dead.set_mask(mask.clone());
    for (w, k) in dead.params.iter_mut().zip(&mask) {
        *w = if *k { -w.abs() } else { 0.0 };
    }
    let shard = rt.shard.as_ref().unwrap();
    let dead_acc = pollster::block_on(evaluate(&arch, &dead.params, &shard.test, &Device::flex()))
        .unwrap()
        .accuracy;
    let second = pollster::block_on(rt.run_task(task(&mut s, 2, &dead))).unwrap();
    (
        first.metrics.local_test.accuracy,
        dead_acc,
        second.metrics.local_test.accuracy,
    )
}

#[test]
fn personalised_accuracy_is_the_clients_own_model_after_a_dead_vote() {
    // HideNseek's defaults: the client's own scores carry over.
    let (first, dead, second) = local_accuracy_before_and_after_a_dead_vote(Default::default());
    assert!(first > 0.9, "round 1 learned the two classes: {first}");
    assert!(dead <= 0.55, "the dead global model guesses: {dead}");
    assert!(
        second > 0.9,
        "round 2 reports the client's own model ({second}), not the dead global one ({dead})"
    );
    // Only the magnitudes kept (the signs taken from the vote): the model is the dead global
    // one and no gradient can move it. This is what the compare table reported before.
    let (_, _, stuck) = local_accuracy_before_and_after_a_dead_vote(SupermaskConfig {
        personal_scores: Personal::Magnitudes,
        ..Default::default()
    });
    assert!(stuck <= 0.55, "magnitudes with the vote's signs: {stuck}");
}
