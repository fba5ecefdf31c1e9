//! Any bytes a client may send: decode, accept against real tasks of every upload kind, then the
//! robust aggregation layer. The same path as the property test in `core/tests/frames.rs`.
#![no_main]

use std::sync::OnceLock;

use canopy_core::fuzzing::{Target, feed, targets};
use libfuzzer_sys::fuzz_target;

static TARGETS: OnceLock<Vec<Target>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    feed(data, TARGETS.get_or_init(targets));
});
