//! A run on the tabs' own data over the real server and a native client speaking the protocol:
//! the welcome names the classes and deals no data, hostile example counts are refused with a
//! clear error, a tab is sampled once it reports examples, a result may claim no more samples
//! than it reported, and the round's record has no global test accuracy.

use std::time::Duration;

use canopy_core::protocol::{
    Backend, Blob, ClientMetrics, ClientMsg, DeviceInfo, ErrorCode, Hello, PROTOCOL_VERSION,
    Params, ServerMsg, Task, TaskResult, Update, encode,
};
use tungstenite::Message;

mod common;
use common::{Ws, read, runtime};

/// The next message that is not a Wait.
fn next(ws: &mut Ws) -> Option<ServerMsg> {
    loop {
        match read(ws) {
            Some(ServerMsg::Wait { .. }) => continue,
            other => return other,
        }
    }
}

fn examples(train: Vec<u32>, test: Vec<u32>) -> Message {
    Message::binary(encode(&ClientMsg::Examples { train, test }))
}

fn unchanged(task: &Task, samples: u64) -> Message {
    let Params::Values(params) = &task.model.params else {
        panic!("a weights task")
    };
    Message::binary(encode(&ClientMsg::Result(TaskResult {
        round: task.round,
        samples,
        update: Update::Weights(Blob::from_f32(&params.to_f32().unwrap())),
        metrics: ClientMetrics::default(),
        mask_version: None,
    })))
}

#[test]
fn a_tab_on_its_own_data_reports_counts_that_are_checked_and_bound_its_results() {
    runtime().block_on(async {
        let mut cfg = common::config("byo", 1, 1, "canopy-byo");
        cfg.model = "mlp".into();
        cfg.data.dataset = "tab".into();
        cfg.data.path = None;
        cfg.data.classes = vec!["rock".into(), "paper".into(), "scissors".into()];
        cfg.run.min_results = 1;
        cfg.strategy.config.deadline_ms = 3000;
        cfg.validate().unwrap();
        let running = canopy_server::start(cfg).await.unwrap();
        let url = format!("ws://{}/ws", running.addr);
        let app = running.app.clone();
        let tab = tokio::task::spawn_blocking(move || {
            let mut ws = tungstenite::connect(&url).unwrap().0;
            ws.send(Message::binary(encode(&ClientMsg::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                name: "camera-tab".into(),
                device: DeviceInfo::new(Backend::Native, "test", "test"),
                resume: None,
                mask_version: None,
            }))))
            .unwrap();
            let Some(ServerMsg::Welcome(w)) = next(&mut ws) else {
                panic!("no welcome")
            };
            assert_eq!(w.run.classes, ["rock", "paper", "scissors"]);
            assert!(w.shard.train.is_empty() && w.shard.test.is_empty());
            assert_eq!(w.shard.train.classes, 3);
            // Hostile or wrong counts: refused, saying why.
            for (train, test, why) in [
                (vec![u32::MAX, 0, 0], vec![0, 0, 0], "at most"),
                (vec![1, 2], vec![0, 0], "this run has 3"),
            ] {
                ws.send(examples(train, test)).unwrap();
                match next(&mut ws) {
                    Some(ServerMsg::Error { code, message }) => {
                        assert_eq!(code, ErrorCode::Rejected, "{message}");
                        assert!(
                            message.contains("example counts refused") && message.contains(why),
                            "{message}"
                        );
                    }
                    other => panic!("expected a refusal, got {other:?}"),
                }
            }
            // No examples yet: never sampled. Now 6 training examples: a task comes.
            ws.send(examples(vec![2, 3, 1], vec![1, 0, 1])).unwrap();
            let Some(ServerMsg::Task(task)) = next(&mut ws) else {
                panic!("no task")
            };
            // More samples than reported: the result is refused.
            ws.send(unchanged(&task, 1_000_000)).unwrap();
            match next(&mut ws) {
                Some(ServerMsg::Error { code, .. }) => assert_eq!(code, ErrorCode::Rejected),
                other => panic!("expected the result refused, got {other:?}"),
            }
            // The round is retried; an honest result ends the run.
            let task = loop {
                match next(&mut ws) {
                    Some(ServerMsg::Task(t)) => break t,
                    Some(ServerMsg::Error { .. }) => continue,
                    other => panic!("expected a task again, got {other:?}"),
                }
            };
            ws.send(unchanged(&task, 6)).unwrap();
            while let Some(m) = read(&mut ws) {
                if matches!(m, ServerMsg::Bye { .. }) {
                    break;
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(120), tab)
            .await
            .unwrap()
            .unwrap();
        let hub = app.hub.lock().unwrap();
        let c = hub.clients().next().unwrap();
        let ex = c.examples.as_ref().unwrap();
        assert_eq!(
            (ex.train.as_slice(), ex.test.as_slice(), c.train_samples),
            (&[2, 3, 1][..], &[1, 0, 1][..], 6)
        );
        let r = hub.rounds().last().expect("a round was recorded");
        assert_eq!((r.results, r.samples), (1, 6));
        assert!(
            r.test_accuracy.is_nan(),
            "no test set, no test accuracy: {}",
            r.test_accuracy
        );
    });
}
