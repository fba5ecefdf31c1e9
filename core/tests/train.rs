//! Native training on the CPU backend: real burn training on a small synthetic task.

mod common;

use std::time::Instant;

use burn::tensor::Device;
use canopy_core::model::arch::Arch;
use canopy_core::model::state::ModelState;
use canopy_core::train::{Host, Optimizer, Progress, TrainSpec, evaluate, train_local};
use common::blocks;

struct TestHost {
    t0: Instant,
    reports: Vec<Progress>,
}

impl Host for TestHost {
    fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }
    async fn progress(&mut self, p: &Progress) {
        self.reports.push(p.clone());
    }
}

fn spec(optimizer: Optimizer) -> TrainSpec {
    TrainSpec {
        epochs: 3,
        batch_size: 20,
        lr: 0.05,
        optimizer,
        seed: 3,
        patience: 0,
        step: Default::default(),
    }
}

#[test]
fn training_lowers_the_loss_and_learns() {
    let device = Device::flex();
    let arch = Arch::preset("mlp", [1, 8, 8], 10).unwrap();
    let state = ModelState::init(arch.clone(), 1);
    let (train, test) = (blocks(600, 1), blocks(200, 2));
    let before = pollster::block_on(evaluate(&arch, &state.params, &test, &device)).unwrap();
    let mut host = TestHost {
        t0: Instant::now(),
        reports: vec![],
    };
    let sgd = Optimizer::Sgd { momentum: 0.9 };
    let t = pollster::block_on(train_local(
        &arch,
        &state.params,
        None,
        &train,
        &spec(sgd),
        &device,
        &mut host,
    ))
    .unwrap();
    let after = pollster::block_on(evaluate(&arch, &t.params, &test, &device)).unwrap();
    assert_eq!(t.steps, 90);
    assert_eq!(t.samples, 1800);
    assert!(
        after.loss < before.loss * 0.5,
        "loss {} -> {}",
        before.loss,
        after.loss
    );
    assert!(after.accuracy > 0.9, "accuracy {}", after.accuracy);
    // Progress came in order and the reported loss fell.
    let first = host.reports.first().unwrap();
    let last = host.reports.last().unwrap();
    assert_eq!(last.step, 90);
    assert!(last.loss < first.loss, "{} -> {}", first.loss, last.loss);
}

#[test]
fn cnn_trains_too() {
    let device = Device::flex();
    let arch = Arch::preset("cnn-small", [1, 8, 8], 10).unwrap();
    let state = ModelState::init(arch.clone(), 2);
    let train = blocks(200, 3);
    let before = pollster::block_on(evaluate(&arch, &state.params, &train, &device)).unwrap();
    let mut host = TestHost {
        t0: Instant::now(),
        reports: vec![],
    };
    let mut s = spec(Optimizer::Adam);
    s.lr = 0.01;
    let t = pollster::block_on(train_local(
        &arch,
        &state.params,
        None,
        &train,
        &s,
        &device,
        &mut host,
    ))
    .unwrap();
    let after = pollster::block_on(evaluate(&arch, &t.params, &train, &device)).unwrap();
    assert!(
        after.loss < before.loss,
        "loss {} -> {}",
        before.loss,
        after.loss
    );
}

#[test]
fn mask_keeps_pruned_weights_at_zero() {
    let device = Device::flex();
    let arch = Arch::preset("mlp", [1, 8, 8], 10).unwrap();
    let state = ModelState::init(arch.clone(), 1);
    let mask: Vec<bool> = (0..arch.num_params()).map(|i| i % 3 != 0).collect();
    let mut host = TestHost {
        t0: Instant::now(),
        reports: vec![],
    };
    // Adam's moments would revive pruned weights if the mask were not re-applied every step.
    let t = pollster::block_on(train_local(
        &arch,
        &state.params,
        Some(&mask),
        &blocks(200, 4),
        &spec(Optimizer::Adam),
        &device,
        &mut host,
    ))
    .unwrap();
    let zeros = t
        .params
        .iter()
        .zip(&mask)
        .filter(|(_, k)| !**k)
        .filter(|(v, _)| **v == 0.0)
        .count();
    assert_eq!(zeros, mask.iter().filter(|k| !**k).count());
    let moved = t
        .params
        .iter()
        .zip(&state.params)
        .zip(&mask)
        .filter(|((a, b), k)| **k && a != b)
        .count();
    assert!(
        moved > arch.num_params() / 2,
        "surviving weights should train: {moved}"
    );
}

