//! Who is connected: each client's row (its shard, status, progress, bytes, suspicion), its
//! outbox while it is connected, the ids and addresses banned from the run, and how many new
//! ids each address has taken lately.
//!
//! A ban by id alone does not stick: a reloaded tab (or a script) comes back as a new client.
//! So a ban can name the client's address too, for a time, and an address may take only so
//! many new ids a minute (`limits.max_new_ids_per_minute`; loopback exempt when
//! `limits.loopback_exempt`, since every local client shares it).
//!
//! This table knows nothing of the round: it counts each client's own bytes, and the [`Hub`]
//! adds what it sends to the round's counters.
//!
//! [`Hub`]: super::Hub

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use canopy_core::aggregate::robust::{Suspicion, Verdict};
use canopy_core::data::partition::Shard;
use canopy_core::protocol::{DeviceInfo, Hello, check_example_counts};
use canopy_core::strategy::ClientView;
use canopy_core::train::Progress;
use serde::Serialize;

use crate::serve::outbox::{Frame, Outbox, Refused};

/// The frame a session's writer takes as "close the connection now" (real frames are never empty).
pub const CLOSE: &[u8] = &[];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Idle,
    Training,
    Dropped,
}

#[derive(Debug, Serialize)]
pub struct Client {
    pub id: u64,
    pub name: String,
    pub device: DeviceInfo,
    pub shard: usize,
    pub train_samples: u64,
    pub status: Status,
    pub rounds_done: u32,
    pub last_round: Option<u32>,
    pub samples_per_sec: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub progress: Option<Progress>,
    pub joined_unix_ms: u64,
    /// The pruning-mask version this client holds.
    pub mask_version: Option<u64>,
    /// What the robust aggregation layer did to its updates.
    pub suspicion: Suspicion,
    /// Banned by an admin: disconnected, and refused when it comes back with this id.
    pub banned: bool,
    /// In a run on the tabs' own data: the examples it reported holding per class (counts only).
    pub examples: Option<Examples>,
    /// Where it last connected from (not shown: the dashboard is public in a classroom).
    #[serde(skip)]
    addr: Option<IpAddr>,
    #[serde(skip)]
    tx: Option<Outbox>,
}

impl Client {
    pub fn connected(&self) -> bool {
        self.tx.is_some()
    }
}

/// What a tab on its own data holds: examples per class, for training and held out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Examples {
    pub train: Vec<u32>,
    pub test: Vec<u32>,
}

/// The client table. Its rules: a dropped client is never idle, a reconnecting client keeps its
/// id and shard, a banned id never comes back.
pub struct Clients {
    shards: Vec<Shard>,
    clients: BTreeMap<u64, Client>,
    next_id: u64,
    next_shard: usize,
    /// Banned client ids and why.
    banned: BTreeMap<u64, String>,
    /// Banned addresses: until when, and why.
    banned_addrs: HashMap<IpAddr, (Instant, String)>,
    /// New ids given to each address in the last minute (join times).
    recent: HashMap<IpAddr, VecDeque<Instant>>,
    /// Most new ids an address may take a minute (0: no limit), and whether loopback is exempt.
    new_ids_per_minute: usize,
    loopback_exempt: bool,
    /// Set on a root: tabs are told to join an edge instead.
    refuse_joins: Option<String>,
    /// Classes of a run on the tabs' own data (0: the server deals the data): a tab trains on
    /// the examples it reports, and one with none is never sampled.
    tab_classes: usize,
}

impl Clients {
    /// An empty table dealing out `shards`.
    pub fn new(shards: Vec<Shard>) -> Clients {
        Clients {
            shards,
            clients: BTreeMap::new(),
            next_id: 1,
            next_shard: 0,
            banned: BTreeMap::new(),
            banned_addrs: HashMap::new(),
            recent: HashMap::new(),
            new_ids_per_minute: 0,
            loopback_exempt: true,
            refuse_joins: None,
            tab_classes: 0,
        }
    }

