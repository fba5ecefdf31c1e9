//! The round: the loop that samples clients, sends tasks, collects results and aggregates
//! ([`run`]), its asynchronous sibling that steps the model every K results instead
//! ([`buffered`], FedBuff), the desk that answers in-round requests beside it ([`exchange`]), results on their
//! way in ([`inbox`]), evaluation on the server's splits ([`evaluate`]), per-round records
//! ([`record`]) and the run folder's checkpoint ([`checkpoint`]).

pub mod buffered;
pub mod checkpoint;
pub mod evaluate;
pub mod exchange;
pub mod inbox;
pub mod record;
pub mod run;
