//! One WebSocket session per client: decode frames, register the client, route results to the
//! round loop. Bad frames get an error frame and a log line; the session carries on.
//!
//! Connection hygiene ([`crate::serve::limits`]): a connection over the limits in all or per address
//! is answered with an error frame and closed; one that has not said Hello in time is closed; a
//! frame beyond the per-connection rate is dropped with an error frame (at most one a second).
//! Each refusal is logged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use canopy_core::protocol::{
    ClientMsg, ErrorCode, MAX_FRAME_BYTES, PROTOCOL_VERSION, ServerMsg, decode, encode,
};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::App;
use crate::hub::CLOSE;
use crate::round::inbox::Incoming;
use crate::serve::gate::Handle;
use crate::serve::limits::{FrameRate, Slot};
use crate::serve::upgrade::{Socket, send_frame, upgrade};

/// Frames up to this size are read and then judged by [`decode`], so a client that sends
/// slightly too much gets a clear error; anything larger ends the connection.
const READ_LIMIT: usize = MAX_FRAME_BYTES + (1 << 20);

pub async fn handler(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(app): State<Arc<App>>,
    req: Request,
) -> Response {
    let admitted = app.limits.admit(peer.ip());
    let config = crate::serve::upgrade::config(READ_LIMIT);
    let results = app.limits.results.clone();
    upgrade(
        req,
        config,
        results,
        READ_LIMIT,
        move |socket, gate| async move {
            match admitted {
                Ok(slot) => session(socket, gate, app, peer, slot).await,
                Err(why) => refuse(socket, peer, why).await,
            }
        },
    )
}

/// Says why in an error frame, then closes.
async fn refuse(socket: Socket, peer: SocketAddr, why: String) {
    tracing::warn!(%peer, "connection refused: {why}");
    let (mut sink, _) = socket.split();
    let _ = sink
        .send(Message::Binary(
            encode(&ServerMsg::Error {
                code: ErrorCode::Refused,
                message: why,
            })
            .into(),
        ))
        .await;
    let _ = sink.close().await;
}

