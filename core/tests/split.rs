//! Split learning's halves put together without a network: the client's training loop with a
//! remote loss, and the strategy's back server answering each batch.

mod common;

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Device;
use canopy_core::codec::{self, MaskCache};
use canopy_core::model::arch::Arch;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::{Blob, ClientMetrics};
use canopy_core::strategy::{
    ClientView, Contribution, Exchange, PruneKind, RoundContext, Split, SplitConfig, Strategy,
    StrategyConfig, UploadKind,
};
use canopy_core::train::{Eval, Host, Optimizer, Progress, TrainSpec, Trained, train, train_local};
use common::blocks;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// A client whose exchanges go straight to the strategy's back server.
struct Direct {
    t0: Instant,
    handler: Arc<dyn Exchange>,
    round: u32,
    client: u64,
    requests: u32,
    bytes: u64,
}

impl Host for Direct {
    fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }
    async fn progress(&mut self, _p: &Progress) {}
    async fn exchange(&mut self, seq: u32, request: Vec<u8>) -> Result<Blob, String> {
        self.requests += 1;
        self.bytes += request.len() as u64;
        self.handler
            .handle(self.round, self.client, seq, &request)
            .map(Blob)
    }
}

fn shared(optimizer: Optimizer) -> StrategyConfig {
    StrategyConfig {
        epochs: 2,
        batch_size: 20,
        lr: 0.05,
        optimizer,
        seed: 3,
        ..Default::default()
    }
}

/// One round of split learning with one client: returns the new global model, the client's
/// training and what its front looked like.
fn one_round(
    global: &ModelState,
    config: StrategyConfig,
    settings: SplitConfig,
    data: &canopy_core::data::Dataset,
) -> (ModelState, Trained, ModelState, Direct) {
    let mut s = Split::new(config, settings);
    s.check_model(&global.arch).unwrap();
    let clients = [ClientView {
        id: 7,
        samples: data.len() as u64,
    }];
    let plan = s.configure_round(1, global, &clients, &mut StdRng::seed_from_u64(1));
    assert!(plan.fold.is_none(), "split learning never streams");
    let handler = plan.exchange.expect("split answers batches");
    let (id, task) = plan.tasks.into_iter().next().unwrap();
    let front = codec::decode_model(&task.model, &mut MaskCache::default(), true).unwrap();
    let mut host = Direct {
        t0: Instant::now(),
        handler,
        round: 1,
        client: id,
        requests: 0,
        bytes: 0,
    };
    let t = pollster::block_on(train(
        &front.arch,
        &front.params,
        front.mask.as_deref(),
        None,
        data,
        &task.train,
        &Device::flex(),
        &mut host,
    ))
    .unwrap();
    let c = Contribution {
        client: id,
        samples: data.len() as u64,
        kind: UploadKind::Weights,
        values: codec::expand(
            &codec::compact(&t.params, front.mask.as_deref()),
            front.mask.as_deref(),
            t.params.len(),
        )
        .unwrap(),
        metrics: ClientMetrics {
            steps: t.steps,
            train_seconds: t.seconds,
            ..Default::default()
        },
        encoding: Default::default(),
    };
    let c = s.complete(c, global).unwrap();
    let mut g = global.clone();
    let validate = |_: &ModelState| Ok(Eval::default());
    s.aggregate(
        1,
        &mut g,
        &[c],
        &RoundContext {
            rounds: 1,
            validate: &validate,
        },
    )
    .unwrap();
    let front_state = ModelState {
        arch: front.arch.clone(),
        params: front.params.clone(),
        mask: front.mask.clone(),
        mask_version: 0,
    };
    (g, t, front_state, host)
}

#[test]
fn exact_split_training_equals_training_the_whole_model() {
    // b = 32 and κ = 1: the front on the client and the back on the server take exactly the
    // steps the whole model takes on one machine (plain SGD and SGD with momentum).
    let data = blocks(100, 3);
    for (model, cut) in [("mlp", 1), ("mlp", 2), ("cnn-small", 2)] {
        for optimizer in [
            Optimizer::Sgd { momentum: 0.0 },
            Optimizer::Sgd { momentum: 0.9 },
        ] {
            let arch = Arch::preset(model, [1, 8, 8], 10).unwrap();
            let global = ModelState::init(arch.clone(), 5);
            let config = shared(optimizer.clone());
            let spec = TrainSpec {
                epochs: config.epochs,
                batch_size: config.batch_size,
                lr: config.lr,
                optimizer,
                seed: 3 ^ (1u64 << 32) ^ 7,
                patience: 0,
                step: Default::default(),
            };
            let mut host = Direct {
                t0: Instant::now(),
                handler: Arc::new(canopy_core::strategy::LossServer::default()),
                round: 0,
                client: 0,
                requests: 0,
                bytes: 0,
            };
            let whole = pollster::block_on(train_local(
                &arch,
                &global.params,
                None,
                &data,
                &spec,
                &Device::flex(),
                &mut host,
            ))
            .unwrap();
            for shared_back in [false, true] {
                let (g, t, _, h) = one_round(
                    &global,
                    config.clone(),
                    SplitConfig {
                        cut,
                        bits: 32,
                        shared_back,
                        ..Default::default()
                    },
                    &data,
                );
                assert_eq!(
                    h.requests, t.steps,
                    "{model} cut {cut}: one exchange per batch"
                );
                let diff = whole
                    .params
                    .iter()
                    .zip(&g.params)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < 1e-5,
                    "{model} cut {cut} (shared back: {shared_back}): split and whole training differ by {diff}"
                );
                assert!(
                    (whole.mean_loss - t.mean_loss).abs() < 1e-4,
                    "{model} cut {cut}: loss {} vs {}",
                    whole.mean_loss,
                    t.mean_loss
                );
            }
        }
    }
}

