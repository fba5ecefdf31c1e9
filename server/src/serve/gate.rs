//! The read side of every WebSocket connection, below tungstenite: large messages take a slot,
//! and every frame reaches tungstenite cut into pieces of at most [`SUBFRAME`] bytes.
//!
//! Why, in numbers (book: docs/src/operating/scale.md): with 10,000 clients sampled in one round, each session
//! read its 0.8 MB result as soon as it came and queued it for the round loop, which folds one at
//! a time, so the queue reached 4 GB; and tungstenite keeps each connection's read buffer as
//! large as the largest frame it ever received (a tab sends 131,000-byte frames; tungstenite
//! clients one 0.8 MB frame), another 1.3 GB or more at 10,000 connections.
//!
//! - **Slots.** A message over [`SMALL_MESSAGE`] (results, in practice) may only be read while
//!   its connection holds one of the server's `limits.max_results_in_flight` slots. Without one,
//!   this connection stops reading, so the client's bytes wait in its socket and TCP slows it
//!   down; the server's memory for results is bounded by the slots, not by the clients. A slot
//!   is taken before the first byte past the threshold and kept for the whole message (a
//!   connection never holds part of a message without a slot, so slots cannot deadlock); the
//!   session then hands it on with the result, and the round loop drops it once the result is
//!   folded. Small frames (Hello, progress, errors, pings) never wait.
//! - **Re-framing.** Each frame the client sends is passed on as frames of at most [`SUBFRAME`]
//!   payload bytes: the first keeps its opcode, the rest continue it, the last keeps its FIN.
//!   A client's frames are masked with a key that runs over the payload; each piece gets the
//!   key rotated to where it starts, so the payload bytes pass through untouched. tungstenite
//!   then never buffers more than one piece, and reassembles the message as it would any
//!   fragmented one (RFC 6455, 5.4). Control frames (at most 125 bytes) pass as they are.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// Largest frame payload tungstenite is handed.
pub const SUBFRAME: usize = 16 << 10;
/// Messages up to this size are read without a slot.
pub const SMALL_MESSAGE: u64 = 64 << 10;

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A large message's slot (a ticket for it), kept while its contents are in memory (dropping it frees the slot).
#[derive(Debug, Default)]
pub struct Ticket(Vec<OwnedSemaphorePermit>);

impl Ticket {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Default)]
struct Shared {
    /// Slots of messages read whole, for the session to take.
    ready: Vec<OwnedSemaphorePermit>,
    /// Since when this connection holds a slot for a message it is still reading.
    held_since: Option<Instant>,
}

/// The session's side of a [`Gated`] connection.
#[derive(Clone, Default)]
pub struct Handle(Arc<Mutex<Shared>>);

impl Handle {
    /// The slot of the message just received, if it was a large one.
    pub fn take(&self) -> Ticket {
        Ticket(std::mem::take(&mut self.0.lock().unwrap().ready))
    }

    /// How long this connection has held a slot for a message it has not finished sending.
    pub fn holding_for(&self) -> Option<Duration> {
        self.0.lock().unwrap().held_since.map(|t| t.elapsed())
    }
}

/// A connection's byte stream as tungstenite reads it (see the module's comment).
pub struct Gated<S> {
    inner: S,
    slots: Arc<Semaphore>,
    max_frame: u64,
    shared: Arc<Mutex<Shared>>,
    /// The client's frame header being read.
    hdr: [u8; 14],
    have: usize,
    /// A piece's header waiting to be handed on.
    out: [u8; 8],
    out_len: usize,
    out_pos: usize,
    /// Inside a client frame: its first byte (FIN, RSV, opcode), mask, and payload bytes left
    /// to announce as pieces; `pass`: bytes of the current piece still to pass through.
    in_frame: bool,
    b0: u8,
    masked: bool,
    mask: [u8; 4],
    offset: u64,
    left: u64,
    first_piece: bool,
    pass: usize,
    /// Data payload bytes of the current message so far.
    message: u64,
    slot: Option<OwnedSemaphorePermit>,
    acquiring: Option<Acquire>,
}

