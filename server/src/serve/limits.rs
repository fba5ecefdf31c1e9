//! Connection hygiene: how many WebSocket connections at once (in all and per address), how
//! many frames per second one connection may send, and how long it may take to say Hello.
//! Every refusal is answered with an error frame saying which limit, and logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The `[limits]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Close a connection that has not said Hello within this many milliseconds.
    pub hello_timeout_ms: u64,
    /// Most WebSocket connections at once (0: no limit).
    pub max_connections: usize,
    /// Most connections at once from one IP address (0: no limit).
    pub max_per_address: usize,
    /// Loopback addresses (this machine: native simulations, tests) are exempt from
    /// `max_per_address`, since every local client shares one address.
    pub loopback_exempt: bool,
    /// Frames per second one connection may send on average (0: no limit); bursts of
    /// `frame_burst` are allowed. A tab reports progress at most every 8 steps.
    pub max_frames_per_sec: f64,
    /// Frames one connection may send at once above `max_frames_per_sec` (a token bucket's size).
    pub frame_burst: f64,
    /// Bytes of frames waiting to be written to one connection; past this a frame to a client
    /// that does not read is dropped, so a stalled client cannot grow the server's memory.
    pub max_queued_bytes: usize,
    /// Large messages (results) read at once, over all connections: a connection without a
    /// slot stops reading until one is free, so results waiting for the round loop take at
    /// most this many messages' memory whatever the number of clients (`serve::gate`).
    pub max_results_in_flight: usize,
    /// A connection that holds a slot this long without finishing its message is closed (a
    /// client trickling bytes cannot keep a slot).
    pub slot_timeout_ms: u64,
    /// The kernel's send and receive buffers for each connection, in bytes (0: the kernel's own
    /// autotuning, up to 4 MB to send and 32 MB to receive by default). A task that does not fit
    /// waits in the client's outbox, which shares the round's one encoding of the model; a
    /// result waiting for a slot waits in the client's socket.
    pub socket_buffer: usize,
    /// New client ids one address may take a minute (0: no limit); loopback is exempt when
    /// `loopback_exempt`. A reconnect that resumes its id is not a new one.
    pub max_new_ids_per_minute: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            hello_timeout_ms: 5_000,
            max_connections: 2_000,
            max_per_address: 32,
            loopback_exempt: true,
            max_frames_per_sec: 200.0,
            frame_burst: 400.0,
            max_queued_bytes: 48 << 20,
            max_results_in_flight: 16,
            slot_timeout_ms: 60_000,
            max_new_ids_per_minute: 60,
            socket_buffer: 128 << 10,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.hello_timeout_ms == 0 {
            return Err("limits.hello_timeout_ms must be positive".into());
        }
        if !(self.max_frames_per_sec >= 0.0 && self.max_frames_per_sec.is_finite()) {
            return Err("limits.max_frames_per_sec must be a non-negative number".into());
        }
        if self.max_results_in_flight == 0 {
            return Err("limits.max_results_in_flight must be at least 1".into());
        }
        if self.slot_timeout_ms == 0 {
            return Err("limits.slot_timeout_ms must be positive".into());
        }
        if self.max_frames_per_sec > 0.0 && self.frame_burst < 1.0 {
            return Err("limits.frame_burst must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// Open connections, counted. [`Limits::admit`] hands out a [`Slot`] that gives its place back
/// when dropped, however the session ends.
pub struct Limits {
    pub config: LimitsConfig,
    counts: Mutex<Counts>,
    /// The gate's slots for large messages (`max_results_in_flight`), shared by every connection.
    pub results: Arc<tokio::sync::Semaphore>,
}

pub struct Slot {
    limits: Arc<Limits>,
    addr: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.limits.counts.lock().unwrap();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_address.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                c.per_address.remove(&self.addr);
            }
        }
    }
}

