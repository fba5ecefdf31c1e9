//! Counts of what the hub's tables do not keep: results refused, by reason, and edges' partials,
//! by what became of them. They are only ever added to, so the `/metrics` counters made from
//! them never go down (`serve/prometheus.rs`).

use std::collections::BTreeMap;

/// The reasons a result is refused, as `/metrics` labels them.
pub const REJECTION_REASONS: [&str; 5] = ["invalid", "late", "stale", "no_task", "other"];

/// What a refusal's message says of its reason: `invalid` (it failed validation: shape, values,
/// mask, samples), `late` (a valid result after its round's deadline, with late results
/// dropped), `stale` (the buffered driver's: trained on a version past `max_staleness`),
/// `no_task` (it answers no task pending), else `other`. The messages are the round loop's
/// (`round/run.rs`) and the buffered driver's (`round/buffered.rs`); this reads them so that
/// counting needs nothing from either.
pub fn rejection_reason(message: &str) -> &'static str {
    if message.starts_with("result rejected: ") {
        "invalid"
    } else if let Some(why) = message.strip_prefix("result not taken: ") {
        if why.contains("max_staleness") {
            "stale"
        } else {
            "invalid"
        }
    } else if message.contains("after its deadline") {
        "late"
    } else if message.contains("answers no task") || message.contains("no task pending") {
        "no_task"
    } else {
        "other"
    }
}

#[derive(Default)]
pub struct Tally {
    rejected: BTreeMap<&'static str, u64>,
    partials: BTreeMap<String, u64>,
}

impl Tally {
    /// A result was refused with `message`.
    pub fn rejected(&mut self, message: &str) {
        *self.rejected.entry(rejection_reason(message)).or_default() += 1;
    }

    /// A partial came from an edge and ended as `outcome` (`merged`, `late`, `stale`...).
    pub fn partial(&mut self, outcome: &str) {
        *self.partials.entry(outcome.to_string()).or_default() += 1;
    }

    /// Results refused, by reason.
    pub fn rejections(&self) -> &BTreeMap<&'static str, u64> {
        &self.rejected
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
    fn refusals_are_counted_by_the_reason_their_message_gives() {
        let mut t = Tally::default();
        for m in [
            "result rejected: update value 7 is NaN (not finite)",
            "result rejected: claims 0 samples, the client's shard has 40",
            "result for round 3 came after its deadline; late results are dropped",
            "result not taken: result trained on version 2 came 9 versions later, past max_staleness = 4; dropped",
            "result not taken: update value 1 is NaN (not finite)",
            "result for round 77 arrived during round 1; it answers no task",
            "this client has no task pending in round 2",
            "something new",
        ] {
            t.rejected(m);
        }
        let got: Vec<(&str, u64)> = t.rejections().iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(
            got,
            [
                ("invalid", 3),
                ("late", 1),
                ("no_task", 2),
                ("other", 1),
                ("stale", 1)
            ]
        );
        t.partial("merged");
        t.partial("merged");
        t.partial("late");
        assert_eq!(t.partials()["merged"], 2);
        assert_eq!(t.partials()["late"], 1);
    }
}