    /// The tabs bring their own data, labelled with `classes` classes.
    pub fn on_tabs(&mut self, classes: usize) {
        self.tab_classes = classes;
    }

    /// A tab reports the examples it holds: checked ([`check_example_counts`]), kept for the
    /// dashboard, and its training total becomes the most samples a result of it may claim.
    pub fn set_examples(&mut self, id: u64, train: Vec<u32>, test: Vec<u32>) -> Result<(), String> {
        let total = check_example_counts(self.tab_classes, &train, &test)?;
        let c = self.clients.get_mut(&id).ok_or(format!("no client {id}"))?;
        c.train_samples = total;
        c.examples = Some(Examples { train, test });
        Ok(())
    }

    /// At most `per_minute` new ids per address a minute (0: no limit); loopback exempt if asked.
    pub fn limit_new_ids(&mut self, per_minute: usize, loopback_exempt: bool) {
        self.new_ids_per_minute = per_minute;
        self.loopback_exempt = loopback_exempt;
    }

    /// Registers a client (or re-attaches one that reconnects with its old id, if that one is
    /// not connected). Returns its id, or why it may not join (joins are refused, or it was
    /// banned). Sends nothing: the hub welcomes it.
    pub fn join(&mut self, hello: Hello, tx: Outbox) -> Result<u64, String> {
        self.join_from(hello, tx, None, Instant::now())
    }

    /// [`Clients::join`] from `addr` (`None`: not a network client, e.g. a test) at `now`: a
    /// banned address is refused, and so is a new id past the address's allowance.
    pub fn join_from(
        &mut self,
        hello: Hello,
        tx: Outbox,
        addr: Option<IpAddr>,
        now: Instant,
    ) -> Result<u64, String> {
        if let Some(why) = &self.refuse_joins {
            return Err(why.clone());
        }
        if let Some(why) = hello.resume.and_then(|id| self.banned.get(&id)) {
            return Err(format!("banned: {why}"));
        }
        if let Some(a) = addr {
            self.banned_addrs.retain(|_, (until, _)| *until > now);
            if let Some((until, why)) = self.banned_addrs.get(&a) {
                let minutes = (until.duration_since(now).as_secs_f64() / 60.0).ceil();
                return Err(format!(
                    "banned: {why} (this address, for {minutes:.0} more minutes)"
                ));
            }
        }
        let resumed = hello
            .resume
            .filter(|id| self.clients.get(id).is_some_and(|c| c.tx.is_none()));
        if let Some(id) = resumed {
            let c = self.clients.get_mut(&id).expect("checked");
            c.tx = Some(tx);
            c.status = Status::Idle;
            c.device = hello.device;
            c.mask_version = hello.mask_version;
            c.addr = addr.or(c.addr);
            if self.tab_classes > 0 {
                // Its examples may have changed while it was away: it reports them again.
                c.train_samples = 0;
                c.examples = None;
            }
            return Ok(id);
        }
        if let Some(a) = addr
            && self.new_ids_per_minute > 0
            && !(self.loopback_exempt && a.is_loopback())
        {
            let joins = self.recent.entry(a).or_default();
            while joins
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
            {
                joins.pop_front();
            }
            if joins.len() >= self.new_ids_per_minute {
                return Err(format!(
                    "too many new clients from this address: at most {} a minute; try again later",
                    self.new_ids_per_minute
                ));
            }
            joins.push_back(now);
        }
        let id = self.next_id;
        self.next_id += 1;
        // Shards are dealt out in join order; with more clients than shards they repeat.
        let shard = self.next_shard % self.shards.len();
        self.next_shard += 1;
        let name = if hello.name.trim().is_empty() {
            format!("client-{id}")
        } else {
            hello.name.chars().take(40).collect()
        };
        let joined_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // A tab on its own data holds nothing until it says what it has.
        let train_samples = self.shards[shard].train.len() as u64;
        self.clients.insert(
            id,
            Client {
                id,
                name,
                device: hello.device,
                shard,
                train_samples,
                status: Status::Idle,
                rounds_done: 0,
                last_round: None,
                samples_per_sec: 0.0,
                bytes_up: 0,
                bytes_down: 0,
                progress: None,
                joined_unix_ms,
                mask_version: hello.mask_version,
                suspicion: Default::default(),
                banned: false,
                examples: None,
                addr,
                tx: Some(tx),
            },
        );
        Ok(id)
    }