impl<S> Gated<S> {
    /// Wraps `inner`; large messages take slots from `slots`; a frame announcing more than
    /// `max_frame` payload bytes ends the connection with an error.
    pub fn new(inner: S, slots: Arc<Semaphore>, max_frame: usize) -> (Gated<S>, Handle) {
        let handle = Handle::default();
        let gated = Gated {
            inner,
            slots,
            max_frame: max_frame as u64,
            shared: handle.0.clone(),
            hdr: [0; 14],
            have: 0,
            out: [0; 8],
            out_len: 0,
            out_pos: 0,
            in_frame: false,
            b0: 0,
            masked: false,
            mask: [0; 4],
            offset: 0,
            left: 0,
            first_piece: false,
            pass: 0,
            message: 0,
            slot: None,
            acquiring: None,
        };
        (gated, handle)
    }

    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let slots = self.slots.clone();
        let acquiring = self
            .acquiring
            .get_or_insert_with(|| Box::pin(slots.acquire_owned()));
        let permit = ready!(acquiring.as_mut().poll(cx));
        self.acquiring = None;
        let permit = permit.map_err(|_| io::Error::other("the server is shutting down"))?;
        self.slot = Some(permit);
        self.shared.lock().unwrap().held_since = Some(Instant::now());
        Poll::Ready(Ok(()))
    }

    /// The header of the next piece of the current frame: at most [`SUBFRAME`] payload bytes,
    /// the frame's opcode on its first piece only, FIN on its last, the mask key rotated to
    /// where the piece starts.
    fn next_piece(&mut self) {
        let len = self.left.min(SUBFRAME as u64) as usize;
        let last = self.left == len as u64;
        let fin = self.b0 & 0x80 != 0 && last;
        let (rsv, opcode) = if self.first_piece {
            (self.b0 & 0x70, self.b0 & 0x0f)
        } else {
            (0, 0)
        };
        self.out[0] = ((fin as u8) << 7) | rsv | opcode;
        let mask_bit = if self.masked { 0x80 } else { 0 };
        let mut i = if len < 126 {
            self.out[1] = mask_bit | len as u8;
            2
        } else {
            self.out[1] = mask_bit | 126;
            self.out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        };
        if self.masked {
            for j in 0..4 {
                self.out[i + j] = self.mask[(self.offset as usize + j) % 4];
            }
            i += 4;
        }
        self.out_len = i;
        self.out_pos = 0;
        self.left -= len as u64;
        self.pass = len;
        self.first_piece = false;
    }

    /// The client's frame has been passed on whole.
    fn frame_done(&mut self) {
        self.in_frame = false;
        let data = self.b0 & 0x08 == 0;
        if data && self.b0 & 0x80 != 0 {
            // The message is complete: its slot (if it took one) goes with it to the session.
            self.message = 0;
            let mut shared = self.shared.lock().unwrap();
            shared.held_since = None;
            if let Some(p) = self.slot.take() {
                shared.ready.push(p);
            }
        }
    }

    /// Parses a complete client header in `hdr[..len]`.
    fn start_frame(&mut self, len: usize) -> io::Result<()> {
        let h = &self.hdr[..len];
        let len7 = h[1] & 0x7f;
        let payload = match len7 {
            126 => u16::from_be_bytes([h[2], h[3]]) as u64,
            127 => u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
            n => n as u64,
        };
        if payload > self.max_frame {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a frame of {payload} bytes exceeds the {}-byte limit",
                    self.max_frame
                ),
            ));
        }
        self.b0 = h[0];
        self.masked = h[1] & 0x80 != 0;
        if self.masked {
            self.mask.copy_from_slice(&h[len - 4..len]);
        }
        if self.b0 & 0x08 == 0 {
            self.message += payload;
        }
        self.in_frame = true;
        self.left = payload;
        self.offset = 0;
        self.first_piece = true;
        self.have = 0;
        Ok(())
    }
}

