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
}

impl Default for Desk {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Desk {
            open: Mutex::new(Open::default()),
            workers: Semaphore::new(cores),
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

    /// Answers one request: the strategy's reply, or a refusal saying why.
    pub async fn answer(&self, client: u64, round: u32, seq: u32, payload: Blob) -> ServerMsg {
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
            Ok(Ok(reply)) => ServerMsg::Exchange {
                round,
                seq,
                payload: Blob(reply),
            },
            Ok(Err(why)) => refuse(ErrorCode::Rejected, why),
            Err(e) => refuse(ErrorCode::Internal, format!("exchange failed: {e}")),
        }
    }
}