#[test]
fn quantized_gradients_and_dropout_still_learn_with_fewer_bytes() {
    let arch = Arch::preset("mlp", [1, 8, 8], 10).unwrap();
    let global = ModelState::init(arch.clone(), 5);
    let (train_set, test) = (blocks(400, 1), blocks(200, 2));
    let acc = |m: &ModelState| {
        pollster::block_on(canopy_core::train::evaluate(
            &m.arch,
            &m.params,
            &test,
            &Device::flex(),
        ))
        .unwrap()
        .accuracy
    };
    let before = acc(&global);
    let cfg = shared(Optimizer::Sgd { momentum: 0.9 });
    let (exact, _, _, he) = one_round(
        &global,
        cfg.clone(),
        SplitConfig {
            cut: 1,
            bits: 32,
            ..Default::default()
        },
        &train_set,
    );
    let (lean, _, _, hl) = one_round(
        &global,
        cfg,
        SplitConfig {
            cut: 1,
            bits: 4,
            keep: 0.5,
            ..Default::default()
        },
        &train_set,
    );
    assert!(
        acc(&exact) > before + 0.3 && acc(&lean) > before + 0.3,
        "accuracy {before} → exact {} / lean {}",
        acc(&exact),
        acc(&lean)
    );
    let ratio = hl.bytes as f64 / he.bytes as f64;
    assert!(
        (0.4..0.6).contains(&ratio),
        "κ = 0.5 sends about half the activation bytes: {ratio}"
    );
}

#[test]
fn a_pruned_front_is_narrower_and_maps_back_into_the_model() {
    let arch = Arch::preset("mlp", [1, 8, 8], 10).unwrap();
    let global = ModelState::init(arch.clone(), 5);
    let data = blocks(200, 1);
    let cfg = shared(Optimizer::Sgd { momentum: 0.0 });
    let (g, t, front, _) = one_round(
        &global,
        cfg.clone(),
        SplitConfig {
            cut: 2,
            prune: 0.5,
            bits: 32,
            ..Default::default()
        },
        &data,
    );
    // Both hidden layers of the front lost half their units: 64·100 + 100 + 100·100 + 100.
    assert_eq!(front.arch.widths(), vec![100, 100]);
    assert_eq!(t.params.len(), 64 * 100 + 100 + 100 * 100 + 100);
    assert!(
        front.arch.num_params() * 3
            < arch
                .front(arch.split_point(2).unwrap())
                .unwrap()
                .num_params()
    );
    // Pruned units kept their values; kept ones moved; the back's rows for pruned features did
    // not move (they saw zeros).
    let (w0, _) = arch.weight_and_bias(1).unwrap();
    let moved_units = (0..200)
        .filter(|&u| {
            (0..64).any(|i| {
                g.params[w0.offset + i * 200 + u] != global.params[w0.offset + i * 200 + u]
            })
        })
        .count();
    // (A kept unit whose ReLU never fires gets no gradient, so a few may stay put.)
    assert!(
        (90..=100).contains(&moved_units),
        "only the 100 kept units of the first layer trained: {moved_units} moved"
    );
    // Magnitude pruning: same width, a mask over half of each weight tensor.
    let (_, _, front, _) = one_round(
        &global,
        cfg,
        SplitConfig {
            cut: 2,
            prune: 0.5,
            prune_kind: PruneKind::Magnitude,
            bits: 32,
            ..Default::default()
        },
        &data,
    );
    assert_eq!(front.arch.widths(), vec![200, 200]);
    assert!(
        (front.sparsity() - 0.5).abs() < 0.01,
        "{}",
        front.sparsity()
    );
}

