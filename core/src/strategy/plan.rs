//! A round as a strategy plans it: the tasks, whether and how the server may fold results as
//! they come, the kind of round for dashboards, and who answers in-round requests. The round
//! loop reads everything about a round from its plan, so nothing depends on asking the strategy
//! again later (and an edge builds one from the root's announcement).

use std::borrow::Cow;
use std::sync::Arc;

use crate::aggregate::stream::Fold;
use crate::protocol::Task;

/// What kind of round a strategy is running, for dashboards. Methods add their own by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Training,
    /// A method's own kind of round (AutoFLIP's "exploring"), or one named by a root.
    Own(Cow<'static, str>),
}

impl Phase {
    pub fn name(&self) -> &str {
        match self {
            Phase::Training => "training",
            Phase::Own(name) => name,
        }
    }

    /// The phase a name stands for (as [`Phase::name`] gave it).
    pub fn named(name: impl Into<Cow<'static, str>>) -> Phase {
        let name = name.into();
        if name == "training" {
            Phase::Training
        } else {
            Phase::Own(name)
        }
    }
}

/// A strategy's per-request work within a round: a client sends a request in the middle of its
/// task and awaits the reply (split learning's per-batch back pass; the echo strategy's loss
/// gradient). The server runs it on a worker pool, for many clients at once, so it takes
/// `&self`: per-client state needs its own lock.
pub trait Exchange: Send + Sync {
    fn handle(&self, round: u32, client: u64, seq: u32, request: &[u8]) -> Result<Vec<u8>, String>;
}

/// One round, as `Strategy::configure_round` plans it.
pub struct RoundPlan {
    /// Each sampled client's task.
    pub tasks: Vec<(u64, Task)>,
    /// Which running sums the server may fold results into as they arrive (streaming
    /// aggregation, then `Strategy::aggregate_sum`). `None`: the server keeps every result
    /// until the round ends and calls `Strategy::aggregate`.
    pub fold: Option<Fold>,
    /// The kind of round, for dashboards.
    pub phase: Phase,
    /// Who answers in-round requests (`None`: the round takes none, and the server refuses them).
    pub exchange: Option<Arc<dyn Exchange>>,
}

impl RoundPlan {
    /// A training round whose results the server keeps until the round ends.
    pub fn buffered(tasks: Vec<(u64, Task)>) -> RoundPlan {
        RoundPlan {
            tasks,
            fold: None,
            phase: Phase::Training,
            exchange: None,
        }
    }

    /// A training round the server may aggregate from the running sums `fold` names.
    pub fn streamed(tasks: Vec<(u64, Task)>, fold: Fold) -> RoundPlan {
        RoundPlan {
            fold: Some(fold),
            ..RoundPlan::buffered(tasks)
        }
    }

    pub fn with_phase(self, phase: Phase) -> RoundPlan {
        RoundPlan { phase, ..self }
    }

    pub fn with_exchange(self, exchange: Arc<dyn Exchange>) -> RoundPlan {
        RoundPlan {
            exchange: Some(exchange),
            ..self
        }
    }

    /// The round's deadline: the latest of its tasks'.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.tasks.iter().map(|(_, t)| t.deadline_ms).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_go_by_name_and_back() {
        assert_eq!(Phase::named("training"), Phase::Training);
        let own = Phase::named(String::from("exploring"));
        assert_eq!(own, Phase::Own("exploring".into()));
        assert_eq!(own.name(), "exploring");
        assert_eq!(
            Phase::named(Phase::Training.name().to_string()),
            Phase::Training
        );
    }
}
