//! What WebSocket sessions pass to the round loop.

use canopy_core::protocol::TaskResult;

pub enum Incoming {
    Result { client: u64, result: TaskResult },
    /// The client reported that it could not do its task.
    Failed { client: u64, round: Option<u32>, message: String },
    Gone { client: u64 },
}