    /// The data shard of a client that joined.
    pub fn shard(&self, id: u64) -> Option<&Shard> {
        self.clients.get(&id).map(|c| &self.shards[c.shard])
    }

    /// This server takes no tabs (a root): each is told `why` and sent away.
    pub fn refuse_joins(&mut self, why: &str) {
        self.refuse_joins = Some(why.to_string());
    }

    /// Marks `id` banned for `reason`, so it cannot join again with its id. Returns its name.
    /// Telling it and closing its connection is the hub's part.
    pub fn ban(&mut self, id: u64, reason: &str) -> Result<String, String> {
        let Some(c) = self.clients.get_mut(&id) else {
            return Err(format!("no client {id}"));
        };
        c.banned = true;
        self.banned.insert(id, reason.to_string());
        Ok(c.name.clone())
    }

    pub fn is_banned(&self, id: u64) -> bool {
        self.banned.contains_key(&id)
    }

    /// Bans `id`'s address (where it last connected from) until `until`, for `reason`. Returns
    /// the other clients connected from it (the hub bans them too), or an error when the client
    /// is unknown or its address is not known.
    pub fn ban_address(
        &mut self,
        id: u64,
        until: Instant,
        reason: &str,
    ) -> Result<Vec<u64>, String> {
        let c = self.clients.get(&id).ok_or(format!("no client {id}"))?;
        let a = c
            .addr
            .ok_or(format!("client {id} has no network address to ban"))?;
        self.banned_addrs.insert(a, (until, reason.to_string()));
        let others: Vec<u64> = self
            .clients
            .values()
            .filter(|o| o.id != id && o.addr == Some(a) && o.tx.is_some())
            .map(|o| o.id)
            .collect();
        Ok(others)
    }

