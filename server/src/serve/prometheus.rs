//! `GET /metrics`: the run in the OpenMetrics text format, which Prometheus scrapes, for the
//! Prometheus and Grafana an operator already runs (`/api/metrics` stays the dashboard's JSON).
//!
//! Nearly everything is read at scrape time from what the hub already keeps (the client
//! table's rows are never removed, so sums over them only grow): one pass under the hub's lock
//! fills a registry made for this scrape, and the text is written after the lock is released.
//! The round-time histogram is rebuilt from the round records, so it is exact and survives
//! `--resume`. Only a few things are counted as they happen: refused results, edges' partials
//! and refused reports (the hub's [`Tally`](crate::hub::tally::Tally)), and the in-round
//! exchange's latency (the desk's histogram).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::App;
use crate::hub::Refusal;
use crate::hub::{Hub, Status};

/// What Prometheus is told it gets.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of a round's seconds: 0.25 s to about 34 minutes.
fn round_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.25, 2.0, 14)
}

type Labelled = Family<Vec<(String, String)>, Counter>;

pub async fn handler(State(app): State<Arc<App>>) -> impl IntoResponse {
    let mut registry = collect(&app.hub.lock().unwrap());
    // Histograms carry the unit in their name only: some OpenMetrics readers refuse a `# UNIT`
    // line on a histogram (the parser the tests use does), and Prometheus ignores it anyway.
    registry.register(
        "exchange_seconds",
        "Time to answer an in-round request (split learning's batches): waiting for a worker, then the strategy",
        app.desk.latency(),
    );
    let mut text = String::new();
    match encode(&mut text, &registry) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The hub's state as metrics named `canopy_…`.
pub fn collect(hub: &Hub) -> Registry {
    let mut r = Registry::with_prefix("canopy");
    let gauge = |r: &mut Registry, name: &str, help: &str, v: i64| {
        let g: Gauge = Gauge::default();
        g.set(v);
        r.register(name, help, g);
    };
    let counter = |r: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        match unit {
            Some(u) => r.register_with_unit(name, help, u, c),
            None => r.register(name, help, c),
        }
    };
    let labelled = |r: &mut Registry, name: &str, help: &str, key: &str, values: &[(&str, u64)]| {
        let f = Labelled::default();
        for (label, v) in values {
            f.get_or_create(&vec![(key.to_string(), label.to_string())])
                .inc_by(*v);
        }
        r.register(name, help, f);
    };

    // The client table, in one pass.
    let (mut connected, mut idle, mut busy) = (0, 0, 0);
    let (mut up, mut down, mut accepted) = (0u64, 0u64, 0u64);
    let (mut judged, mut clipped, mut down_weighted, mut refused) = (0u64, 0u64, 0u64, 0u64);
    let mut max_ratio = 0f64;
    for c in hub.clients() {
        if c.connected() {
            connected += 1;
            idle += (c.status == Status::Idle) as i64;
            busy += (c.status == Status::Training) as i64;
        }
        up += c.bytes_up;
        down += c.bytes_down;
        accepted += c.rounds_done as u64;
        let s = &c.suspicion;
        judged += s.judged as u64;
        clipped += s.clipped as u64;
        down_weighted += s.down_weighted as u64;
        refused += s.rejected as u64;
        max_ratio = max_ratio.max(s.max_norm_ratio);
    }
    gauge(
        &mut r,
        "clients_connected",
        "Clients connected now",
        connected,
    );
    gauge(
        &mut r,
        "clients_idle",
        "Connected clients waiting for a task",
        idle,
    );
    gauge(
        &mut r,
        "clients_busy",
        "Connected clients working on a task",
        busy,
    );
    counter(
        &mut r,
        "received",
        "WebSocket frames received from this server's clients",
        Some(Unit::Bytes),
        up,
    );
    counter(
        &mut r,
        "sent",
        "WebSocket frames queued for this server's clients",
        Some(Unit::Bytes),
        down,
    );
    counter(
        &mut r,
        "results_accepted",
        "Results that passed validation in their round",
        None,
        accepted,
    );
    let tally = hub.tally();
    let rejections: Vec<(&str, u64)> = Refusal::ALL
        .iter()
        .map(|&r| (r.label(), tally.rejections(r)))
        .collect();
    labelled(
        &mut r,
        "results_rejected",
        "Results refused: invalid (failed validation), late (after the deadline, late results dropped), stale (buffered: past max_staleness), no_task (answers no task pending)",
        "reason",
        &rejections,
    );
    counter(
        &mut r,
        "robust_judged",
        "Updates the robust aggregation layer judged",
        None,
        judged,
    );
    labelled(
        &mut r,
        "robust_acted",
        "Updates the robust aggregation layer clipped, down-weighted or rejected",
        "action",
        &[
            ("clipped", clipped),
            ("down_weighted", down_weighted),
            ("rejected", refused),
        ],
    );
    let ratio: Gauge<f64, AtomicU64> = Gauge::default();
    ratio.set(max_ratio);
    r.register(
        "robust_max_norm_ratio",
        "Largest update norm over its round's median norm any client has sent",
        ratio,
    );

    // The rounds.
    let records = hub.rounds();
    counter(
        &mut r,
        "rounds_completed",
        "Rounds finished (a resumed run counts its earlier rounds)",
        None,
        records.len() as u64,
    );
    gauge(
        &mut r,
        "current_round",
        "The round under way, or the last one",
        hub.round() as i64,
    );
    gauge(
        &mut r,
        "rounds_planned",
        "Rounds the run should have",
        hub.planned_rounds() as i64,
    );
    let seconds = Histogram::new(round_buckets());
    for rec in records {
        seconds.observe(rec.seconds);
    }
    r.register(
        "round_seconds",
        "Wall-clock time of each finished round",
        seconds,
    );

    // A root's edges (zero elsewhere).
    gauge(
        &mut r,
        "edges_live",
        "Edges heard from within the edge timeout (on a root)",
        hub.edges_live() as i64,
    );
    gauge(
        &mut r,
        "edge_clients_connected",
        "Clients connected to the live edges (on a root)",
        hub.edge_connected(hub.edge_timeout()) as i64,
    );
    let partials: Vec<(&str, u64)> = tally
        .partials()
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    labelled(
        &mut r,
        "edge_partials",
        "Partial sums received from edges, by what became of them (merged, late, stale, duplicate, bad, refused)",
        "outcome",
        &partials,
    );
    counter(
        &mut r,
        "edge_reports_refused",
        "Edges' reports of their clients refused (unsigned, wrongly signed, not a listed edge, replayed)",
        None,
        tally.reports_refused(),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::PartialRow;
    use crate::hub::clients::tests::{hello, shards};
    use crate::hub::rounds::tests::info;
    use crate::round::record::RoundRecord;
    use crate::scale::wire::Presence;
    use crate::serve::outbox::channel;
    use canopy_core::protocol::{ErrorCode, ServerMsg};
    use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
    use std::time::Duration;

    type Scrape = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

    fn scrape(hub: &Hub) -> Scrape {
        let mut text = String::new();
        encode(&mut text, &collect(hub)).unwrap();
        openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap()
    }

    /// The value of an unlabelled (or first) sample of a counter or gauge family.
    fn value(s: &Scrape, family: &str, label: Option<(&str, &str)>) -> f64 {
        let f = &s.families[family];
        let sample = f
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

    #[test]
    fn clients_rounds_refusals_and_edges_show_as_they_are_in_the_hub() {
        let mut h = Hub::new(
            info(5),
            shards(3),
            Vec::new(),
            false,
            Duration::from_secs(60),
        );
        let mut rx = Vec::new();
        let mut ids = Vec::new();
        for name in ["a", "b", "c"] {
            let (tx, r) = channel(1 << 20);
            ids.push(h.join(hello(name, None), tx).unwrap());
            rx.push(r);
        }
        h.task_sent(ids[0], 1);
        h.task_sent(ids[1], 1);
        h.result_accepted(ids[1], 10.0, None);
        h.set_status(ids[1], Status::Idle);
        h.disconnect(ids[2]);
        h.count_up(ids[0], 1000);
        h.reject(
            ids[0],
            Refusal::Invalid,
            "result rejected: update value 3 is NaN (not finite)".into(),
        );
        // Other errors are not refusals.
        h.send(
            ids[0],
            &ServerMsg::Error {
                code: ErrorCode::Malformed,
                message: "not a Canopy frame".into(),
            },
        );
        for (round, seconds) in [(1, 0.3), (2, 5.0)] {
            h.record(RoundRecord {
                round,
                seconds,
                ..Default::default()
            });
        }
        h.edge_seen(Presence {
            edge: "e1".into(),
            url: "http://e1/".into(),
            connected: 4,
            idle: vec![(7, 100)],
            seq: 1,
            signer: String::new(),
            signature: Vec::new(),
        })
        .unwrap();
        h.edge_report_refused("e1", "unsigned");
        for outcome in [
            "merged",
            "merged",
            "late",
            "refused: signed by U1, not by edge 'e1''s key",
        ] {
            h.edge_partial(
                "e1",
                PartialRow {
                    round: 1,
                    results: 2,
                    samples: 10.0,
                    sum_bytes: 8,
                    in_store: false,
                    edge_seconds: 0.1,
                    outcome: outcome.into(),
                },
            );
        }

        let s = scrape(&h);
        assert_eq!(value(&s, "canopy_clients_connected", None), 2.0);
        assert_eq!(value(&s, "canopy_clients_busy", None), 1.0);
        assert_eq!(value(&s, "canopy_clients_idle", None), 1.0);
        assert_eq!(value(&s, "canopy_results_accepted", None), 1.0);
        let reason = |r| value(&s, "canopy_results_rejected", Some(("reason", r)));
        assert_eq!(
            (reason("invalid"), reason("late"), reason("no_task")),
            (1.0, 0.0, 0.0)
        );
        assert_eq!(value(&s, "canopy_received_bytes", None), 1000.0);
        let sent: u64 = h.clients().map(|c| c.bytes_down).sum();
        assert!(sent > 0);
        assert_eq!(value(&s, "canopy_sent_bytes", None), sent as f64);
        assert_eq!(value(&s, "canopy_rounds_completed", None), 2.0);
        assert_eq!(value(&s, "canopy_edges_live", None), 1.0);
        assert_eq!(value(&s, "canopy_edge_clients_connected", None), 4.0);
        let outcome = |o| value(&s, "canopy_edge_partials", Some(("outcome", o)));
        assert_eq!((outcome("merged"), outcome("late")), (2.0, 1.0));
        // By kind: the text after it is the sender's to choose.
        assert_eq!(outcome("refused"), 1.0);
        assert_eq!(value(&s, "canopy_edge_reports_refused", None), 1.0);
        let OpenMetricsValue::Histogram(rounds) = &s.families["canopy_round_seconds"]
            .iter_samples()
            .next()
            .unwrap()
            .value
        else {
            panic!("round_seconds is a histogram")
        };
        assert_eq!(rounds.count, Some(2));
        assert!((rounds.sum.unwrap().as_f64() - 5.3).abs() < 1e-9);
        // 0.3 s falls in the 0.5 s bucket, 5 s in the 8 s one.
        let under = |le: f64| {
            rounds
                .buckets
                .iter()
                .find(|b| (b.upper_bound - le).abs() < 1e-9)
                .map(|b| b.count.as_f64())
                .unwrap()
        };
        assert_eq!(
            (under(0.25), under(0.5), under(4.0), under(8.0)),
            (0.0, 1.0, 1.0, 2.0)
        );
    }
}