#[test]
fn the_back_server_refuses_what_does_not_fit() {
    use canopy_core::codec::exchange::encode_request;
    let arch = Arch::preset("mlp", [1, 28, 28], 10).unwrap();
    let global = ModelState::init(arch.clone(), 5);
    let mut s = Split::new(shared(Optimizer::Adam), SplitConfig::default());
    let clients = [
        ClientView { id: 1, samples: 10 },
        ClientView { id: 2, samples: 10 },
    ];
    let h = s
        .configure_round(4, &global, &clients, &mut StdRng::seed_from_u64(1))
        .exchange
        .unwrap();
    let ok = encode_request(&[0.5; 400], 2, 200, &[1, 2], None).0;
    assert!(
        h.handle(3, 1, 0, &ok).unwrap_err().contains("round 3"),
        "stale round"
    );
    assert!(
        h.handle(4, 9, 0, &ok)
            .unwrap_err()
            .contains("no split task")
    );
    assert!(
        h.handle(4, 1, 1, &ok).unwrap_err().contains("out of order"),
        "batch numbers in order"
    );
    assert!(
        h.handle(
            4,
            1,
            0,
            &encode_request(&[0.5; 398], 2, 199, &[1, 2], None).0
        )
        .unwrap_err()
        .contains("width 199")
    );
    assert!(
        h.handle(4, 1, 0, &ok[..ok.len() - 3])
            .unwrap_err()
            .contains("malformed")
    );
    // None of that moved client 1 on; client 2 is untouched by client 1's batches.
    h.handle(4, 1, 0, &ok).unwrap();
    h.handle(4, 1, 1, &ok).unwrap();
    h.handle(4, 2, 0, &ok).unwrap();
    assert!(
        h.handle(4, 2, 0, &ok).unwrap_err().contains("out of order"),
        "a replayed batch"
    );
    // A result must have trained on exactly the batches the server answered.
    let front = 784 * 200 + 200;
    let result = |steps| Contribution {
        client: 1,
        samples: 10,
        kind: UploadKind::Weights,
        values: vec![0.0; front],
        metrics: ClientMetrics {
            steps,
            ..Default::default()
        },
        encoding: Default::default(),
    };
    assert!(
        s.complete(result(3), &global)
            .unwrap_err()
            .contains("server answered 2")
    );
    assert_eq!(
        s.complete(result(2), &global).unwrap().values.len(),
        global.params.len()
    );
    // A cut the model does not have is refused at start-up.
    let bad = Split::new(
        StrategyConfig::default(),
        SplitConfig {
            cut: 3,
            ..Default::default()
        },
    );
    assert!(bad.check_model(&arch).unwrap_err().contains("cut 3"));
    let cnn = Arch::preset("cnn", [1, 8, 8], 10).unwrap();
    assert!(
        Split::new(
            StrategyConfig::default(),
            SplitConfig {
                cut: 1,
                ..Default::default()
            }
        )
        .check_model(&cnn)
        .unwrap_err()
        .contains("Flatten")
    );
}

#[test]
fn between_front_averagings_each_client_keeps_its_own_front() {
    let arch = Arch::preset("mlp", [1, 8, 8], 10).unwrap();
    let mut global = ModelState::init(arch.clone(), 5);
    let mut s = Split::new(
        shared(Optimizer::Sgd { momentum: 0.0 }),
        SplitConfig {
            cut: 1,
            bits: 32,
            front_every: 2,
            ..Default::default()
        },
    );
    let data = [blocks(60, 1), blocks(60, 9)];
    let clients = [
        ClientView { id: 1, samples: 60 },
        ClientView { id: 2, samples: 60 },
    ];
    let mut fronts = Vec::new();
    for round in 1..=3 {
        let plan = s.configure_round(
            round,
            &global,
            &clients,
            &mut StdRng::seed_from_u64(round as u64),
        );
        let (tasks, handler) = (plan.tasks, plan.exchange.unwrap());
        let models: Vec<_> = tasks
            .iter()
            .map(|(_, t)| codec::decode_model(&t.model, &mut MaskCache::default(), true).unwrap())
            .collect();
        fronts.push(models[0].params != models[1].params);
        let mut results = Vec::new();
        for ((id, task), (m, d)) in tasks.iter().zip(models.iter().zip(&data)) {
            let mut host = Direct {
                t0: Instant::now(),
                handler: handler.clone(),
                round,
                client: *id,
                requests: 0,
                bytes: 0,
            };
            let t = pollster::block_on(train(
                &m.arch,
                &m.params,
                None,
                None,
                d,
                &task.train,
                &Device::flex(),
                &mut host,
            ))
            .unwrap();
            let c = Contribution {
                client: *id,
                samples: 60,
                kind: UploadKind::Weights,
                values: t.params,
                metrics: ClientMetrics {
                    steps: t.steps,
                    ..Default::default()
                },
                encoding: Default::default(),
            };
            results.push(s.complete(c, &global).unwrap());
        }
        let validate = |_: &ModelState| Ok(Eval::default());
        s.aggregate(
            round,
            &mut global,
            &results,
            &RoundContext {
                rounds: 3,
                validate: &validate,
            },
        )
        .unwrap();
    }
    // Round 1 starts from the global front; round 2 from each client's own (I = 2); round 3
    // from the average again.
    assert_eq!(fronts, vec![false, true, false]);
}
