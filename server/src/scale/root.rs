//! The root's side: where a round's results come from when they come from edges.
//!
//! The round loop samples from the idle clients the edges report and configures the round as
//! usual; [`Edges::run_round`] then announces it, and merges each edge's partial into the
//! round's running sums. A partial counts only if it answers this round, started from this very
//! model (its version), has this shape and is the first from its edge; everything else is
//! logged and ignored. An edge that stops reporting mid-round loses only its own clients.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use canopy_core::aggregate::robust::RobustConfig;
use canopy_core::aggregate::stream::StreamRound;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::Task;
use canopy_core::strategy::{Fold, Phase, RunningSum};
use futures_util::StreamExt;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::wire::{self, EdgeTask, Partial, Presence, RoundMsg, Signed};
use super::{Link, model_version, shape_hash};
use crate::hub::{Hub, PartialRow};

pub struct Edges {
    link: Link,
    hub: Arc<Mutex<Hub>>,
    partials: UnboundedReceiver<Partial>,
    /// Partials that came before their round was announced here (a restarted root finds those
    /// its edges sent before it went down), kept for when the round runs.
    early: Vec<Partial>,
    /// Partials merged for the round being run, kept for its retries (same round, same model):
    /// an edge runs each round once, so a retry gathers only the edges still missing.
    kept: Vec<(Partial, RunningSum)>,
    pub timeout: Duration,
    grace: Duration,
    /// Rounds before this one are history (a resumed root reads the stream from its start).
    first_round: u32,
    /// `[scale] edge_keys`: who may send partials (empty: anyone who can publish on NATS).
    keys: std::collections::BTreeMap<String, String>,
}

/// What came back from the edges in one round.
pub struct Gathered {
    pub sampled: usize,
    pub dropped: usize,
    pub rejected: usize,
    /// Results the edges carried into their partials from the round before.
    pub late: usize,
    pub stream: StreamRound,
    /// Time spent fetching and merging partials.
    pub merge: Duration,
    pub send: Duration,
}

impl Edges {
    /// Listens for the edges' reports and partials (from the start of the stream, so a restarted
    /// root sees what was sent while it was down).
    pub async fn start(
        link: Link,
        hub: Arc<Mutex<Hub>>,
        first_round: u32,
        timeout: Duration,
        grace: Duration,
        keys: std::collections::BTreeMap<String, String>,
    ) -> Result<Edges, String> {
        if keys.is_empty() {
            tracing::warn!(
                "partials and edge reports are not authenticated: anyone who can publish on this NATS server can send them (set [scale] edge_keys and each edge's nkey_file)"
            );
        }
        let mut presence = link
            .client
            .subscribe(link.subject("presence.*"))
            .await
            .map_err(|e| format!("subscribing to edge reports: {e}"))?;
        let (h, listed) = (hub.clone(), keys.clone());
        tokio::spawn(async move {
            while let Some(m) = presence.next().await {
                match wire::decode::<Presence>(&m.payload, "an edge report") {
                    Ok(p) => report(&mut h.lock().unwrap(), &listed, p),
                    Err(e) => tracing::warn!(subject = %m.subject, "{e}"),
                }
            }
        });
        let mut messages = link.follow(link.subject("partial.*.*"), true).await?;
        let (tx, partials) = unbounded_channel();
        let store = link.clone();
        tokio::spawn(async move {
            while let Some(m) = messages.recv().await {
                let opened = store.open(&m.payload, "a partial").await;
                match opened.and_then(|b| wire::decode::<Partial>(&b, "a partial")) {
                    Ok(p) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(subject = %m.subject, "ignored: {e}"),
                }
            }
        });
        Ok(Edges {
            link,
            hub,
            partials,
            early: Vec::new(),
            kept: Vec::new(),
            timeout,
            grace,
            first_round,
            keys,
        })
    }

    /// Tells the edges the run is over (they say Bye to their tabs).
    pub async fn finish(&self, reason: &str) {
        let id = format!(
            "end-{}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0)
        );
        if let Err(e) = self
            .link
            .publish(
                self.link.subject("round.end"),
                &id,
                reason.as_bytes().to_vec(),
            )
            .await
        {
            tracing::warn!("telling the edges the run is over: {e}");
        }
    }

