//! Counts of what the hub's tables do not keep: results refused, by reason, edges' partials,
//! by what became of them, and edges' reports refused. They are only ever added to, so the
//! `/metrics` counters made from them never go down (`serve/prometheus.rs`).

use std::collections::BTreeMap;

/// Why a result was refused, as `/metrics` labels it. Each refusal says which it is where it
/// is made ([`crate::hub::Hub::reject`]), so counting reads no message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// It failed validation (shape, values, mask, samples) or could not be completed.
    Invalid,
    /// A valid result after its round's deadline, with late results dropped.
    Late,
    /// The buffered driver's: trained on a version more than `max_staleness` versions old.
    Stale,
    /// It answers no task pending.
    NoTask,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::Invalid,
        Refusal::Late,
        Refusal::Stale,
        Refusal::NoTask,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Invalid => "invalid",
            Refusal::Late => "late",
            Refusal::Stale => "stale",
            Refusal::NoTask => "no_task",
        }
    }
}

#[derive(Default)]
pub struct Tally {
    rejected: BTreeMap<Refusal, u64>,
    partials: BTreeMap<String, u64>,
    reports_refused: u64,
}

impl Tally {
    /// A result was refused.
    pub fn rejected(&mut self, why: Refusal) {
        *self.rejected.entry(why).or_default() += 1;
    }

    /// A partial came from an edge and ended as `outcome` (`merged`, `late`, `stale`...).
    pub fn partial(&mut self, outcome: &str) {
        *self.partials.entry(outcome.to_string()).or_default() += 1;
    }

    /// An edge's report (presence) was refused: forged, unsigned or replayed.
    pub fn report_refused(&mut self) {
        self.reports_refused += 1;
    }

    /// Edges' reports refused so far.
    pub fn reports_refused(&self) -> u64 {
        self.reports_refused
    }

    /// Results refused for `why` so far.
    pub fn rejections(&self, why: Refusal) -> u64 {
        self.rejected.get(&why).copied().unwrap_or(0)
    }

    /// Partials received, by outcome.
    pub fn partials(&self) -> &BTreeMap<String, u64> {
        &self.partials
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_reason_and_partials_by_outcome() {
        let mut t = Tally::default();
        for why in [
            Refusal::Invalid,
            Refusal::Invalid,
            Refusal::Late,
            Refusal::Stale,
            Refusal::NoTask,
            Refusal::Invalid,
        ] {
            t.rejected(why);
        }
        let got: Vec<(&str, u64)> = Refusal::ALL
            .iter()
            .map(|&r| (r.label(), t.rejections(r)))
            .collect();
        assert_eq!(
            got,
            [("invalid", 3), ("late", 1), ("stale", 1), ("no_task", 1)]
        );
        t.partial("merged");
        t.partial("merged");
        t.partial("late");
        assert_eq!(t.partials()["merged"], 2);
        assert_eq!(t.partials()["late"], 1);
    }
}