#[test]
fn early_stopping_ends_training_when_the_loss_stalls() {
    let device = Device::flex();
    let arch = Arch::preset("mlp", [1, 8, 8], 10).unwrap();
    let state = ModelState::init(arch.clone(), 1);
    let mut host = TestHost {
        t0: Instant::now(),
        reports: vec![],
    };
    // A learning rate this small barely moves the loss: patience 1 stops well before 40 epochs.
    let mut s = spec(Optimizer::Sgd { momentum: 0.0 });
    s.epochs = 40;
    s.lr = 1e-7;
    s.patience = 1;
    let t = pollster::block_on(train_local(
        &arch,
        &state.params,
        None,
        &blocks(100, 5),
        &s,
        &device,
        &mut host,
    ))
    .unwrap();
    assert!(t.epochs < 10, "ran {} epochs", t.epochs);
    assert_eq!(t.steps, t.epochs * 5);
    s.patience = 0;
    s.epochs = 3;
    let t = pollster::block_on(train_local(
        &arch,
        &state.params,
        None,
        &blocks(100, 5),
        &s,
        &device,
        &mut host,
    ))
    .unwrap();
    assert_eq!(t.epochs, 3);
}

/// A host whose exchange is answered in-process by the echo strategy's server half.
struct LoopbackHost {
    t0: Instant,
    server: canopy_core::strategy::LossServer,
    requests: u32,
}

impl Host for LoopbackHost {
    fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }
    async fn progress(&mut self, _p: &Progress) {}
    async fn exchange(
        &mut self,
        seq: u32,
        request: Vec<u8>,
    ) -> Result<canopy_core::protocol::Blob, String> {
        use canopy_core::strategy::Exchange;
        assert_eq!(
            seq, self.requests,
            "one request per batch, numbered in order"
        );
        self.requests += 1;
        self.server
            .handle(1, 1, seq, &request)
            .map(canopy_core::protocol::Blob)
    }
}

#[test]
fn a_remote_loss_trains_exactly_like_a_local_one() {
    use canopy_core::train::step::LossSource;
    let device = Device::flex();
    for (model, mask) in [("mlp", false), ("cnn-small", true)] {
        let arch = Arch::preset(model, [1, 8, 8], 10).unwrap();
        let mut state = ModelState::init(arch.clone(), 5);
        if mask {
            state.set_mask((0..state.params.len()).map(|i| i % 4 != 1).collect());
        }
        let train = blocks(120, 7);
        let local = spec(Optimizer::Sgd { momentum: 0.9 });
        let mut remote = local.clone();
        remote.step.loss = LossSource::Remote {
            cut: arch.layers.len() as u32,
            keep: 1.0,
        };
        let mut host = TestHost {
            t0: Instant::now(),
            reports: vec![],
        };
        let a = pollster::block_on(train_local(
            &arch,
            &state.params,
            state.mask.as_deref(),
            &train,
            &local,
            &device,
            &mut host,
        ))
        .unwrap();
        let mut lb = LoopbackHost {
            t0: Instant::now(),
            server: Default::default(),
            requests: 0,
        };
        lb.server = canopy_core::strategy::LossServer::for_classes(10);
        let b = pollster::block_on(train_local(
            &arch,
            &state.params,
            state.mask.as_deref(),
            &train,
            &remote,
            &device,
            &mut lb,
        ))
        .unwrap();
        assert_eq!(lb.requests, a.steps, "{model}: one exchange per batch");
        let diff = a
            .params
            .iter()
            .zip(&b.params)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-5,
            "{model}: remote and local training differ by {diff}"
        );
        assert!(
            (a.mean_loss - b.mean_loss).abs() < 1e-4,
            "{model}: loss {} vs {}",
            a.mean_loss,
            b.mean_loss
        );
        if let Some(m) = &state.mask {
            assert!(
                b.params.iter().zip(m).all(|(v, k)| *k || *v == 0.0),
                "{model}: the mask holds"
            );
        }
    }
}

