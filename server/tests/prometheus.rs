//! `GET /metrics` after a real run with native clients and one misbehaving client, read with a
//! strict OpenMetrics parser as Prometheus would scrape it.

use std::time::Duration;

use canopy_core::protocol::{
    Backend, Blob, ClientMetrics, ClientMsg, DeviceInfo, Hello, PROTOCOL_VERSION, ServerMsg,
    TaskResult, Update, decode, encode,
};
use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
use tungstenite::Message;

mod common;
use common::runtime;

type Scrape = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// The value of a counter or gauge family's sample (the one with `label`, if given).
fn value(s: &Scrape, family: &str, label: Option<(&str, &str)>) -> f64 {
    let sample = s.families[family]
        .iter_samples()
        .find(|x| {
            label.is_none_or(|(k, v)| x.get_labelset().unwrap().get_label_value(k) == Some(v))
        })
        .unwrap_or_else(|| panic!("{family} {label:?}"));
    match &sample.value {
        OpenMetricsValue::Counter(c) => c.value.as_f64(),
        OpenMetricsValue::Gauge(g) => g.as_f64(),
        other => panic!("{family}: {other:?}"),
    }
}

fn read(
    ws: &mut tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
) -> ServerMsg {
    loop {
        if let Message::Binary(b) = ws.read().unwrap() {
            return decode(&b).unwrap();
        }
    }
}

/// Joins, takes its round-1 task and answers it with a NaN, then with a result for a round that
/// is not running, and leaves.
fn misbehave(url: &str) {
    let (mut ws, _) = tungstenite::connect(url).unwrap();
    let hello = ClientMsg::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        name: "nan".into(),
        device: DeviceInfo::new(Backend::Native, "test", "test"),
        resume: None,
        mask_version: None,
    });
    ws.send(Message::binary(encode(&hello))).unwrap();
    let task = loop {
        if let ServerMsg::Task(t) = read(&mut ws) {
            break t;
        }
    };
    let result = |values: Vec<f32>, round: u32| {
        Message::binary(encode(&ClientMsg::Result(TaskResult {
            round,
            samples: 10,
            update: Update::Weights(Blob::from_f32(&values)),
            metrics: ClientMetrics::default(),
            mask_version: None,
        })))
    };
    let mut nan = vec![0.0; task.model.arch.num_params()];
    nan[3] = f32::NAN;
    ws.send(result(nan, task.round)).unwrap();
    ws.send(result(vec![0.0; 4], 77)).unwrap();
    // Both refusals come back before the client leaves.
    let mut refused = 0;
    while refused < 2 {
        if let ServerMsg::Error { .. } = read(&mut ws) {
            refused += 1;
        }
    }
}

#[test]
fn metrics_count_the_rounds_bytes_results_and_refusals_of_a_real_run() {
    let rt = runtime();
    rt.block_on(async {
        let rounds = 3;
        let mut cfg = common::config("prometheus", rounds, 3, "canopy-prometheus");
        cfg.data.max_train = 1500;
        cfg.data.max_test = 200;
        cfg.strategy.config.epochs = 1;
        let running = canopy_server::start(cfg).await.unwrap();
        let url = format!("ws://{}/ws", running.addr);
        let u = url.clone();
        let good = tokio::task::spawn_blocking(move || {
            canopy_server::lab::sim::run_many(&u, 2, "sim", Duration::from_secs(10))
        });
        let u = url.clone();
        tokio::task::spawn_blocking(move || misbehave(&u))
            .await
            .unwrap();
        // The run needs three clients: a newcomer takes the misbehaving one's place.
        let late = tokio::task::spawn_blocking(move || {
            canopy_server::lab::sim::run_client(&url, "late", Duration::from_secs(10))
        });
        let app = running.app.clone();
        tokio::time::timeout(Duration::from_secs(180), running.rounds)
            .await
            .expect("run finished in time")
            .unwrap();
        assert!(good.await.unwrap().iter().all(|r| r.finished));
        assert!(late.await.unwrap().finished);

        let (status, headers, body) = common::get(running.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            common::header(&headers, "content-type")
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        let text = String::from_utf8(body).unwrap();
        let s = openmetrics_parser::openmetrics::parse_openmetrics(&text)
            .unwrap_or_else(|e| panic!("{e:?}\n{text}"));

        let hub = app.hub.lock().unwrap();
        let records = hub.rounds();
        assert_eq!(records.len(), rounds as usize);
        assert_eq!(value(&s, "canopy_rounds_completed", None), rounds as f64);
        assert_eq!(value(&s, "canopy_rounds_planned", None), rounds as f64);
        let OpenMetricsValue::Histogram(h) = &s.families["canopy_round_seconds"]
            .iter_samples()
            .next()
            .unwrap()
            .value
        else {
            panic!("canopy_round_seconds is a histogram")
        };
        assert_eq!(h.count, Some(rounds as u64));
        let seconds: f64 = records.iter().map(|r| r.seconds).sum();
        assert!(
            (h.sum.unwrap().as_f64() - seconds).abs() < 1e-6,
            "{h:?} vs {seconds}"
        );
        let inf = h
            .buckets
            .iter()
            .find(|b| b.upper_bound.is_infinite())
            .unwrap();
        assert_eq!(inf.count.as_f64(), rounds as f64);

        let results: usize = records.iter().map(|r| r.results).sum();
        assert!(results >= 2 * rounds as usize, "{results}");
        assert_eq!(value(&s, "canopy_results_accepted", None), results as f64);
        let reason = |r| value(&s, "canopy_results_rejected", Some(("reason", r)));
        assert_eq!(reason("invalid"), 1.0, "the NaN");
        assert_eq!(reason("no_task"), 1.0, "the result for round 77");
        assert_eq!(reason("late"), 0.0);
        assert_eq!(records[0].rejected, 1);

        // Bytes: every frame of every client, at least what the rounds counted.
        let (up, down): (u64, u64) = hub
            .clients()
            .fold((0, 0), |(u, d), c| (u + c.bytes_up, d + c.bytes_down));
        let round_up: u64 = records.iter().map(|r| r.bytes_up).sum();
        let round_down: u64 = records.iter().map(|r| r.bytes_down).sum();
        assert_eq!(value(&s, "canopy_received_bytes", None), up as f64);
        assert_eq!(value(&s, "canopy_sent_bytes", None), down as f64);
        assert!(up >= round_up && round_up > 0, "{up} {round_up}");
        assert!(down >= round_down && round_down > 0, "{down} {round_down}");

        // The default defence judged every aggregated update.
        assert_eq!(value(&s, "canopy_robust_judged", None), results as f64);
        // The run is over: nobody is left connected, and no edges on a single server.
        assert_eq!(
            value(&s, "canopy_clients_connected", None),
            hub.connected() as f64
        );
        assert_eq!(value(&s, "canopy_edges_live", None), 0.0);
        assert!(s.families.contains_key("canopy_exchange_seconds"));
    });
}
