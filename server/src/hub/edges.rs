//! On the root of a run spread over edge servers: the table of its edges, as their presence
//! reports and partials left them. An edge counts as live while it was heard from within the
//! caller's timeout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use canopy_core::strategy::ClientView;
use serde::Serialize;

use crate::scale::wire::Presence;

/// Partials kept per edge for the dashboard.
const PARTIALS_KEPT: usize = 20;

/// An edge of a run spread over servers, as its root sees it.
#[derive(Clone, Debug, Serialize)]
pub struct EdgeRow {
    pub name: String,
    pub url: String,
    pub connected: usize,
    pub idle: usize,
    #[serde(skip)]
    idle_clients: Vec<ClientView>,
    #[serde(skip)]
    seen: Instant,
    /// The last report's [`Presence::seq`]: a report must be newer.
    #[serde(skip)]
    seq: u64,
    /// Reports claiming to be this edge's that the root refused (forged, unsigned, replayed),
    /// and why the last one was.
    pub reports_refused: u64,
    pub last_refusal: String,
    /// Its partials, newest last (the last 20).
    pub partials: Vec<PartialRow>,
}

/// What became of one partial an edge sent.
#[derive(Clone, Debug, Serialize)]
pub struct PartialRow {
    pub round: u32,
    pub results: u64,
    pub samples: f64,
    /// Size of its sums, and whether they came through the Object Store.
    pub sum_bytes: u64,
    pub in_store: bool,
    pub edge_seconds: f64,
    /// `merged`, or why it was ignored: `late` (the previous round's), `stale` (cut from another
    /// model or shape), `duplicate` (this edge's round is merged already), `bad` (its sums could
    /// not be fetched or merged). Older partials are skipped and later ones kept, with no row.
    pub outcome: String,
}

/// The edges by name, and which edge each reported client is on.
#[derive(Default)]
pub struct EdgeTable {
    edges: BTreeMap<String, EdgeRow>,
    edge_of: BTreeMap<u64, String>,
}

impl EdgeTable {
    /// An edge reported its clients: its row is replaced and it is heard from now. A report not
    /// newer than the last one taken from the edge (a replay) is refused with the reason.
    pub fn seen(&mut self, p: Presence) -> Result<(), String> {
        if let Some(row) = self.edges.get(&p.edge)
            && p.seq <= row.seq
        {
            return Err(format!(
                "replayed or out of order (report {} after {})",
                p.seq, row.seq
            ));
        }
        for (id, _) in &p.idle {
            self.edge_of.insert(*id, p.edge.clone());
        }
        let row = self.edges.entry(p.edge.clone()).or_insert_with(|| EdgeRow {
            name: p.edge.clone(),
            url: String::new(),
            connected: 0,
            idle: 0,
            idle_clients: Vec::new(),
            seen: Instant::now(),
            seq: 0,
            reports_refused: 0,
            last_refusal: String::new(),
            partials: Vec::new(),
        });
        row.url = p.url;
        row.connected = p.connected;
        row.idle = p.idle.len();
        row.idle_clients = p
            .idle
            .into_iter()
            .map(|(id, samples)| ClientView { id, samples })
            .collect();
        row.seen = Instant::now();
        row.seq = p.seq;
        Ok(())
    }

    /// A report claiming to come from `edge` was refused for `why`: counted on the edge's row
    /// when it has one (a name no edge reported under gets no row: a forger could make any
    /// number). Returns the edge's count of refused reports, 0 without a row.
    pub fn refused(&mut self, edge: &str, why: &str) -> u64 {
        match self.edges.get_mut(edge) {
            Some(row) => {
                row.reports_refused += 1;
                row.last_refusal = why.to_string();
                row.reports_refused
            }
            None => 0,
        }
    }

    /// What the root did with an edge's partial (kept only for an edge it has heard from).
    pub fn partial(&mut self, edge: &str, row: PartialRow) {
        if let Some(e) = self.edges.get_mut(edge) {
            e.partials.push(row);
            let n = e.partials.len();
            if n > PARTIALS_KEPT {
                e.partials.drain(..n - PARTIALS_KEPT);
            }
        }
    }

    /// Edges heard from within `timeout`.
    fn live(&self, timeout: Duration) -> impl Iterator<Item = &EdgeRow> {
        self.edges
            .values()
            .filter(move |e| e.seen.elapsed() <= timeout)
    }