impl Limits {
    pub fn new(config: LimitsConfig) -> Arc<Limits> {
        Arc::new(Limits {
            results: Arc::new(tokio::sync::Semaphore::new(config.max_results_in_flight)),
            config,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// A place for a new connection from `addr`, or the reason there is none.
    pub fn admit(self: &Arc<Self>, addr: IpAddr) -> Result<Slot, String> {
        let mut c = self.counts.lock().unwrap();
        let cfg = &self.config;
        if cfg.max_connections > 0 && c.total >= cfg.max_connections {
            return Err(format!(
                "the server is full: {} connections at once is its limit; try again later",
                cfg.max_connections
            ));
        }
        let here = c.per_address.get(&addr).copied().unwrap_or(0);
        let exempt = cfg.loopback_exempt && addr.is_loopback();
        if cfg.max_per_address > 0 && !exempt && here >= cfg.max_per_address {
            return Err(format!(
                "too many connections from {addr}: {} at once is the limit per address",
                cfg.max_per_address
            ));
        }
        c.total += 1;
        *c.per_address.entry(addr).or_default() += 1;
        Ok(Slot {
            limits: self.clone(),
            addr,
        })
    }

    /// Connections open now, in all.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap().total
    }
}

/// A token bucket: `rate` frames per second on average, bursts up to `burst`.
pub struct FrameRate {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl FrameRate {
    pub fn new(config: &LimitsConfig, now: Instant) -> FrameRate {
        FrameRate {
            rate: config.max_frames_per_sec,
            burst: config.frame_burst.max(1.0),
            tokens: config.frame_burst.max(1.0),
            last: now,
        }
    }

    /// Whether a frame arriving at `now` is within the limit (and counts it).
    pub fn allow(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connections_in_all_and_per_address() {
        let limits = Limits::new(LimitsConfig {
            max_connections: 4,
            max_per_address: 2,
            ..LimitsConfig::default()
        });
        let a1 = limits.admit(ip("10.0.0.1")).unwrap();
        let _a2 = limits.admit(ip("10.0.0.1")).unwrap();
        let e = limits.admit(ip("10.0.0.1")).err().unwrap();
        assert!(e.contains("10.0.0.1") && e.contains("2 at once"), "{e}");
        // Loopback is exempt from the per-address limit, not from the total.
        let _l1 = limits.admit(ip("127.0.0.1")).unwrap();
        let _l2 = limits.admit(ip("::1")).unwrap();
        assert_eq!(limits.open(), 4);
        assert!(limits.admit(ip("10.0.0.2")).err().unwrap().contains("full"));
        // A finished session gives its place back.
        drop(a1);
        assert_eq!(limits.open(), 3);
        let _a3 = limits.admit(ip("10.0.0.1")).unwrap();
        let strict = Limits::new(LimitsConfig {
            max_per_address: 1,
            loopback_exempt: false,
            ..LimitsConfig::default()
        });
        let _s = strict.admit(ip("127.0.0.1")).unwrap();
        assert!(strict.admit(ip("127.0.0.1")).is_err());
        let open = Limits::new(LimitsConfig {
            max_connections: 0,
            max_per_address: 0,
            ..LimitsConfig::default()
        });
        let many: Vec<Slot> = (0..100)
            .map(|_| open.admit(ip("10.0.0.9")).unwrap())
            .collect();
        assert_eq!(open.open(), 100);
        drop(many);
        assert_eq!(open.open(), 0);
    }

    #[test]
    fn frame_rate_token_bucket() {
        let cfg = LimitsConfig {
            max_frames_per_sec: 10.0,
            frame_burst: 5.0,
            ..LimitsConfig::default()
        };
        let t0 = Instant::now();
        let mut r = FrameRate::new(&cfg, t0);
        // A burst of 5 passes at once, the 6th does not.
        assert!((0..5).all(|_| r.allow(t0)));
        assert!(!r.allow(t0));
        // 10 per second: after 0.25 s two more (2.5 tokens), then none.
        let t1 = t0 + Duration::from_millis(250);
        assert!(r.allow(t1) && r.allow(t1));
        assert!(!r.allow(t1));
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| r.allow(t2)).count(), 5);
        let mut free = FrameRate::new(
            &LimitsConfig {
                max_frames_per_sec: 0.0,
                ..cfg.clone()
            },
            t0,
        );
        assert!((0..10_000).all(|_| free.allow(t0)));
        assert!(cfg.validate().is_ok());
        assert!(
            LimitsConfig {
                hello_timeout_ms: 0,
                ..cfg.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            LimitsConfig {
                frame_burst: 0.5,
                ..cfg
            }
            .validate()
            .is_err()
        );
    }
}
