//! What the driver does with a result when it comes: its staleness counted from the version its
//! task was sent on, its update scaled by s(τ) onto the newest model, or dropped past τ_max.

use std::sync::Arc;
use std::time::Instant;

use canopy_core::aggregate::staleness::BufferedConfig;
use canopy_core::codec::supermask::Encoding;
use canopy_core::model::arch::Arch;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::{ClientMetrics, UploadSpec};
use canopy_core::strategy::{Contribution, StrategyConfig, UploadKind, train_task};

use super::{NotTaken, Out, weigh};

fn out(sent_on: u32, start: Vec<f32>) -> Out {
    let model = ModelState::init(Arch::preset("mlp", [1, 4, 4], 3).unwrap(), 1);
    Out {
        task: train_task(
            sent_on,
            &model,
            &StrategyConfig::default(),
            7,
            UploadSpec::Weights,
        ),
        start: Arc::new(start),
        sent: Instant::now(),
    }
}

fn weights(values: Vec<f32>) -> Contribution {
    Contribution {
        client: 7,
        samples: 10,
        kind: UploadKind::Weights,
        values,
        metrics: ClientMetrics::default(),
        encoding: Encoding::default(),
    }
}

#[test]
fn a_result_three_versions_late_joins_the_newest_model_at_half_weight() {
    let config = BufferedConfig::default();
    // Sent on version 2, arriving while the buffer makes version 5: τ = 3, s = 1/√4 = ½.
    let task = out(2, vec![1.0, 1.0]);
    let newest = [3.0, -1.0];
    let (c, tau) = weigh(&config, 5, &task, &newest, weights(vec![2.0, 0.0])).unwrap();
    assert_eq!(tau, 3);
    // The update (+1, −1) from where the client started, halved, on the newest model.
    assert_eq!(c.values, vec![3.5, -1.5]);
    // A fresh result (sent on the version being made) counts in full.
    let fresh = out(5, newest.to_vec());
    let (c, tau) = weigh(&config, 5, &fresh, &newest, weights(vec![4.0, -2.0])).unwrap();
    assert_eq!((tau, c.values), (0, vec![4.0, -2.0]));
}

#[test]
fn a_result_past_max_staleness_is_dropped_as_stale() {
    let config = BufferedConfig {
        max_staleness: 4,
        ..BufferedConfig::default()
    };
    let task = out(1, vec![0.0, 0.0]);
    assert!(weigh(&config, 5, &task, &[0.0, 0.0], weights(vec![1.0, 1.0])).is_ok());
    match weigh(&config, 6, &task, &[0.0, 0.0], weights(vec![1.0, 1.0])) {
        Err(NotTaken::Stale(why)) => assert!(why.contains("max_staleness = 4"), "{why}"),
        other => panic!("τ = 5 > 4 must be dropped as stale: {other:?}"),
    }
    // A result that does not fit the model is rejected, not called stale.
    match weigh(&config, 2, &task, &[0.0, 0.0], weights(vec![1.0])) {
        Err(NotTaken::Rejected(_)) => {}
        other => panic!("{other:?}"),
    }
}
