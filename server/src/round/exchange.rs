//! The server side of the in-round exchange: a client sends a request within its task (split
//! learning's activations, one per batch) and awaits the reply.
//!
//! Requests never go through the round loop. The WebSocket session checks them against the
//! round in progress, then runs the strategy's [`Exchange`] on the blocking pool, at most one
//! request per core at a time, so many tabs are served at once and the round loop never waits.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use canopy_core::protocol::{Blob, ErrorCode, ServerMsg};
use canopy_core::strategy::Exchange;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::Semaphore;

/// The round whose clients may exchange now, and who answers them.
#[derive(Default)]
struct Open {
    round: u32,
    handler: Option<Arc<dyn Exchange>>,
    /// Clients with a task in this round.
    clients: BTreeSet<u64>,
}

pub struct Desk {
    open: Mutex<Open>,
    workers: Semaphore,
    /// Seconds from a request's arrival to its reply (waiting for a worker, then the
    /// strategy's handler), for `/metrics`; refusals are not timed.
    latency: Histogram,
}

impl Default for Desk {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Desk {
            open: Mutex::new(Open::default()),
            workers: Semaphore::new(cores),
            // 0.5 ms to about 16 s.
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }
}

impl Desk {
    /// Opens `round` for the clients given tasks in it (`handler` None: the strategy takes no
    /// in-round requests).
    pub fn open(
        &self,
        round: u32,
        handler: Option<Arc<dyn Exchange>>,
        clients: impl IntoIterator<Item = u64>,
    ) {
        *self.open.lock().unwrap() = Open {
            round,
            handler,
            clients: clients.into_iter().collect(),
        };
    }

    /// A client's task ended (result, failure, deadline or disconnect): no more requests from it.
    pub fn close_client(&self, client: u64) {
        self.open.lock().unwrap().clients.remove(&client);
    }

    pub fn close(&self) {
        *self.open.lock().unwrap() = Open::default();
    }

    /// How long answered requests took (a handle on the same histogram).
    pub fn latency(&self) -> Histogram {
        self.latency.clone()
    }

    /// Answers one request: the strategy's reply, or a refusal saying why.
    pub async fn answer(&self, client: u64, round: u32, seq: u32, payload: Blob) -> ServerMsg {
        let arrived = std::time::Instant::now();
        let refuse = |code, message: String| ServerMsg::ExchangeFailed {
            round,
            seq,
            code,
            message,
        };
        let handler = {
            let open = self.open.lock().unwrap();
            if round != open.round {
                return refuse(
                    ErrorCode::Rejected,
                    format!(
                        "exchange for round {round}, but round {} is in progress",
                        open.round
                    ),
                );
            }
            if !open.clients.contains(&client) {
                return refuse(
                    ErrorCode::Rejected,
                    format!("no task of yours is in progress in round {round}"),
                );
            }
            match &open.handler {
                Some(h) => h.clone(),
                None => {
                    return refuse(
                        ErrorCode::Rejected,
                        "this run's strategy takes no in-round requests".into(),
                    );
                }
            }
        };
        let Ok(_permit) = self.workers.acquire().await else {
            return refuse(ErrorCode::Internal, "server shutting down".into());
        };
        match tokio::task::spawn_blocking(move || handler.handle(round, client, seq, &payload.0))
            .await
        {
            Ok(Ok(reply)) => {
                self.latency.observe(arrived.elapsed().as_secs_f64());
                ServerMsg::Exchange {
                    round,
                    seq,
                    payload: Blob(reply),
                }
            }
            Ok(Err(why)) => refuse(ErrorCode::Rejected, why),
            Err(e) => refuse(ErrorCode::Internal, format!("exchange failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    struct Echo;

    impl Exchange for Echo {
        fn handle(&self, _: u32, _: u64, _: u32, request: &[u8]) -> Result<Vec<u8>, String> {
            Ok(request.to_vec())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answered_requests_are_timed_and_refusals_are_not() {
        let desk = Desk::default();
        desk.open(1, Some(Arc::new(Echo)), [5]);
        for seq in 0..3 {
            let reply = desk.answer(5, 1, seq, Blob(vec![1, 2])).await;
            assert!(matches!(reply, ServerMsg::Exchange { payload, .. } if payload.0 == [1, 2]));
        }
        let refused = desk.answer(6, 1, 0, Blob(vec![])).await;
        assert!(matches!(refused, ServerMsg::ExchangeFailed { .. }));
        let mut r = Registry::default();
        r.register("exchange_seconds", "", desk.latency());
        let mut text = String::new();
        encode(&mut text, &r).unwrap();
        assert!(text.contains("exchange_seconds_count 3\n"), "{text}");
    }
}
