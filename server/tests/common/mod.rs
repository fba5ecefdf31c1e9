//! What the server's integration tests share: a run on the MNIST digits with native clients.

#![allow(dead_code)]

use std::path::PathBuf;

use canopy_core::data::partition::Partition;
use canopy_server::config::Config;

/// A run of `rounds` rounds on the digits, IID over `shards` clients that must all be
/// connected, on a free port, ending when done; its folder is under `<temp>/<folder>-<pid>`.
pub fn config(name: &str, rounds: u32, shards: usize, folder: &str) -> Config {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut c = Config::default();
    c.data.path = Some(root.join(canopy_server::datasets::DIGITS_DIR));
    c.data.partition = Partition::Iid;
    c.data.shards = shards;
    c.run.rounds = rounds;
    c.run.min_clients = shards;
    c.run.linger = false;
    c.run.name = Some(name.into());
    c.run.out_dir = std::env::temp_dir().join(format!("{folder}-{}", std::process::id()));
    c.server.port = 0;
    c.strategy.config.lr = 0.1;
    c
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
