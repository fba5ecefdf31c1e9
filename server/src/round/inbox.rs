//! What WebSocket sessions pass to the round loop.

use std::time::Instant;

use canopy_core::protocol::TaskResult;

use crate::serve::gate::Ticket;

pub enum Incoming {
    /// `at`: when its session read it (the round loop measures how long a result waits).
    /// `slot`: the gate's slot its message took, freed when this is dropped (once folded).
    Result {
        client: u64,
        result: TaskResult,
        at: Instant,
        slot: Ticket,
    },
    /// The client reported that it could not do its task.
    Failed {
        client: u64,
        round: Option<u32>,
        message: String,
    },
    Gone {
        client: u64,
    },
}