    /// Its connection is gone: it has no outbox, is dropped and shows no progress.
    pub fn disconnect(&mut self, id: u64) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.tx = None;
            c.status = Status::Dropped;
            c.progress = None;
        }
    }

    pub fn get(&self, id: u64) -> Option<&Client> {
        self.clients.get(&id)
    }

    /// Every client that ever joined, in id order, connected or not.
    pub fn iter(&self) -> impl Iterator<Item = &Client> {
        self.clients.values()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.clients.keys().copied().collect()
    }

    /// Connected clients with nothing to do, as the strategy sees them.
    pub fn idle(&self) -> Vec<ClientView> {
        self.clients
            .values()
            .filter(|c| c.tx.is_some() && c.status == Status::Idle)
            // A tab on its own data with no training examples has nothing to train on.
            .filter(|c| self.tab_classes == 0 || c.train_samples > 0)
            .map(|c| ClientView {
                id: c.id,
                samples: c.train_samples,
            })
            .collect()
    }

    pub fn connected(&self) -> usize {
        self.clients.values().filter(|c| c.tx.is_some()).count()
    }

    /// Size of a client's training split: the most samples a result from it may claim.
    pub fn train_samples(&self, id: u64) -> u64 {
        self.clients.get(&id).map_or(0, |c| c.train_samples)
    }

    pub fn mask_version(&self, id: u64) -> Option<u64> {
        self.clients.get(&id).and_then(|c| c.mask_version)
    }

    /// Sets a connected client's status (a dropped one stays dropped); idle clears its progress.
    pub fn set_status(&mut self, id: u64, status: Status) {
        if let Some(c) = self.clients.get_mut(&id)
            && c.tx.is_some()
        {
            c.status = status;
            if status == Status::Idle {
                c.progress = None;
            }
        }
    }

    /// A task went out to `id` for `round`.
    pub fn task_sent(&mut self, id: u64, round: u32) {
        self.set_status(id, Status::Training);
        if let Some(c) = self.clients.get_mut(&id) {
            c.last_round = Some(round);
        }
    }

    /// `id`'s result was accepted.
    pub fn result_accepted(&mut self, id: u64, samples_per_sec: f64, mask_version: Option<u64>) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.rounds_done += 1;
            c.samples_per_sec = samples_per_sec;
            c.mask_version = mask_version;
        }
    }

    /// What the robust aggregation layer did to a client's update this round.
    pub fn judged(&mut self, v: &Verdict) {
        if let Some(c) = self.clients.get_mut(&v.client) {
            c.suspicion.record(v);
        }
    }

    /// `id` could not do its task; it may have lost its cached mask, so send it in full next time.
    pub fn task_failed(&mut self, id: u64) {
        self.set_status(id, Status::Idle);
        if let Some(c) = self.clients.get_mut(&id) {
            c.mask_version = None;
        }
    }

    /// Training progress from `id` (the hub checks it belongs to the current round).
    pub fn progress(&mut self, id: u64, progress: Progress) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.samples_per_sec = progress.samples_per_sec as f64;
            c.progress = Some(progress);
        }
    }

    /// Queues a frame for a connected client, counting it in its bytes down. Returns the bytes
    /// queued: 0 when it is not connected or not reading its frames (the frame is dropped).
    pub fn send_frame(&mut self, id: u64, frame: impl Into<Frame>) -> usize {
        let frame = frame.into();
        let len = frame.len();
        if let Some(c) = self.clients.get_mut(&id)
            && let Some(tx) = &c.tx
        {
            match tx.send(frame) {
                Ok(()) => {
                    c.bytes_down += len as u64;
                    return len;
                }
                Err(Refused::Full(queued)) => {
                    tracing::warn!(
                        client = id,
                        queued,
                        frame = len,
                        "client is not reading its frames: frame dropped"
                    );
                }
                Err(Refused::Closed) => {}
            }
        }
        0
    }

    /// Bytes that came in from `id`.
    pub fn count_up(&mut self, id: u64, bytes: usize) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.bytes_up += bytes as u64;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::serve::outbox::{Inbox, channel};
    use canopy_core::data::Dataset;
    use canopy_core::protocol::{Backend, PROTOCOL_VERSION};

    /// `n` shards, shard `i` with `i + 1` training samples.
    pub(crate) fn shards(n: usize) -> Vec<Shard> {
        let data = |len: usize| Dataset {
            shape: [1, 1, 1],
            classes: 2,
            images: vec![0; len],
            labels: vec![0; len],
        };
        (0..n)
            .map(|i| Shard {
                index: i,
                train: data(i + 1),
                test: data(1),
            })
            .collect()
    }

    pub(crate) fn hello(name: &str, resume: Option<u64>) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            name: name.into(),
            device: DeviceInfo::new(Backend::Native, "test", "test"),
            resume,
            mask_version: Some(3),
        }
    }

    /// A client's connection: its outbox, and the end its writer would read.
    fn link() -> (Outbox, Inbox) {
        channel(1 << 20)
    }

    fn idle_ids(t: &Clients) -> Vec<u64> {
        t.idle().iter().map(|c| c.id).collect()
    }

    #[test]
    fn a_tab_on_its_own_data_is_sampled_once_it_reports_examples_within_bounds() {
        let empty = Dataset {
            shape: [1, 1, 1],
            classes: 3,
            images: Vec::new(),
            labels: Vec::new(),
        };
        let mut t = Clients::new(vec![Shard {
            index: 0,
            train: empty.clone(),
            test: empty,
        }]);
        t.on_tabs(3);
        let (tx, _rx) = link();
        let a = t.join(hello("a", None), tx).unwrap();
        // Nothing reported yet: nothing to train on, never sampled.
        assert_eq!((t.train_samples(a), idle_ids(&t)), (0, vec![]));
        t.set_examples(a, vec![4, 0, 2], vec![1, 0, 0]).unwrap();
        assert_eq!((t.train_samples(a), idle_ids(&t)), (6, vec![a]));
        let ex = t.get(a).unwrap().examples.clone().unwrap();
        assert_eq!((ex.train, ex.test), (vec![4, 0, 2], vec![1, 0, 0]));
        // Hostile reports are refused and change nothing: the bound on a result's samples stays.
        for (train, test) in [
            (vec![u32::MAX, 0, 0], vec![0, 0, 0]),
            (vec![1, 1], vec![0, 0]),
            (vec![1, 1, 1, 1], vec![0, 0, 0, 0]),
        ] {
            assert!(t.set_examples(a, train, test).is_err());
        }
        assert_eq!(t.train_samples(a), 6);
        // Cleared examples: out of the sample again.
        t.set_examples(a, vec![0; 3], vec![0; 3]).unwrap();
        assert_eq!(idle_ids(&t), Vec::<u64>::new());
        // A run whose server deals the data takes no counts.
        let mut dealt = Clients::new(shards(1));
        let (tx, _rx2) = link();
        let b = dealt.join(hello("b", None), tx).unwrap();
        assert!(dealt.set_examples(b, vec![1, 1], vec![0, 0]).is_err());
        assert_eq!(dealt.train_samples(b), 1);
    }

    #[test]
    fn joining_deals_ids_and_shards_in_order_and_leaving_drops_the_client() {
        let mut t = Clients::new(shards(2));
        let (tx, _rx1) = link();
        let a = t.join(hello("a", None), tx).unwrap();
        let (tx, _rx2) = link();
        let b = t.join(hello("  ", None), tx).unwrap();
        let (tx, _rx3) = link();
        let c = t.join(hello(&"x".repeat(50), None), tx).unwrap();
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(t.get(b).unwrap().name, "client-2");
        assert_eq!(t.get(c).unwrap().name.len(), 40);
        // Two shards for three clients: the third gets the first shard again.
        let shard = |id| t.get(id).unwrap().shard;
        assert_eq!((shard(a), shard(b), shard(c)), (0, 1, 0));
        assert_eq!(t.train_samples(b), 2);
        assert_eq!(t.shard(b).unwrap().index, 1);
        assert_eq!(t.connected(), 3);
        assert_eq!(idle_ids(&t), vec![1, 2, 3]);

        t.disconnect(b);
        assert_eq!(t.get(b).unwrap().status, Status::Dropped);
        assert!(!t.get(b).unwrap().connected());
        assert_eq!(t.connected(), 2);
        assert_eq!(idle_ids(&t), vec![1, 3]);
        // A dropped client stays dropped whatever it is told.
        t.set_status(b, Status::Idle);
        assert_eq!(t.get(b).unwrap().status, Status::Dropped);
        assert_eq!(t.iter().count(), 3);
    }

    #[test]
    fn a_reconnecting_client_keeps_its_id_and_shard_but_a_connected_id_is_not_taken_over() {
        let mut t = Clients::new(shards(3));
        let (tx, _r1) = link();
        t.join(hello("a", None), tx).unwrap();
        let (tx, _r2) = link();
        let b = t.join(hello("b", None), tx).unwrap();
        t.disconnect(b);
        let (tx, _r3) = link();
        assert_eq!(t.join(hello("b again", Some(b)), tx).unwrap(), b);
        let row = t.get(b).unwrap();
        assert_eq!(
            (row.status, row.shard, row.name.as_str()),
            (Status::Idle, 1, "b")
        );
        // `b` is connected now: the same id asked again gets a new client.
        let (tx, _r4) = link();
        assert_eq!(t.join(hello("b twice", Some(b)), tx).unwrap(), 3);
        // An id never seen is not resumed either.
        let (tx, _r5) = link();
        assert_eq!(t.join(hello("stranger", Some(99)), tx).unwrap(), 4);
    }

    #[test]
    fn idle_and_busy_follow_tasks_sent_results_accepted_and_tasks_failed() {
        let mut t = Clients::new(shards(1));
        let (tx, _rx) = link();
        let id = t.join(hello("a", None), tx).unwrap();
        let progress = Progress {
            epoch: 0,
            epochs: 1,
            step: 1,
            steps: 4,
            loss: 0.5,
            samples_per_sec: 12.0,
        };

        t.task_sent(id, 7);
        assert_eq!(t.get(id).unwrap().status, Status::Training);
        assert_eq!(t.get(id).unwrap().last_round, Some(7));
        assert!(idle_ids(&t).is_empty());
        t.progress(id, progress);
        assert_eq!(t.get(id).unwrap().samples_per_sec, 12.0);
        assert!(t.get(id).unwrap().progress.is_some());

        t.result_accepted(id, 30.0, Some(5));
        t.set_status(id, Status::Idle);
        let row = t.get(id).unwrap();
        assert_eq!((row.rounds_done, row.samples_per_sec), (1, 30.0));
        assert_eq!(t.mask_version(id), Some(5));
        assert!(row.progress.is_none(), "idle clears the progress");
        assert_eq!(idle_ids(&t), vec![id]);

        // A refused or failed task: idle again, and its mask is sent in full next time.
        t.task_sent(id, 8);
        t.task_failed(id);
        let row = t.get(id).unwrap();
        assert_eq!((row.status, row.rounds_done), (Status::Idle, 1));
        assert_eq!(t.mask_version(id), None);
    }

    #[test]
    fn verdicts_add_up_to_a_clients_suspicion() {
        let mut t = Clients::new(shards(1));
        let (tx, _rx) = link();
        let id = t.join(hello("a", None), tx).unwrap();
        let verdict = |ratio: f64, clipped: bool, rejected: bool| Verdict {
            client: id,
            norm: 1.0,
            norm_ratio: ratio,
            scale: 1.0,
            outside: 0.0,
            clipped,
            down_weighted: false,
            rejected,
        };
        t.judged(&verdict(9.0, true, false));
        t.judged(&verdict(2.0, false, true));
        t.judged(&Verdict {
            client: 42,
            ..verdict(1.0, true, true)
        });
        let s = &t.get(id).unwrap().suspicion;
        assert_eq!(
            (s.judged, s.clipped, s.rejected, s.down_weighted),
            (2, 1, 1, 0)
        );
        assert_eq!((s.last_norm_ratio, s.max_norm_ratio), (2.0, 9.0));
    }

    #[test]
    fn a_banned_id_cannot_come_back_and_refused_joins_send_every_tab_away() {
        let mut t = Clients::new(shards(1));
        let (tx, _rx) = link();
        let id = t.join(hello("mallory", None), tx).unwrap();
        assert_eq!(t.ban(id, "poisoning").unwrap(), "mallory");
        assert_eq!(t.ban(99, "x").unwrap_err(), "no client 99");
        assert!(t.is_banned(id) && t.get(id).unwrap().banned);
        t.disconnect(id);
        let (tx, _rx) = link();
        assert_eq!(
            t.join(hello("mallory", Some(id)), tx).unwrap_err(),
            "banned: poisoning"
        );
        // Without its id it is a new client.
        let (tx, _rx) = link();
        assert_eq!(t.join(hello("mallory", None), tx).unwrap(), 2);

        t.refuse_joins("join an edge");
        let (tx, _rx) = link();
        assert_eq!(t.join(hello("b", None), tx).unwrap_err(), "join an edge");
    }

    #[test]
    fn an_address_ban_keeps_new_ids_out_for_its_time() {
        let mut t = Clients::new(shards(1));
        let (home, other): (IpAddr, IpAddr) = (
            "192.168.1.20".parse().unwrap(),
            "192.168.1.21".parse().unwrap(),
        );
        let now = Instant::now();
        let join = |t: &mut Clients, name: &str, addr: IpAddr, at: Instant| {
            let (tx, _rx) = link();
            t.join_from(hello(name, None), tx, Some(addr), at)
        };
        let mallory = join(&mut t, "mallory", home, now).unwrap();
        let sybil = join(&mut t, "sybil", home, now).unwrap();
        let bob = join(&mut t, "bob", other, now).unwrap();
        let others = t
            .ban_address(mallory, now + Duration::from_secs(600), "poisoning")
            .unwrap();
        assert_eq!(
            others,
            vec![sybil],
            "the other tab from that address, not bob's"
        );
        assert!(!others.contains(&bob));
        // A reload (new id) from the address is refused while the ban lasts, with why and how long.
        let refused =
            join(&mut t, "mallory again", home, now + Duration::from_secs(60)).unwrap_err();
        assert_eq!(
            refused,
            "banned: poisoning (this address, for 9 more minutes)"
        );
        assert!(join(&mut t, "carol", other, now + Duration::from_secs(60)).is_ok());
        // Once it has run out, the address may join again.
        assert!(
            join(
                &mut t,
                "mallory later",
                home,
                now + Duration::from_secs(601)
            )
            .is_ok()
        );
        // A client with no known address (not a network client) cannot be address-banned.
        let (tx, _rx) = link();
        let local = t.join(hello("local", None), tx).unwrap();
        assert!(
            t.ban_address(local, now, "x")
                .unwrap_err()
                .contains("no network address")
        );
    }

    #[test]
    fn an_address_may_take_only_so_many_new_ids_a_minute() {
        let mut t = Clients::new(shards(1));
        t.limit_new_ids(3, true);
        let lan: IpAddr = "10.0.0.7".parse().unwrap();
        let now = Instant::now();
        let mut join = |name: &str, addr: IpAddr, resume: Option<u64>, secs: u64| {
            let (tx, _rx) = link();
            t.join_from(
                hello(name, resume),
                tx,
                Some(addr),
                now + Duration::from_secs(secs),
            )
        };
        let first = join("a", lan, None, 0).unwrap();
        join("b", lan, None, 10).unwrap();
        join("c", lan, None, 20).unwrap();
        let refused = join("d", lan, None, 30).unwrap_err();
        assert!(refused.contains("at most 3 a minute"), "{refused}");
        // Loopback (this machine's tests and simulations) is exempt.
        for i in 0..5 {
            join("local", "127.0.0.1".parse().unwrap(), None, 30 + i).unwrap();
        }
        // A minute after the first join, one more new id fits.
        join("e", lan, None, 61).unwrap();
        assert!(join("f", lan, None, 62).is_err());
        // Resuming an id is not a new one (after its connection is gone).
        t.disconnect(first);
        let (tx, _rx) = link();
        assert_eq!(
            t.join_from(
                hello("a", Some(first)),
                tx,
                Some(lan),
                now + Duration::from_secs(63)
            )
            .unwrap(),
            first
        );
    }

    #[test]
    fn frames_count_only_when_queued() {
        let mut t = Clients::new(shards(1));
        let (tx, _rx) = channel(10);
        let id = t.join(hello("a", None), tx).unwrap();
        assert_eq!(t.send_frame(id, vec![1; 8]), 8);
        // Over the outbox's cap: dropped, not counted.
        assert_eq!(t.send_frame(id, vec![1; 8]), 0);
        assert_eq!(t.send_frame(99, vec![1; 8]), 0);
        t.count_up(id, 5);
        t.count_up(99, 5);
        let row = t.get(id).unwrap();
        assert_eq!((row.bytes_up, row.bytes_down), (5, 8));

        // Its writer is gone: nothing is counted.
        let (tx, rx) = link();
        let b = t.join(hello("b", None), tx).unwrap();
        drop(rx);
        assert_eq!(t.send_frame(b, vec![1; 3]), 0);
        assert_eq!(t.get(b).unwrap().bytes_down, 0);
        // Nor once it is disconnected.
        t.disconnect(id);
        assert_eq!(t.send_frame(id, vec![1]), 0);
    }
}