async fn session(socket: Socket, gate: Handle, app: Arc<App>, peer: SocketAddr, slot: Slot) {
    let _slot = slot; // the connection's place under the limits, given back when the session ends
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = crate::serve::outbox::channel(app.limits.config.max_queued_bytes);
    let (done_tx, mut writer_done) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if frame.is_empty() {
                break; // CLOSE
            }
            // Large frames (tasks) go as fragments of the round's shared encoding.
            if send_frame(&mut sink, frame, crate::serve::upgrade::FRAGMENT)
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
        let _ = done_tx.send(());
    });
    let mut id: Option<u64> = None;
    let reply_error = |code: ErrorCode, message: String| {
        let _ = tx.send(encode(&ServerMsg::Error { code, message }));
    };
    let limits = app.limits.config.clone();
    let hello_by = tokio::time::Instant::now() + Duration::from_millis(limits.hello_timeout_ms);
    let mut rate = FrameRate::new(&limits, Instant::now());
    let (mut over_rate, mut last_rate_notice): (u64, Option<Instant>) = (0, None);
    let whenever = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let slot_timeout = Duration::from_millis(limits.slot_timeout_ms);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        let next = tokio::select! {
            // The writer closed the connection (after a Bye, a ban, or a dead socket): done.
            _ = &mut writer_done => break,
            // A client holding a slot for a large message must finish it in time (reading
            // resumes where it was: the socket keeps a half-read frame).
            _ = check.tick() => {
                if gate.holding_for().is_some_and(|t| t > slot_timeout) {
                    let why = format!("a message took over {:.0} s to arrive; closing", slot_timeout.as_secs_f64());
                    tracing::warn!(client = ?id, %peer, "connection closed: {why}");
                    reply_error(ErrorCode::Refused, why);
                    break;
                }
                continue;
            }
            m = tokio::time::timeout_at(if id.is_none() { hello_by } else { whenever }, stream.next()) => match m {
                Ok(m) => m,
                Err(_) => {
                    let why = format!("no Hello within {:.1} s; closing", limits.hello_timeout_ms as f64 / 1000.0);
                    tracing::warn!(%peer, "connection refused: {why}");
                    reply_error(ErrorCode::Refused, why);
                    break;
                }
            },
        };
        let Some(msg) = next else { break };
        // A large message's slot: kept with a result until the round loop has folded it, given
        // back at once otherwise.
        let ticket = gate.take();
        let now = Instant::now();
        if !rate.allow(now) {
            // Dropped. Say so (and log) at most once a second, so refusals cannot flood either side.
            over_rate += 1;
            if last_rate_notice.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                last_rate_notice = Some(now);
                let why = format!(
                    "too many frames: the limit is {} a second; {over_rate} dropped so far",
                    limits.max_frames_per_sec
                );
                tracing::warn!(client = ?id, %peer, "frame refused: {why}");
                reply_error(ErrorCode::Refused, why);
            }
            continue;
        }
        let bytes = match msg {
            Ok(Message::Binary(b)) => b,
            Ok(Message::Close(_)) => break,
            Ok(Message::Text(_)) => {
                tracing::warn!(client = ?id, "text frame rejected");
                reply_error(
                    ErrorCode::Malformed,
                    "Canopy speaks binary frames only".into(),
                );
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(client = ?id, "connection error: {e}");
                break;
            }
        };
        if let Some(c) = id {
            let mut hub = app.hub.lock().unwrap();
            if hub.is_banned(c) {
                break;
            }
            hub.count_up(c, bytes.len());
        }
        let msg = match decode::<ClientMsg>(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(client = ?id, bytes = bytes.len(), "bad frame: {e}");
                reply_error(e.code(), e.to_string());
                // From a client at work on a task it is most likely its result, broken: the
                // round stops waiting for it rather than holding everyone to the deadline.
                if let Some(c) = id {
                    let training = app.hub.lock().unwrap().client(c).and_then(|cl| {
                        (cl.status == crate::hub::Status::Training)
                            .then_some(cl.last_round)
                            .flatten()
                    });
                    if let Some(round) = training {
                        let _ = app.incoming.send(Incoming::Failed {
                            client: c,
                            round: Some(round),
                            message: format!("sent a frame that does not decode: {e}"),
                        });
                    }
                }
                continue;
            }
        };
        match (msg, id) {
            (ClientMsg::Hello(hello), None) => {
                if hello.protocol != PROTOCOL_VERSION {
                    reply_error(
                        ErrorCode::Version,
                        format!(
                            "client speaks protocol {}, server {PROTOCOL_VERSION}",
                            hello.protocol
                        ),
                    );
                    continue;
                }
                let (name, backend, adapter) = (
                    hello.name.clone(),
                    hello.device.backend,
                    hello.device.adapter.clone(),
                );
                let joined = app
                    .hub
                    .lock()
                    .unwrap()
                    .join_from(hello, tx.clone(), Some(peer.ip()));
                match joined {
                    Ok(c) => {
                        tracing::info!(client = c, %name, %backend, %adapter, %peer, "client joined");
                        id = Some(c);
                    }
                    Err(why) if why.starts_with("too many new clients") => {
                        // Over the address's allowance of new ids: refused for now, and free
                        // to try again later (no Bye).
                        tracing::warn!(%name, %peer, "join refused: {why}");
                        reply_error(ErrorCode::Refused, why);
                        break;
                    }
                    Err(why) => {
                        // A banned id or address: say why, and Bye so the tab does not keep
                        // reconnecting.
                        tracing::warn!(%name, %peer, "join refused: {why}");
                        reply_error(ErrorCode::Banned, why.clone());
                        let _ = tx.send(encode(&ServerMsg::Bye { reason: why }));
                        break;
                    }
                }
            }
            (ClientMsg::Hello(_), Some(_)) => {
                reply_error(ErrorCode::Malformed, "already said hello".into())
            }
            (_, None) => reply_error(ErrorCode::Malformed, "say hello first".into()),
            (ClientMsg::Progress { round, progress }, Some(c)) => {
                app.hub.lock().unwrap().progress(c, round, progress)
            }
            (ClientMsg::Result(result), Some(c)) => {
                let _ = app.incoming.send(Incoming::Result {
                    client: c,
                    result,
                    at: Instant::now(),
                    slot: ticket,
                });
            }
            (ClientMsg::Error { round, message }, Some(c)) => {
                let _ = app.incoming.send(Incoming::Failed {
                    client: c,
                    round,
                    message,
                });
            }
            (
                ClientMsg::Exchange {
                    round,
                    seq,
                    payload,
                },
                Some(c),
            ) => {
                // Answered beside the session's reading, so a slow reply never holds up frames.
                let app = app.clone();
                tokio::spawn(async move {
                    let _ticket = ticket; // the request's bytes are in memory until answered
                    let reply = app.desk.answer(c, round, seq, payload).await;
                    if let ServerMsg::ExchangeFailed { message, .. } = &reply {
                        tracing::warn!(client = c, round, seq, "exchange refused: {message}");
                    }
                    app.hub.lock().unwrap().send(c, &reply);
                });
            }
            (ClientMsg::Examples { train, test }, Some(c)) => {
                if let Err(why) = app.hub.lock().unwrap().examples_reported(c, train, test) {
                    tracing::warn!(client = c, "example counts refused: {why}");
                    reply_error(
                        ErrorCode::Rejected,
                        format!("example counts refused: {why}"),
                    );
                }
            }
            (ClientMsg::Bye, Some(_)) => break,
        }
    }
    if let Some(c) = id {
        tracing::info!(client = c, "client left");
        app.hub.lock().unwrap().disconnect(c);
        app.desk.close_client(c);
        let _ = app.incoming.send(Incoming::Gone { client: c });
    }
    // Let the writer send what is queued (an error saying why, a Bye), then close.
    let _ = tx.send(CLOSE.to_vec());
    drop(tx);
    if tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .is_err()
    {
        tracing::debug!(%peer, "writer did not finish in time");
    }
}
