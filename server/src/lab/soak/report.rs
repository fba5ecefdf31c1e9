//! What a soak found: every honest result looked up in the root's rounds, the ones missing put
//! down to a process the soak killed (when it was down while they were in flight) or left
//! unexplained, and the figures the report prints.

use std::collections::HashSet;

use super::client::Sent;

/// A process the soak stopped on purpose, and which edges it took down with it.
#[derive(Clone, Debug)]
pub struct Outage {
    pub what: String,
    /// The edges whose results it could lose: one edge, or all of them (NATS).
    pub edges: Vec<usize>,
    /// Seconds since the soak began: killed, and started again.
    pub down: f64,
    pub up: f64,
}

/// The honest results, sorted by what became of them.
#[derive(Debug, Default, PartialEq)]
pub struct Accounting {
    pub sent: usize,
    /// In the participants of a round the root finished.
    pub merged: usize,
    /// Missing, and sent to an edge an outage took down within `window` seconds of it: lost
    /// with a killed process. One count per outage.
    pub lost_to: Vec<usize>,
    /// Missing from a round in which the root's defence left a partial out (its results went
    /// with it): honest results the defence cost, if no edge was hostile.
    pub left_out: usize,
    /// Missing with no outage near: each one is a result the system lost.
    pub unexplained: Vec<Sent>,
    /// Per outage: seconds from its restart to the first result sent through the restarted
    /// part that a finished round holds (None: none did).
    pub recovered_after: Vec<Option<f64>>,
}

/// Looks every result of `sent` up in `merged` (round, edge, local id); `left_out_rounds` are
/// the rounds in which the root left a partial out.
pub fn account(
    sent: &[Sent],
    merged: &HashSet<(u32, usize, u64)>,
    left_out_rounds: &HashSet<u32>,
    outages: &[Outage],
    window: f64,
) -> Accounting {
    let mut a = Accounting {
        sent: sent.len(),
        lost_to: vec![0; outages.len()],
        recovered_after: vec![None; outages.len()],
        ..Default::default()
    };
    for s in sent {
        if merged.contains(&(s.round, s.edge, s.local)) {
            a.merged += 1;
            for (k, o) in outages.iter().enumerate() {
                if o.edges.contains(&s.edge) && s.at >= o.up {
                    let after = s.at - o.up;
                    let best = a.recovered_after[k].get_or_insert(after);
                    *best = best.min(after);
                }
            }
            continue;
        }
        match outages.iter().position(|o| {
            o.edges.contains(&s.edge) && s.at >= o.down - window && s.at <= o.up + window
        }) {
            Some(k) => a.lost_to[k] += 1,
            None if left_out_rounds.contains(&s.round) => a.left_out += 1,
            None => a.unexplained.push(*s),
        }
    }
    a
}

/// The value at quantile `q` (0..1) of `values` (nearest rank); NaN when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(round: u32, edge: usize, local: u64, at: f64) -> Sent {
        Sent {
            round,
            edge,
            local,
            at,
        }
    }

    #[test]
    fn a_missing_result_is_put_down_to_an_outage_only_near_it_and_on_its_edges() {
        let outages = [
            Outage {
                what: "edge e2".into(),
                edges: vec![1],
                down: 100.0,
                up: 110.0,
            },
            Outage {
                what: "NATS".into(),
                edges: vec![0, 1],
                down: 300.0,
                up: 305.0,
            },
        ];
        let results = [
            sent(1, 0, 7, 10.0),   // merged
            sent(9, 1, 3, 95.0),   // missing, edge 2 killed 5 s later
            sent(9, 0, 4, 95.0),   // missing on edge 1, which was not killed: unexplained
            sent(12, 1, 5, 113.0), // merged, 3 s after edge 2 came back
            sent(30, 0, 4, 290.0), // missing while NATS went down
            sent(40, 1, 3, 500.0), // missing, far from any outage
            sent(41, 1, 3, 320.0), // merged, 15 s after NATS came back
            sent(50, 1, 6, 700.0), // missing from a round with a partial left out
        ];
        let merged: HashSet<(u32, usize, u64)> = [(1, 0, 7), (12, 1, 5), (41, 1, 3)].into();
        let left_out: HashSet<u32> = [50].into();
        let a = account(&results, &merged, &left_out, &outages, 20.0);
        assert_eq!(a.sent, 8);
        assert_eq!(a.merged, 3);
        assert_eq!(a.lost_to, vec![1, 1]);
        assert_eq!(a.left_out, 1);
        assert_eq!(a.unexplained, vec![results[2], results[5]]);
        assert_eq!(a.recovered_after, vec![Some(3.0), Some(15.0)]);
        // With a narrower window the NATS loss is no longer excused.
        let a = account(&results, &merged, &left_out, &outages, 5.0);
        assert_eq!(a.lost_to, vec![1, 0]);
        assert_eq!(a.unexplained.len(), 3);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