    /// `edge` was heard from within `timeout`.
    pub fn alive(&self, edge: &str, timeout: Duration) -> bool {
        self.edges
            .get(edge)
            .is_some_and(|e| e.seen.elapsed() <= timeout)
    }

    /// Idle clients of the edges heard from within `timeout` (and, given `since`, after it),
    /// in id order, and whether every edge heard from within `timeout` has reported since then:
    /// a round's clients are only known idle again once their edge reported after the round.
    pub fn idle_since(&self, timeout: Duration, since: Option<Instant>) -> (Vec<ClientView>, bool) {
        let alive: Vec<&EdgeRow> = self.live(timeout).collect();
        let fresh = |e: &EdgeRow| since.is_none_or(|s| e.seen > s);
        let mut all: Vec<ClientView> = alive
            .iter()
            .filter(|e| fresh(e))
            .flat_map(|e| e.idle_clients.iter().cloned())
            .collect();
        all.sort_by_key(|c| c.id);
        (all, alive.iter().all(|e| fresh(e)))
    }

    /// The edge a client (run-wide id) was last reported on.
    pub fn edge_of(&self, client: u64) -> Option<&str> {
        self.edge_of.get(&client).map(|s| s.as_str())
    }

    /// Clients connected to edges heard from within `timeout`.
    pub fn connected(&self, timeout: Duration) -> usize {
        self.live(timeout).map(|e| e.connected).sum()
    }

    /// How many edges were heard from within `timeout`.
    pub fn live_count(&self, timeout: Duration) -> usize {
        self.live(timeout).count()
    }

