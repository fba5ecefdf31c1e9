//! `canopy load`'s clients against an in-process server: a few hundred synthetic clients
//! complete rounds, and streamed aggregation ends on the same model as buffered aggregation
//! under the trimmed mean (with the median norm bound the two paths bound by different medians,
//! the previous round's and this one's, so the bound is left out here; the default's
//! drop_farthest is not used: the synthetic clients' updates take three patterns, so their
//! distances tie, and a tie may drop either of two equal updates).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use canopy_core::metric_keys as keys;
use canopy_server::lab::load::support::{LoadArgs, client, load_config};

const CLIENTS: usize = 300;

/// A load run of `mode` on an in-process server; returns its round records and final model.
fn run(
    mode: &str,
) -> (
    Vec<canopy_server::round::record::RoundRecord>,
    Vec<f32>,
    usize,
) {
    let args = LoadArgs {
        clients: vec![CLIENTS],
        modes: vec![mode.into()],
        rounds: 2,
        model: "mlp".into(),
        strategy: "fedavg".into(),
        sample: CLIENTS,
        buffered_max: usize::MAX,
        edges: Vec::new(),
        out: std::env::temp_dir().join(format!("canopy-load-test-{}", std::process::id())),
    };
    let mut config = load_config(&args, CLIENTS, mode, 0, &args.out).unwrap();
    config.run.linger = false;
    config.run.seed = 4;
    // The trimmed mean drops ⌊0.1 · 300⌋ = 30 values per end; streamed, exactly so when it may
    // keep 30 extremes per end.
    config.aggregation.rule = canopy_core::aggregate::robust::Rule::TrimmedMean;
    config.aggregation.clip = canopy_core::aggregate::robust::Clip::None;
    config.aggregation.trim_max = 30;
    let defaults = common::config("x", 1, 1, "canopy-load-test");
    config.data.path = defaults.data.path;
    common::runtime().block_on(async move {
        let running = canopy_server::start(config).await.unwrap();
        let url = format!("ws://{}/ws", running.addr);
        let (welcomed, errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let connecting = Arc::new(tokio::sync::Semaphore::new(64));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                tokio::spawn(client(
                    url.clone(),
                    i,
                    connecting.clone(),
                    welcomed.clone(),
                    errors.clone(),
                ))
            })
            .collect();
        tokio::time::timeout(std::time::Duration::from_secs(120), running.rounds)
            .await
            .expect("rounds finish")
            .unwrap();
        for c in clients {
            c.abort();
        }
        let app = running.app;
        let records = app.hub.lock().unwrap().rounds().to_vec();
        let params = app.global.lock().unwrap().params.clone();
        (records, params, errors.load(Ordering::Relaxed))
    })
}

#[test]
fn hundreds_of_synthetic_clients_complete_rounds_streamed_as_buffered() {
    let (streamed, model_s, errors_s) = run("streaming");
    let (buffered, model_b, errors_b) = run("buffered");
    assert_eq!((errors_s, errors_b), (0, 0));
    for (records, flag) in [(&streamed, 1.0), (&buffered, 0.0)] {
        assert_eq!(records.len(), 2);
        for r in records.iter() {
            assert_eq!(
                (r.sampled, r.results, r.rejected),
                (CLIENTS, CLIENTS, 0),
                "round {}",
                r.round
            );
            assert_eq!(r.extra.get(keys::SERVER_STREAMED), Some(&flag));
            // Every result waited some time for the round loop, and never longer than the round.
            let wait = r.extra.get(keys::SERVER_RESULT_WAIT_P99_MS).copied();
            assert!(
                wait.is_some_and(|v| v > 0.0 && v <= r.seconds * 1e3),
                "round {}: p99 wait {wait:?} ms in a {} s round",
                r.round,
                r.seconds
            );
        }
    }
    let worst = model_s
        .iter()
        .zip(&model_b)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-6,
        "streamed and buffered runs end {worst} apart"
    );
    // The synthetic updates moved the model (so the comparison compares something).
    let init = canopy_core::model::state::ModelState::init(
        canopy_core::model::arch::Arch::preset("mlp", [1, 28, 28], 10).unwrap(),
        4,
    )
    .params;
    assert!(model_s.iter().zip(&init).any(|(a, b)| (a - b).abs() > 1e-4));
}