    /// Announces the round and merges the edges' partials into `stream` until every edge with
    /// tasks answered, went silent, or the deadline (plus grace) passed.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_round(
        &mut self,
        round: u32,
        global: &ModelState,
        tasks: Vec<(u64, Task)>,
        deadline_ms: u64,
        phase: Phase,
        fold: Fold,
        robust: &RobustConfig,
        mut stream: StreamRound,
    ) -> Result<Gathered, String> {
        let sending = Instant::now();
        let base = model_version(global);
        let shape = shape_hash(&global.arch);
        let attempt = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        // Which edge serves each sampled client; clients whose edge is unknown count as dropped.
        let mut waiting: BTreeMap<String, usize> = BTreeMap::new();
        let mut dropped = 0;
        let mut models: Vec<(usize, Arc<canopy_core::protocol::ModelPayload>)> = Vec::new();
        let mut edge_tasks = Vec::new();
        {
            let hub = self.hub.lock().unwrap();
            for (client, task) in &tasks {
                let Some(edge) = hub.edge_of(*client) else {
                    dropped += 1;
                    continue;
                };
                *waiting.entry(edge.to_string()).or_default() += 1;
                let key = Arc::as_ptr(&task.model) as usize;
                let model = match models.iter().position(|(k, _)| *k == key) {
                    Some(i) => i,
                    None => {
                        models.push((key, task.model.clone()));
                        models.len() - 1
                    }
                } as u32;
                edge_tasks.push(EdgeTask {
                    client: *client,
                    model,
                    train: task.train.clone(),
                    upload: task.upload,
                    deadline_ms: task.deadline_ms,
                });
            }
        }
        let mut blobs = Vec::new();
        for (i, (_, m)) in models.iter().enumerate() {
            blobs.push(
                self.link
                    .put(
                        &format!("round-{round}-{attempt}-model-{i}"),
                        wire::encode(m.as_ref()),
                    )
                    .await?,
            );
        }
        let msg = RoundMsg {
            round,
            attempt,
            base,
            shape,
            mask_version: global.mask_version,
            phase: phase.name().to_string(),
            fold,
            robust: robust.clone(),
            deadline_ms,
            models: blobs,
            tasks: edge_tasks,
        };
        let id = format!("round-{round}-{attempt}");
        self.link
            .publish_large(
                self.link.subject(&format!("round.{round}")),
                &id,
                &id,
                wire::encode(&msg),
            )
            .await?;
        self.hub.lock().unwrap().begin_round(round, phase);
        let send = sending.elapsed();
        tracing::info!(
            round,
            edges = waiting.len(),
            tasks = tasks.len(),
            "round announced to the edges"
        );

        let (mut rejected, mut late, mut merge) = (0, 0, Duration::ZERO);
        // Partials of this round merged before (a retry of the same round on the same model).
        self.kept
            .retain(|(p, _)| p.round == round && p.base == base && p.shape == shape);
        let mut merged: BTreeSet<String> = BTreeSet::new();
        for (p, sum) in &self.kept {
            if merged.insert(p.edge.clone()) {
                stream.absorb(sum, p.summaries.clone(), p.verdicts.clone())?;
                waiting.remove(&p.edge);
                late += p.late as usize;
            }
        }
        let mut early = std::mem::take(&mut self.early);
        let until = tokio::time::Instant::now() + Duration::from_millis(deadline_ms) + self.grace;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            if waiting.is_empty() {
                break;
            }
            let p = if let Some(p) = early.pop() {
                p
            } else {
                tokio::select! {
                    p = self.partials.recv() => match p { Some(p) => p, None => return Err("the partials' reader stopped".into()) },
                    _ = tick.tick() => {
                        // An edge that went silent loses its clients' contribution, nothing more.
                        let hub = self.hub.lock().unwrap();
                        let gone: Vec<String> = waiting.keys().filter(|e| !hub.edge_alive(e, self.timeout)).cloned().collect();
                        for e in gone {
                            let n = waiting.remove(&e).unwrap_or(0);
                            tracing::warn!(round, edge = %e, clients = n, "edge went silent mid-round; its clients count as dropped");
                            dropped += n;
                        }
                        if tokio::time::Instant::now() >= until {
                            let n: usize = waiting.values().sum();
                            tracing::warn!(round, edges = ?waiting.keys().collect::<Vec<_>>(), clients = n, "deadline passed without these edges' partials");
                            dropped += n;
                            waiting.clear();
                        }
                        continue;
                    }
                }
            };
            let row = |p: &Partial, outcome: &str| PartialRow {
                round: p.round,
                results: p.clients,
                samples: p.weight,
                sum_bytes: p.sum.size(),
                in_store: p.sum.in_store(),
                edge_seconds: p.seconds,
                outcome: outcome.to_string(),
            };
            // Who sent it, before anything else: a forged partial must not even count as the
            // edge's (it would turn the real one into a "duplicate").
            if let Err(why) = p.admitted(&self.keys) {
                tracing::warn!(round, edge = %p.edge, "partial refused: {why}");
                self.hub
                    .lock()
                    .unwrap()
                    .edge_partial(&p.edge, row(&p, &format!("refused: {why}")));
                continue;
            }
            let verdict = if p.round > round {
                // A later round's partial can only come from before a restart; keep it.
                self.early.push(p);
                continue;
            } else if p.round + 1 < round || p.round < self.first_round {
                // History: a restarted root reads the stream from its start.
                tracing::debug!(round, edge = %p.edge, partial_round = p.round, "old partial skipped");
                continue;
            } else if p.round < round {
                "late"
            } else if p.base != base || p.shape != shape {
                "stale"
            } else if merged.contains(&p.edge) {
                "duplicate"
            } else {
                "merge"
            };
            if verdict != "merge" {
                tracing::warn!(round, edge = %p.edge, partial_round = p.round, "{verdict} partial ignored");
                self.hub
                    .lock()
                    .unwrap()
                    .edge_partial(&p.edge, row(&p, verdict));
                continue;
            }
            let merging = Instant::now();
            let outcome = match self.fetch(&p).await {
                Ok(sum) => stream
                    .absorb(&sum, p.summaries.clone(), p.verdicts.clone())
                    .map(|_| sum),
                Err(e) => Err(e),
            };
            merge += merging.elapsed();
            match outcome {
                Ok(sum) => {
                    tracing::info!(round, edge = %p.edge, results = p.clients, bytes = p.sum.size(), object_store = p.sum.in_store(), "partial merged");
                    merged.insert(p.edge.clone());
                    let sent = waiting.remove(&p.edge).unwrap_or(0);
                    // Its late results answer the round before's tasks, not this round's.
                    let answered = p.clients.saturating_sub(p.late) as usize;
                    dropped += sent.saturating_sub(answered);
                    rejected += p.rejected;
                    late += p.late as usize;
                    let mut hub = self.hub.lock().unwrap();
                    hub.add_round_bytes(p.bytes_up, p.bytes_down);
                    hub.edge_partial(&p.edge, row(&p, "merged"));
                    drop(hub);
                    self.kept.push((p, sum));
                }
                Err(e) => {
                    tracing::warn!(round, edge = %p.edge, "bad partial ignored: {e}");
                    self.hub
                        .lock()
                        .unwrap()
                        .edge_partial(&p.edge, row(&p, "bad"));
                }
            }
        }
        Ok(Gathered {
            sampled: tasks.len(),
            dropped,
            rejected,
            late,
            stream,
            merge,
            send,
        })
    }

    /// A partial's sums, checked against what it claims.
    async fn fetch(&self, p: &Partial) -> Result<RunningSum, String> {
        let bytes = self.link.get(&p.sum).await?;
        let sum: RunningSum =
            postcard::from_bytes(&bytes).map_err(|e| format!("its sums do not decode: {e}"))?;
        if sum.count != p.clients || (sum.weight - p.weight).abs() > 1e-6 * p.weight.abs().max(1.0)
        {
            return Err(format!(
                "its sums hold {} results of weight {}, it claims {} of {}",
                sum.count, sum.weight, p.clients, p.weight
            ));
        }
        if sum
            .weighted
            .iter()
            .chain(&sum.squares)
            .any(|v| !v.is_finite())
        {
            return Err("its sums are not finite".into());
        }
        Ok(sum)
    }
}

/// Takes an edge's report of its clients, if it is signed by the key `keys` lists for its edge
/// (when any are listed) and newer than the edge's last. A refused one is counted and logged
/// (the first and then every power of two, as a forger may send many).
fn report(hub: &mut Hub, keys: &BTreeMap<String, String>, p: Presence) {
    let edge = p.edge.clone();
    if let Err(why) = p.admitted(keys).and_then(|()| hub.edge_seen(p)) {
        let n = hub.edge_report_refused(&edge, &why);
        if n <= 1 || n.is_power_of_two() {
            tracing::warn!(edge = %edge, refused = n, "edge report refused: {why}");
        }
    }
}