#[test]
fn a_remote_loss_without_a_server_fails_clearly() {
    let arch = Arch::preset("mlp", [1, 8, 8], 10).unwrap();
    let state = ModelState::init(arch.clone(), 5);
    let mut s = spec(Optimizer::Adam);
    s.step.loss = canopy_core::train::step::LossSource::Remote { cut: 99, keep: 1.0 };
    let mut host = TestHost {
        t0: Instant::now(),
        reports: vec![],
    };
    let e = pollster::block_on(train_local(
        &arch,
        &state.params,
        None,
        &blocks(40, 1),
        &s,
        &Device::flex(),
        &mut host,
    ))
    .unwrap_err();
    assert!(e.contains("cut 99"), "{e}");
    s.step.loss = canopy_core::train::step::LossSource::Remote {
        cut: arch.layers.len() as u32,
        keep: 1.0,
    };
    let e = pollster::block_on(train_local(
        &arch,
        &state.params,
        None,
        &blocks(40, 1),
        &s,
        &Device::flex(),
        &mut host,
    ))
    .unwrap_err();
    assert!(e.contains("no server"), "{e}");
}

#[test]
fn sign_scores_learn_through_the_straight_through_estimator() {
    use canopy_core::protocol::SupermaskKind;
    use canopy_core::train::step::{Frozen, Learn, Personal};
    let arch = Arch::preset("mlp", [1, 8, 8], 10).unwrap();
    let theta0 = ModelState::init(arch.clone(), 4).params;
    let scores: Vec<f32> = theta0.clone();
    let mut s = spec(Optimizer::Adam);
    s.lr = 0.02;
    s.step.learn = Learn::Scores {
        personal: Personal::Own,
    };
    let (train, test) = (blocks(400, 1), blocks(200, 2));
    let mut host = TestHost {
        t0: Instant::now(),
        reports: vec![],
    };
    let frozen = Frozen {
        kind: SupermaskKind::Sign,
        theta0: &theta0,
    };
    let t = pollster::block_on(canopy_core::train::train(
        &arch,
        &scores,
        None,
        Some(frozen),
        &train,
        &s,
        &Device::flex(),
        &mut host,
    ))
    .unwrap();
    // The gradient reached the scores through the sign: they moved, and some signs flipped.
    let moved = t.params.iter().zip(&scores).filter(|(a, b)| a != b).count();
    let flipped = t
        .params
        .iter()
        .zip(&scores)
        .filter(|(a, b)| (**a > 0.0) != (**b > 0.0))
        .count();
    assert!(
        moved > scores.len() / 2,
        "{moved} of {} scores moved",
        scores.len()
    );
    assert!(flipped > 0, "no sign flipped");
    // Magnitudes never change: the model is |θ₀| with the learned scores' signs (so exactly the
    // flipped scores flip a weight), and it learned.
    let bits = canopy_core::codec::supermask::bits_of_scores(&t.params, None);
    let w = canopy_core::codec::supermask::effective(SupermaskKind::Sign, &theta0, None, &bits);
    assert!(
        w.iter()
            .zip(&theta0)
            .zip(&t.params)
            .all(|((w, t0), s)| *w == if *s > 0.0 { t0.abs() } else { -t0.abs() }),
        "the model is |θ₀| signed by the scores"
    );
    let flipped_weights = w
        .iter()
        .zip(&theta0)
        .filter(|(w, t0)| (**w > 0.0) != (**t0 > 0.0))
        .count();
    assert_eq!(
        flipped_weights, flipped,
        "one weight flipped per flipped score"
    );
    let before = pollster::block_on(evaluate(&arch, &theta0, &test, &Device::flex())).unwrap();
    let after = pollster::block_on(evaluate(&arch, &w, &test, &Device::flex())).unwrap();
    assert!(
        after.accuracy > before.accuracy + 0.3,
        "signs alone: accuracy {} → {}",
        before.accuracy,
        after.accuracy
    );
}
