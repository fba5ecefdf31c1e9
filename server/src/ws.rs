//! One WebSocket session per client: decode frames, register the client, route results to the
//! round loop. Bad frames get an error frame and a log line; the session carries on.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use canopy_core::protocol::{ClientMsg, ErrorCode, MAX_FRAME_BYTES, PROTOCOL_VERSION, ServerMsg, decode, encode};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::App;
use crate::inbox::Incoming;

/// Frames up to this size are read and then judged by [`decode`], so a client that sends
/// slightly too much gets a clear error; anything larger ends the connection.
const READ_LIMIT: usize = MAX_FRAME_BYTES + (1 << 20);

pub async fn handler(ws: WebSocketUpgrade, State(app): State<Arc<App>>) -> Response {
    ws.max_message_size(READ_LIMIT).max_frame_size(READ_LIMIT).on_upgrade(move |socket| session(socket, app))
}

async fn session(socket: WebSocket, app: Arc<App>) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if sink.send(Message::Binary(frame.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut id: Option<u64> = None;
    let reply_error = |code: ErrorCode, message: String| {
        let _ = tx.send(encode(&ServerMsg::Error { code, message }));
    };
    while let Some(msg) = stream.next().await {
        let bytes = match msg {
            Ok(Message::Binary(b)) => b,
            Ok(Message::Close(_)) => break,
            Ok(Message::Text(_)) => {
                tracing::warn!(client = ?id, "text frame rejected");
                reply_error(ErrorCode::Malformed, "Canopy speaks binary frames only".into());
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(client = ?id, "connection error: {e}");
                break;
            }
        };
        if let Some(c) = id {
            app.hub.lock().unwrap().count_up(c, bytes.len());
        }
        let msg = match decode::<ClientMsg>(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(client = ?id, bytes = bytes.len(), "bad frame: {e}");
                reply_error(e.code(), e.to_string());
                continue;
            }
        };
        match (msg, id) {
            (ClientMsg::Hello(hello), None) => {
                if hello.protocol != PROTOCOL_VERSION {
                    reply_error(ErrorCode::Version, format!("client speaks protocol {}, server {PROTOCOL_VERSION}", hello.protocol));
                    continue;
                }
                let (name, backend, adapter) = (hello.name.clone(), hello.device.backend, hello.device.adapter.clone());
                let c = app.hub.lock().unwrap().join(hello, tx.clone());
                tracing::info!(client = c, %name, %backend, %adapter, "client joined");
                id = Some(c);
            }
            (ClientMsg::Hello(_), Some(_)) => reply_error(ErrorCode::Malformed, "already said hello".into()),
            (_, None) => reply_error(ErrorCode::Malformed, "say hello first".into()),
            (ClientMsg::Progress { round, progress }, Some(c)) => app.hub.lock().unwrap().progress(c, round, progress),
            (ClientMsg::Result(result), Some(c)) => {
                let _ = app.incoming.send(Incoming::Result { client: c, result });
            }
            (ClientMsg::Error { round, message }, Some(c)) => {
                let _ = app.incoming.send(Incoming::Failed { client: c, round, message });
            }
            (ClientMsg::Exchange { round, seq, payload }, Some(c)) => {
                // Answered beside the session's reading, so a slow reply never holds up frames.
                let app = app.clone();
                tokio::spawn(async move {
                    let reply = app.desk.answer(c, round, seq, payload).await;
                    if let ServerMsg::ExchangeFailed { message, .. } = &reply {
                        tracing::warn!(client = c, round, seq, "exchange refused: {message}");
                    }
                    app.hub.lock().unwrap().send(c, &reply);
                });
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
    drop(tx);
    writer.abort();
}
