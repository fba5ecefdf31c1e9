//! Canopy's shared core: models, training, data, partitioning, strategies, aggregation and the
//! wire protocol. No I/O: it compiles for native targets and for wasm32 alike.

pub mod aggregate;
pub mod arch;
pub mod client;
pub mod codec;
pub mod data;
pub mod fuzzing;
pub mod metric_keys;
pub mod model;
pub mod partition;
pub mod positions;
pub mod protocol;
pub mod robust;
pub mod split;
pub mod state;
pub mod step;
pub mod strategy;
pub mod surgery;
pub mod synflow;
pub mod train;
