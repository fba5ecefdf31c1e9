//! Canopy's shared core: models, training, data, partitioning, strategies, aggregation and the
//! wire protocol. No I/O: it compiles for native targets and for wasm32 alike.
//!
//! The rooms, from the bottom up: [`bytes`] (raw tensors and bit vectors), [`model`] (the
//! architecture, the forward pass, the flat model state, surgery, SynFlow), [`data`] (datasets
//! and partitions), [`train`] (the one training loop and its pluggable steps), [`protocol`] (the
//! wire messages), [`codec`] (every tensor payload), [`aggregate`] (accepted results, the robust
//! layer, running sums, privacy accounting), [`strategy`] (the methods), and [`client`] (the runtime a tab and a
//! native client share).

pub mod aggregate;
pub mod bytes;
pub mod client;
pub mod codec;
pub mod data;
pub mod fuzzing;
pub mod metric_keys;
pub mod model;
pub mod protocol;
pub mod strategy;
pub mod train;
