//! What a training loop needs from where it runs: a clock, a place to report progress, and (for a
//! remote loss) a way to ask the server. A leaf, so the steps can use it without the loop.

use serde::{Deserialize, Serialize};

use crate::bytes::Blob;

/// What a client reports about its own training.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub epoch: u32,
    pub epochs: u32,
    pub step: u32,
    pub steps: u32,
    /// Mean training loss since the last report.
    pub loss: f32,
    pub samples_per_sec: f32,
}

/// The environment a training loop runs in.
pub trait Host {
    /// Milliseconds from an arbitrary origin (performance.now() in a browser).
    fn now_ms(&self) -> f64;
    /// Called every few steps. A browser host yields to its event loop here.
    fn progress(&mut self, p: &Progress) -> impl std::future::Future<Output = ()>;
    /// Sends request `seq` of the task to the server and awaits the reply (a remote loss).
    fn exchange(
        &mut self,
        seq: u32,
        request: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Blob, String>> {
        let _ = (seq, request);
        async { Err("this client has no server to exchange with".to_string()) }
    }
}