    /// Where the edges' tabs join, in edge order.
    pub fn urls(&self) -> Vec<String> {
        self.edges
            .values()
            .map(|e| e.url.clone())
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The edges for the dashboard, with how long ago each was heard from.
    pub fn json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.edges
                .values()
                .map(|e| {
                    let mut v = serde_json::to_value(e).unwrap_or_default();
                    v["seen_ms_ago"] = (e.seen.elapsed().as_millis() as u64).into();
                    v
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    fn presence(edge: &str, url: &str, connected: usize, idle: &[(u64, u64)]) -> Presence {
        Presence {
            edge: edge.into(),
            url: url.into(),
            connected,
            idle: idle.to_vec(),
            seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            signer: String::new(),
            signature: Vec::new(),
        }
    }

    /// Each report made here newer than the last.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

    fn partial(round: u32) -> PartialRow {
        PartialRow {
            round,
            results: 2,
            samples: 64.0,
            sum_bytes: 1000,
            in_store: false,
            edge_seconds: 0.5,
            outcome: "merged".into(),
        }
    }

    fn ids(clients: &[ClientView]) -> Vec<u64> {
        clients.iter().map(|c| c.id).collect()
    }

    /// A timeout an edge that just reported is well within, even on a busy machine.
    const SHORT: Duration = Duration::from_millis(100);

    /// Long enough for an edge heard from before it to be older than `SHORT`.
    fn wait() {
        std::thread::sleep(Duration::from_millis(150));
    }

    #[test]
    fn an_edge_is_live_while_heard_from_within_the_timeout() {
        let mut t = EdgeTable::default();
        t.seen(presence("a", "http://a/", 3, &[(5, 10), (1, 20)]))
            .unwrap();
        assert!(t.alive("a", LONG) && !t.alive("b", LONG));
        assert_eq!(t.connected(LONG), 3);
        assert_eq!(t.edge_of(5), Some("a"));
        assert_eq!(t.edge_of(2), None);
        wait();
        t.seen(presence("b", "", 2, &[(2, 30)])).unwrap();
        // `a` has gone quiet for longer than SHORT; `b` has just reported.
        assert!(!t.alive("a", SHORT) && t.alive("b", SHORT));
        assert_eq!(t.connected(SHORT), 2);
        assert_eq!(t.connected(LONG), 5);
        let (idle, all_fresh) = t.idle_since(LONG, None);
        assert_eq!(ids(&idle), vec![1, 2, 5], "in id order");
        assert_eq!(idle[0].samples, 20);
        assert!(all_fresh);
        assert_eq!(ids(&t.idle_since(SHORT, None).0), vec![2]);
        // Only edges with a url give tabs somewhere to join.
        assert_eq!(t.urls(), vec!["http://a/".to_string()]);
    }

    #[test]
    fn clients_are_idle_again_only_once_their_edge_reported_after_the_round() {
        let mut t = EdgeTable::default();
        t.seen(presence("a", "", 1, &[(1, 10)])).unwrap();
        t.seen(presence("b", "", 1, &[(2, 10)])).unwrap();
        let round_began = Instant::now();
        wait();
        t.seen(presence("b", "", 1, &[(2, 10), (3, 10)])).unwrap();
        assert_eq!(t.edge_of(3), Some("b"));
        let (idle, all_fresh) = t.idle_since(LONG, Some(round_began));
        assert_eq!(ids(&idle), vec![2, 3]);
        assert!(!all_fresh, "a has not reported since");
        // An edge gone quiet is not waited for.
        assert!(t.idle_since(SHORT, Some(round_began)).1);
        t.seen(presence("a", "", 1, &[])).unwrap();
        let (idle, all_fresh) = t.idle_since(LONG, Some(round_began));
        assert_eq!(ids(&idle), vec![2, 3]);
        assert!(all_fresh);
    }

    #[test]
    fn partials_keep_the_last_twenty_of_known_edges() {
        let mut t = EdgeTable::default();
        t.partial("a", partial(1));
        t.seen(presence("a", "", 1, &[])).unwrap();
        for round in 1..=25 {
            t.partial("a", partial(round));
        }
        let json = t.json();
        let rows = json[0]["partials"].as_array().unwrap();
        assert_eq!(rows.len(), 20);
        assert_eq!(
            (rows[0]["round"].as_u64(), rows[19]["round"].as_u64()),
            (Some(6), Some(25))
        );
    }

    #[test]
    fn the_json_has_each_edge_in_name_order_with_how_long_ago_it_was_heard_from() {
        let mut t = EdgeTable::default();
        assert_eq!(t.json(), serde_json::json!([]));
        t.seen(presence("b", "http://b/", 4, &[(7, 10), (8, 10)]))
            .unwrap();
        wait();
        t.seen(presence("a", "http://a/", 1, &[])).unwrap();
        t.partial("a", partial(3));
        let json = t.json();
        let edges = json.as_array().unwrap();
        assert_eq!(edges.len(), 2);
        let a = &edges[0];
        assert_eq!(
            (a["name"].as_str(), a["url"].as_str()),
            (Some("a"), Some("http://a/"))
        );
        assert_eq!(
            (a["connected"].as_u64(), a["idle"].as_u64()),
            (Some(1), Some(0))
        );
        assert_eq!(a["partials"][0]["outcome"], "merged");
        let b = &edges[1];
        assert_eq!(
            (b["name"].as_str(), b["idle"].as_u64()),
            (Some("b"), Some(2))
        );
        assert!(b["seen_ms_ago"].as_u64().unwrap() >= 150);
        assert!(a["seen_ms_ago"].as_u64().unwrap() < b["seen_ms_ago"].as_u64().unwrap());
        // The clients and the clock stay out of it.
        assert!(b.get("idle_clients").is_none() && b.get("seen").is_none());
    }

    #[test]
    fn a_report_not_newer_than_the_last_is_refused_and_refusals_count_on_the_edge() {
        let mut t = EdgeTable::default();
        let first = presence("a", "", 1, &[(1, 10)]);
        t.seen(first.clone()).unwrap();
        // Replayed, and older: refused, and the clients stay as the first report left them.
        let older = Presence {
            seq: first.seq - 1,
            idle: vec![(9, 10)],
            ..first.clone()
        };
        for p in [first.clone(), older] {
            let why = t.seen(p).unwrap_err();
            assert!(why.starts_with("replayed or out of order"), "{why}");
        }
        assert_eq!(ids(&t.idle_since(LONG, None).0), [1]);
        assert_eq!(t.refused("a", "unsigned"), 1);
        assert_eq!(t.refused("a", "wrongly signed"), 2);
        // A name no edge reported under gets no row.
        assert_eq!(t.refused("ghost", "unsigned"), 0);
        let json = t.json();
        assert_eq!(json.as_array().unwrap().len(), 1);
        assert_eq!(
            (
                json[0]["reports_refused"].as_u64(),
                json[0]["last_refusal"].as_str()
            ),
            (Some(2), Some("wrongly signed"))
        );
        // A newer report is taken.
        t.seen(Presence {
            seq: first.seq + 1,
            idle: vec![(2, 10)],
            ..first
        })
        .unwrap();
        assert_eq!(ids(&t.idle_since(LONG, None).0), [2]);
    }
}