/// A header's length from its first two bytes.
fn header_len(h: &[u8]) -> usize {
    let ext = match h[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if h[1] & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            // A piece's header first.
            if me.out_pos < me.out_len {
                let n = (me.out_len - me.out_pos).min(buf.remaining());
                buf.put_slice(&me.out[me.out_pos..me.out_pos + n]);
                me.out_pos += n;
                if me.pass == 0 && me.left == 0 && me.out_pos == me.out_len && me.in_frame {
                    me.frame_done(); // an empty frame
                }
                return Poll::Ready(Ok(()));
            }
            // Then its payload, as it comes, once the message has the slot it needs.
            if me.pass > 0 {
                if me.message > SMALL_MESSAGE && me.slot.is_none() {
                    ready!(me.poll_slot(cx))?;
                }
                let want = me.pass.min(buf.remaining());
                let n = {
                    let mut piece = buf.take(want);
                    let at = piece.filled().as_ptr();
                    ready!(Pin::new(&mut me.inner).poll_read(cx, &mut piece))?;
                    assert_eq!(piece.filled().as_ptr(), at, "the read buffer was swapped");
                    piece.filled().len()
                };
                if n == 0 {
                    return Poll::Ready(Ok(())); // the end of the stream: tungstenite says so
                }
                // SAFETY: the inner reader initialised and filled `n` bytes of `buf`'s unfilled
                // part through `take` (the same memory; checked above).
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                me.pass -= n;
                me.offset += n as u64;
                if me.pass == 0 && me.left == 0 {
                    me.frame_done();
                }
                return Poll::Ready(Ok(()));
            }
            if me.in_frame {
                me.next_piece();
                continue;
            }
            // A new client frame: its header, read exactly.
            let need = if me.have < 2 { 2 } else { header_len(&me.hdr) };
            if me.have < need {
                let mut rb = ReadBuf::new(&mut me.hdr[me.have..need]);
                ready!(Pin::new(&mut me.inner).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                if n == 0 {
                    if me.have == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                me.have += n;
                continue;
            }
            me.start_frame(need)?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    /// A client (tungstenite, so masked frames) on one end of a pipe, the server's gated
    /// tungstenite on the other.
    async fn pair(
        slots: usize,
    ) -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WebSocketStream<Gated<tokio::io::DuplexStream>>,
        Handle,
        Arc<Semaphore>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let sem = Arc::new(Semaphore::new(slots));
        let (gated, handle) = Gated::new(b, sem.clone(), 8 << 20);
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4 << 10)
            .max_frame_size(Some(SUBFRAME + 16));
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(gated, Role::Server, Some(config)).await;
        (client, server, handle, sem)
    }

    fn payload(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[tokio::test]
    async fn messages_pass_whole_in_pieces_tungstenite_accepts() {
        // The server's tungstenite refuses frames over SUBFRAME + 16 bytes: every message
        // below only arrives because the gate cut it into pieces.
        let (mut client, mut server, handle, _) = pair(1).await;
        let big = payload(300_001, 7); // one 300 KB frame
        let small = payload(100, 1);
        let odd = payload(SUBFRAME * 5 + 3, 9); // 80 KB in 5 client frames
        client.send(Message::binary(big.clone())).await.unwrap();
        client.send(Message::binary(small.clone())).await.unwrap();
        client
            .send(Message::Ping(vec![1, 2, 3].into()))
            .await
            .unwrap();
        // A message already fragmented by the client (as Chromium sends it).
        for (i, part) in odd.chunks(SUBFRAME + 1).enumerate() {
            let opcode = if i == 0 {
                OpCode::Data(Data::Binary)
            } else {
                OpCode::Data(Data::Continue)
            };
            let last = (i + 1) * (SUBFRAME + 1) >= odd.len();
            client
                .send(Message::Frame(Frame::message(part.to_vec(), opcode, last)))
                .await
                .unwrap();
        }
        client
            .send(Message::binary(Vec::<u8>::new()))
            .await
            .unwrap();
        let m = server.next().await.unwrap().unwrap();
        assert_eq!(m.into_data().as_ref(), big.as_slice());
        assert!(
            !handle.take().is_empty(),
            "a large message carries its slot"
        );
        assert!(handle.holding_for().is_none());
        let m = server.next().await.unwrap().unwrap();
        assert_eq!(m.into_data().as_ref(), small.as_slice());
        assert!(handle.take().is_empty(), "a small one takes none");
        assert!(matches!(
            server.next().await.unwrap().unwrap(),
            Message::Ping(_)
        ));
        let m = server.next().await.unwrap().unwrap();
        assert_eq!(m.into_data().as_ref(), odd.as_slice());
        assert!(!handle.take().is_empty());
        let m = server.next().await.unwrap().unwrap();
        assert!(m.into_data().is_empty(), "an empty message");
    }

    #[tokio::test]
    async fn a_large_message_waits_for_a_slot_small_ones_do_not() {
        let (mut client, mut server, handle, sem) = pair(1).await;
        // Someone else holds the only slot.
        let taken = sem.clone().acquire_owned().await.unwrap();
        client
            .send(Message::binary(payload(200_000, 3)))
            .await
            .unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(300), server.next()).await;
        assert!(waited.is_err(), "read a large message without a slot");
        assert!(handle.holding_for().is_none());
        drop(taken);
        let m = server.next().await.unwrap().unwrap();
        assert_eq!(m.len(), 200_000);
        let slot = handle.take();
        assert_eq!(sem.available_permits(), 0, "the slot goes with the message");
        drop(slot);
        assert_eq!(sem.available_permits(), 1);
        // With no slot free, small messages still pass.
        let _taken = sem.clone().acquire_owned().await.unwrap();
        client.send(Message::binary(payload(500, 2))).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), server.next())
            .await
            .expect("a small message never waits")
            .unwrap()
            .unwrap();
        assert_eq!(m.len(), 500);
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_ends_the_connection() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (gated, _) = Gated::new(b, Arc::new(Semaphore::new(1)), 1000);
        let mut client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let mut server = WebSocketStream::from_raw_socket(gated, Role::Server, None).await;
        client
            .send(Message::binary(payload(5000, 1)))
            .await
            .unwrap();
        let e = server.next().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("exceeds the 1000-byte limit"), "{e}");
    }
}
