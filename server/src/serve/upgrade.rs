//! The WebSocket handshake, done here rather than by axum's `WebSocketUpgrade`, so that sessions
//! hold tungstenite's own socket and can write a large frame as fragments (see [`send_frame`]).
//!
//! Why: tungstenite formats a whole message into the connection's write buffer before writing
//! it, and that buffer keeps its capacity. A 0.8 MB task written in one piece left 0.8 MB
//! resident per connection for good (0.8 GB with 1,000 clients); written in 16 KiB fragments,
//! each slicing the round's one shared encoding of the model, the buffer stays near 16 KiB.
//! Browsers and tungstenite clients reassemble fragments into one message (RFC 6455, 5.4).
//!
//! Reading: tungstenite keeps its read buffer as large as the largest frame it received
//! (Chromium sends a 0.8 MB message as 131,000-byte frames; `canopy sim` one 0.8 MB frame), so
//! every connection reads through a [`Gated`] stream that hands it frames of at most 16 KiB and
//! makes large messages wait for a slot ([`crate::serve::gate`]).

use std::future::Future;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{Sink, SinkExt};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error, Message};

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::serve::gate::{self, Gated, Handle};
use crate::serve::outbox::Frame as OutFrame;

pub type Socket = WebSocketStream<Gated<TokioIo<hyper::upgrade::Upgraded>>>;

/// Largest fragment written: the most a connection's write buffer holds of one message.
pub const FRAGMENT: usize = 16 << 10;

/// Read and write buffers per connection. tungstenite's defaults (128 KiB to read, into which it
/// reads whole; 128 KiB before a write) are 1.3 GB of buffers at 10,000 connections. The gate
/// hands tungstenite frames of at most [`gate::SUBFRAME`] bytes; `max_message` bounds a message.
pub fn config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 << 10)
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(gate::SUBFRAME + 16))
}

/// Answers a WebSocket handshake (101) and runs `session` on the socket once upgraded; anything
/// else is a 400 that says what was expected. The socket reads through a [`Gated`] stream
/// whose large messages take slots from `slots`; `max_frame` bounds one client frame.
pub fn upgrade<F, Fut>(
    req: Request,
    config: WebSocketConfig,
    slots: Arc<Semaphore>,
    max_frame: usize,
    session: F,
) -> Response
where
    F: FnOnce(Socket, Handle) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let h = req.headers();
    let is_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version = h
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        == Some("13");
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()));
    let Some(accept) = key.filter(|_| is_ws && version) else {
        return (
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)",
        )
            .into_response();
    };
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on.await {
            Ok(upgraded) => {
                let (io, handle) = Gated::new(TokioIo::new(upgraded), slots, max_frame);
                let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                session(socket, handle).await
            }
            Err(e) => tracing::warn!("WebSocket upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .expect("a valid response")
}

/// Writes one binary message: as is when small, else as fragments of at most `fragment` bytes
/// (the server uses [`FRAGMENT`]) that slice the frame's parts without copying them.
pub async fn send_frame<S>(sink: &mut S, frame: OutFrame, fragment: usize) -> Result<(), Error>
where
    S: Sink<Message, Error = Error> + Unpin,
{
    if frame.len() <= fragment {
        return sink.send(Message::Binary(frame.into_bytes())).await;
    }
    let pieces: Vec<Bytes> = frame
        .into_parts()
        .into_iter()
        .flat_map(|p| {
            (0..p.len())
                .step_by(fragment)
                .map(move |at| p.slice(at..(at + fragment).min(p.len())))
                .collect::<Vec<_>>()
        })
        .collect();
    let last = pieces.len() - 1;
    for (i, piece) in pieces.into_iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        sink.send(Message::Frame(Frame::message(piece, opcode, i == last)))
            .await?;
    }
    Ok(())
}
