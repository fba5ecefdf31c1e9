//! Frames waiting to be written to one connection, with a cap on their bytes: a client that
//! stops reading cannot make the server hold an ever-growing queue for it. A frame that would go
//! over the cap is refused (and logged by the caller); the client misses it, as if it had gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// One frame to write, in parts whose concatenation is the frame: a round's task frames share
/// the encoded model (one `Bytes` for every client), so queuing a task for 1,000 clients does not
/// copy the model 1,000 times. An empty frame asks the writer to close the connection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Frame {
    parts: Vec<Bytes>,
}

impl Frame {
    pub fn from_parts(parts: Vec<Bytes>) -> Frame {
        Frame { parts }
    }

    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn into_parts(self) -> Vec<Bytes> {
        self.parts
    }

    /// The parts as one buffer: no copy for a frame of one part, one copy (made just before it
    /// is written) otherwise.
    pub fn into_bytes(mut self) -> Bytes {
        if self.parts.len() == 1 {
            return self.parts.pop().expect("one part");
        }
        let mut out = Vec::with_capacity(self.len());
        for p in &self.parts {
            out.extend_from_slice(p);
        }
        out.into()
    }
}

impl From<Vec<u8>> for Frame {
    fn from(v: Vec<u8>) -> Frame {
        Frame {
            parts: vec![v.into()],
        }
    }
}

#[derive(Clone, Debug)]
pub struct Outbox {
    tx: UnboundedSender<Frame>,
    queued: Arc<AtomicUsize>,
    cap: usize,
}

pub struct Inbox {
    rx: UnboundedReceiver<Frame>,
    queued: Arc<AtomicUsize>,
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The connection's writer is gone.
    Closed,
    /// This many bytes are already waiting.
    Full(usize),
}

pub fn channel(cap: usize) -> (Outbox, Inbox) {
    let (tx, rx) = unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Outbox {
            tx,
            queued: queued.clone(),
            cap,
        },
        Inbox { rx, queued },
    )
}

impl Outbox {
    pub fn send(&self, frame: impl Into<Frame>) -> Result<(), Refused> {
        let frame = frame.into();
        let len = frame.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        // One frame always fits an empty queue, whatever its size (frames are capped elsewhere).
        if before > 0 && before + len > self.cap {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(Refused::Full(before));
        }
        self.tx.send(frame).map_err(|_| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            Refused::Closed
        })
    }
}

impl Inbox {
    /// The next frame to write; its bytes no longer count against the cap.
    pub async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_that_does_not_read_is_capped() {
        let (out, mut inbox) = channel(100);
        assert_eq!(out.send(vec![0; 60]), Ok(()));
        assert_eq!(out.send(vec![0; 30]), Ok(()));
        assert_eq!(
            out.send(vec![0; 30]),
            Err(Refused::Full(90)),
            "over the cap: refused"
        );
        assert_eq!(inbox.recv().await.unwrap().len(), 60);
        assert_eq!(
            out.send(vec![0; 30]),
            Ok(()),
            "written frames free their bytes"
        );
        drop(inbox);
        assert_eq!(out.send(vec![0; 1]), Err(Refused::Closed));
        // A single frame larger than the cap still goes to an empty queue.
        let (out, _inbox) = channel(10);
        assert_eq!(out.send(vec![0; 50]), Ok(()));
    }
}
