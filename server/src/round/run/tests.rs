//! The round loop takes everything about a round from the strategy's plan: whether it streams
//! (and so which aggregation the strategy is asked for), its phase, and who answers in-round
//! requests.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_core::data::Dataset;
use canopy_core::data::partition::Shard;
use canopy_core::metric_keys as keys;
use canopy_core::model::arch::Arch;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::{
    Backend, Blob, DeviceInfo, Hello, PROTOCOL_VERSION, RunInfo, ServerMsg, TaskResult, Update,
    UploadSpec,
};
use canopy_core::strategy::{
    ClientView, Exchange, Fold, Phase, RoundContext, RoundOutcome, RoundPlan, RunningSum, Strategy,
    StrategyConfig, plain_round, weighted_values,
};
use rand::{SeedableRng, rngs::StdRng};

use super::{Attempt, RoundLoop};
use crate::hub::Hub;
use crate::round::exchange::Desk;
use crate::round::inbox::Incoming;

/// A strategy whose plan is whatever the test says, and which notes how it was asked to
/// aggregate.
struct Probe {
    fold: Option<Fold>,
    calls: Arc<Mutex<Vec<&'static str>>>,
}

/// Answers every request with the request itself.
struct Mirror;

impl Exchange for Mirror {
    fn handle(&self, _: u32, _: u64, _: u32, request: &[u8]) -> Result<Vec<u8>, String> {
        Ok(request.to_vec())
    }
}

impl Strategy for Probe {
    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> RoundPlan {
        let config = StrategyConfig::default();
        RoundPlan {
            tasks: plain_round(round, global, &config, clients, rng, UploadSpec::Weights),
            fold: self.fold,
            phase: Phase::Own(format!("probing-{round}").into()),
            exchange: Some(Arc::new(Mirror)),
        }
    }

    fn aggregate(
        &mut self,
        _: u32,
        global: &mut ModelState,
        results: &[canopy_core::strategy::Contribution],
        _: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        self.calls.lock().unwrap().push("aggregate");
        global.params = weighted_values(results)?;
        Ok(RoundOutcome::default())
    }

    fn aggregate_sum(
        &mut self,
        _: u32,
        global: &mut ModelState,
        sum: &RunningSum,
        _: &[canopy_core::strategy::Contribution],
        _: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        self.calls.lock().unwrap().push("aggregate_sum");
        global.params = sum.mean()?;
        Ok(RoundOutcome::default())
    }
}

fn data() -> Dataset {
    Dataset {
        shape: [1, 4, 4],
        classes: 3,
        images: vec![0; 4 * 16],
        labels: vec![0, 1, 2, 0],
    }
}

/// One round of a loop over `strategy` with one connected client, which asks the round's
/// exchange once and then sends back the model it was given. The round's record, the phase
/// the client saw the round under, and the exchange's reply.
async fn one_round(
    strategy: Probe,
    name: &str,
) -> (crate::round::record::RoundRecord, String, ServerMsg) {
    let global = ModelState::init(Arch::preset("mlp", [1, 4, 4], 3).unwrap(), 1);
    let shard = Shard {
        index: 0,
        train: data(),
        test: data(),
    };
    let info = RunInfo {
        run_id: name.into(),
        strategy: "probe".into(),
        model: "mlp".into(),
        dataset: "none".into(),
        partition: "iid".into(),
        rounds: 1,
        classes: Vec::new(),
    };
    let hub = Arc::new(Mutex::new(Hub::new(
        info,
        vec![shard],
        Vec::new(),
        false,
        Duration::from_secs(3),
    )));
    let (outbox, _frames) = crate::serve::outbox::channel(64 << 20);
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        name: "tab".into(),
        device: DeviceInfo::new(Backend::Native, "", ""),
        resume: None,
        mask_version: None,
    };
    let client = hub.lock().unwrap().join(hello, outbox).unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let desk = Arc::new(Desk::default());
    let run_dir = std::env::temp_dir().join(format!("canopy-plan-{name}-{}", std::process::id()));
    let mut rl = RoundLoop {
        hub: hub.clone(),
        incoming: rx,
        desk: desk.clone(),
        strategy: Box::new(strategy),
        global: Arc::new(Mutex::new(global.clone())),
        test: Arc::new(data()),
        validation: Arc::new(data()),
        rounds: 1,
        min_clients: 1,
        min_results: 1,
        seed: 1,
        run_dir: run_dir.clone(),
        config_json: serde_json::Value::Null,
        first_round: 1,
        robust: Default::default(),
        late_results: Default::default(),
        goodbye: Duration::ZERO,
        late: Default::default(),
        carried: Vec::new(),
        norm_prior: None,
        edges: None,
    };
    let tab = tokio::spawn(async move {
        // The round is out once the hub shows it under the plan's phase.
        let phase = loop {
            let phase = hub.lock().unwrap().phase();
            if let crate::hub::Phase::Round(p) = phase {
                break p.name().to_string();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let reply = desk.answer(client, 1, 0, Blob(vec![7, 8])).await;
        let result = TaskResult {
            round: 1,
            samples: 4,
            update: Update::Weights(Blob::from_f32(&global.params)),
            metrics: Default::default(),
            mask_version: None,
        };
        tx.send(Incoming::Result {
            client,
            result,
            at: Instant::now(),
            slot: Default::default(),
        })
        .unwrap();
        (phase, reply)
    });
    let attempt = tokio::time::timeout(
        Duration::from_secs(60),
        rl.attempt(1, 0, &mut StdRng::seed_from_u64(1)),
    )
    .await
    .expect("the round ends");
    assert!(
        matches!(attempt, Attempt::Done),
        "{name}: the round is done"
    );
    let (phase, reply) = tab.await.unwrap();
    let record = rl.hub.lock().unwrap().rounds()[0].clone();
    let _ = std::fs::remove_dir_all(run_dir);
    (record, phase, reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_says_how_the_round_runs() {
    for (fold, asked, streamed) in [
        (None, "aggregate", 0.0),
        (Some(Fold::default()), "aggregate_sum", 1.0),
    ] {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let name = if fold.is_some() {
            "streamed"
        } else {
            "buffered"
        };
        let (record, phase, reply) = one_round(
            Probe {
                fold,
                calls: calls.clone(),
            },
            name,
        )
        .await;
        assert_eq!(
            *calls.lock().unwrap(),
            vec![asked],
            "{name}: the plan's fold decides the aggregation"
        );
        assert_eq!(record.extra[keys::SERVER_STREAMED], streamed, "{name}");
        assert_eq!(record.results, 1, "{name}");
        assert_eq!(
            phase, "probing-1",
            "{name}: the dashboard shows the plan's phase"
        );
        assert!(
            matches!(&reply, ServerMsg::Exchange { payload, .. } if payload.0 == [7, 8]),
            "{name}: the plan's exchange answers requests: {reply:?}"
        );
    }
}
