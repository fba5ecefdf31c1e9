//! The edge's loop: reports its idle clients to the root, runs each announced round on its own
//! tabs exactly as a single server would, and publishes the round's partial. The announcement
//! becomes a [`RoundPlan`] (the root's tasks, sums and phase) that the round loop's own seam,
//! [`RoundLoop::run_plan`], runs under the root's robust rule: the same task sending, result
//! checks, robust layer per result and streaming sums. (Results are completed by the edge's own
//! strategy, which leaves them as they are for every method that streams.)
//!
//! An edge runs each (round, model) once: when the root announces the same round on the same
//! model again (a retry, or a root that restarted), the edge publishes the partial it already
//! has instead of training twice (its `Msg-Id` makes JetStream drop the copy if the first one
//! arrived).

use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_core::aggregate::robust;
use canopy_core::codec::model::{MaskCache, decode_model};
use canopy_core::model::state::ModelState;
use canopy_core::protocol::{ModelPayload, Task, UploadSpec};
use canopy_core::strategy::{Contribution, Phase, RoundPlan, RunningSum};

use super::wire::{self, Partial, Presence, RoundMsg, Signed};
use super::{Link, global_id};
use crate::round::run::RoundLoop;

/// The longest phase name an edge shows for its root.
const PHASE_NAME_MAX: usize = 40;

pub async fn run(mut rl: RoundLoop, link: Link, name: String, url: String) {
    let prefix = super::edge_prefix(&name);
    // Reports every half second: the root samples from the idle clients it last heard of.
    let (hub, reporter) = (rl.hub.clone(), link.clone());
    let (edge, subject) = (
        name.clone(),
        link.subject(&format!("presence.{}", super::token(&name))),
    );
    // Also right after each partial, so the root learns at once that the round's clients are free.
    let report_now = Arc::new(tokio::sync::Notify::new());
    let now = report_now.clone();
    tokio::spawn(async move {
        let mut seq = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = now.notified() => {}
            }
            // Milliseconds since the epoch, so a restarted edge goes on above its last report.
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            seq = ms.max(seq + 1);
            let mut p = {
                let hub = hub.lock().unwrap();
                let idle = hub
                    .idle_clients()
                    .into_iter()
                    .map(|c| (global_id(prefix, c.id), c.samples))
                    .collect();
                Presence {
                    edge: edge.clone(),
                    url: url.clone(),
                    connected: hub.connected(),
                    idle,
                    seq,
                    signer: String::new(),
                    signature: Vec::new(),
                }
            };
            if let Some(key) = &reporter.key
                && let Err(e) = p.sign(key)
            {
                tracing::warn!("signing the report: {e}");
            }
            if let Err(e) = reporter
                .client
                .publish(subject.clone(), wire::encode(&p).into())
                .await
            {
                tracing::warn!("reporting to the root: {e}");
            }
        }
    });
    let mut rounds = match link.follow(link.subject("round.*"), false).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("edge {name}: {e}");
            return;
        }
    };
    tracing::info!(edge = %name, "edge ready: waiting for the root's rounds");
    // The last partial this edge published, and the (round, model) it answers.
    let mut done: Option<Partial> = None;
    let reason = loop {
        let msg = tokio::select! {
            m = rounds.recv() => m,
            m = rl.incoming.recv() => {
                if let Some(m) = m {
                    rl.between_rounds(m);
                }
                continue;
            }
        };
        let Some(msg) = msg else {
            break "the root's round stream ended".to_string();
        };
        if msg.subject.as_str().ends_with(".end") {
            break String::from_utf8_lossy(&msg.payload).into_owned();
        }
        let ann = match announced(&link, &msg.payload).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        if let Some(p) = done
            .as_ref()
            .filter(|p| p.round == ann.round && p.base == ann.base)
        {
            tracing::info!(
                round = ann.round,
                "round announced again on the same model: sending the partial again"
            );
            if let Err(e) = publish(&link, p).await {
                tracing::warn!("{e}");
            }
            continue;
        }
        match run_round(&mut rl, &link, &name, prefix, ann).await {
            Ok(Some(p)) => {
                done = Some(p);
                report_now.notify_one();
            }
            Ok(None) => {}
            Err(e) => tracing::error!(edge = %name, "round failed: {e}"),
        }
    };
    tracing::info!(edge = %name, "run over: {reason}");
    let round = rl.hub.lock().unwrap().round();
    rl.say_bye(crate::hub::Phase::Done, round, &reason);
    rl.goodbye().await;
}

/// The round an announcement carries (fetched from the Object Store when it was too large).
async fn announced(link: &Link, payload: &[u8]) -> Result<RoundMsg, String> {
    wire::decode(
        &link.open(payload, "a round announcement").await?,
        "a round announcement",
    )
}

/// Publishes a partial (through the Object Store when its summaries make it large); whether
/// JetStream took it as a duplicate.
async fn publish(link: &Link, p: &Partial) -> Result<bool, String> {
    let edge = super::token(&p.edge);
    let object = format!("partial-msg-{}-{edge}-{}", p.round, p.attempt);
    link.publish_large(
        link.subject(&format!("partial.{}.{edge}", p.round)),
        &p.msg_id(),
        &object,
        wire::encode(p),
    )
    .await
}

/// One announced round on this edge's tabs; its partial, or None when none of its clients was
/// sampled.
async fn run_round(
    rl: &mut RoundLoop,
    link: &Link,
    name: &str,
    prefix: u64,
    ann: RoundMsg,
) -> Result<Option<Partial>, String> {
    let started = Instant::now();
    let mine: Vec<&wire::EdgeTask> = ann
        .tasks
        .iter()
        .filter(|t| super::local_id(prefix, t.client).is_some())
        .collect();
    if mine.is_empty() {
        return Ok(None);
    }
    let mut models = Vec::new();
    for blob in &ann.models {
        let bytes = link.get(blob).await?;
        models.push(Arc::new(wire::decode::<ModelPayload>(
            &bytes,
            "a round's model",
        )?));
    }
    let first = models.first().ok_or("a round without a model")?;
    let decoded = decode_model(first, &mut MaskCache::default(), false)?;
    let global = ModelState {
        arch: decoded.arch,
        params: decoded.params,
        mask: decoded.mask,
        mask_version: ann.mask_version,
    };
    let mut tasks = Vec::new();
    for t in mine {
        let model = models.get(t.model as usize).ok_or_else(|| {
            format!(
                "task for client {} names model {} of {}",
                t.client,
                t.model,
                models.len()
            )
        })?;
        let task = Task {
            round: ann.round,
            model: model.clone(),
            train: t.train.clone(),
            upload: t.upload,
            deadline_ms: t.deadline_ms,
        };
        tasks.push((super::local_id(prefix, t.client).expect("filtered"), task));
    }
    if !robust::streams(&ann.robust) {
        return Err("the root's aggregation rule does not stream".into());
    }
    // The root planned the round: its tasks, sums and phase. Tasks at an edge take no in-round
    // requests (a round that needs them never runs across edges).
    let plan = RoundPlan {
        tasks,
        fold: Some(ann.fold),
        phase: Phase::named(ann.phase.chars().take(PHASE_NAME_MAX).collect::<String>()),
        exchange: None,
    };
    let mut got = rl
        .run_plan(ann.round, plan, &global, ann.deadline_ms, &ann.robust)
        .await;
    let mut stream = got.stream.take().ok_or("the round's sums went missing")?;
    // Results that came after an earlier round's deadline (`late_results = "next_round"`),
    // rebased onto this round's model, go into this partial, as one server folds them into its
    // next round.
    let carried = rl.take_carried(ann.round, &got.start);
    let late = rl.fold_late(ann.round, &global, &mut stream, carried) as u64;
    let s = stream.finish()?;
    // The next round's norm bound on this edge (the root's rule, this edge's tabs).
    rl.remember(got.start.len(), &s.combined);
    let (bytes_up, bytes_down) = rl.hub.lock().unwrap().round_bytes();
    let mut s = s;
    if let Some(f) = link.poison {
        // A compromised edge (attack experiments): its mean update, sent ×f.
        let weights = ann.tasks.first().map(|t| t.upload) == Some(UploadSpec::Weights);
        poison(&mut s.sum, weights.then_some(global.params.as_slice()), f);
        tracing::warn!(
            round = ann.round,
            factor = f,
            "partial poisoned (lab_poison_partial)"
        );
    }
    let edge = super::token(name);
    let sum = link
        .put(
            &format!("partial-{}-{edge}-{}", ann.round, ann.attempt),
            wire::encode(&s.sum),
        )
        .await?;
    let summaries: Vec<Contribution> = s
        .results
        .into_iter()
        .map(|c| Contribution {
            client: global_id(prefix, c.client),
            ..c
        })
        .collect();
    let verdicts = s
        .combined
        .verdicts
        .into_iter()
        .map(|v| robust::Verdict {
            client: global_id(prefix, v.client),
            ..v
        })
        .collect();
    let p = Partial {
        round: ann.round,
        attempt: ann.attempt,
        base: ann.base,
        shape: ann.shape,
        mask_version: ann.mask_version,
        edge: name.to_string(),
        weight: s.sum.weight,
        clients: s.sum.count,
        late,
        sum,
        summaries,
        verdicts,
        sampled: got.sampled,
        dropped: got.dropped,
        rejected: got.rejected,
        bytes_up,
        bytes_down,
        seconds: started.elapsed().as_secs_f64(),
        signer: String::new(),
        signature: Vec::new(),
    };
    let mut p = p;
    if let Some(key) = &link.key {
        p.sign(key).map_err(|e| format!("the partial: {e}"))?;
    }
    let duplicate = publish(link, &p).await?;
    {
        let mut hub = rl.hub.lock().unwrap();
        hub.set_phase(crate::hub::Phase::WaitingForClients, ann.round);
    }
    tracing::info!(
        round = ann.round,
        results = p.clients,
        dropped = p.dropped,
        sum_bytes = p.sum.size(),
        object_store = p.sum.in_store(),
        duplicate,
        seconds = format!("{:.2}", p.seconds),
        "partial published"
    );
    Ok(Some(p))
}

/// Scales a partial's mean update by `f`: Σnᵢxᵢ becomes n·(base + f·(mean − base)), `base` the
/// round's model for weight uploads, zero for deltas.
fn poison(sum: &mut RunningSum, base: Option<&[f32]>, f: f64) {
    let n = sum.weight;
    if n <= 0.0 {
        return;
    }
    for (i, a) in sum.weighted.iter_mut().enumerate() {
        let b = base.and_then(|b| b.get(i)).map_or(0.0, |b| *b as f64);
        *a = n * (b + f * (*a / n - b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_partial_moves_its_mean_update_by_the_factor() {
        // Two results of weight 1 and 3 around the model [1, 2]: mean weights [2, 4], update
        // [1, 2]; ×−10 gives the weights [1 − 10, 2 − 20].
        let mut sum = RunningSum {
            weight: 4.0,
            count: 2,
            weighted: vec![8.0, 16.0],
            squares: Vec::new(),
            fold: Default::default(),
        };
        poison(&mut sum, Some(&[1.0, 2.0]), -10.0);
        assert_eq!(sum.mean().unwrap(), vec![-9.0, -18.0]);
        // Deltas scale about zero.
        let mut deltas = RunningSum {
            weight: 2.0,
            count: 2,
            weighted: vec![1.0, -2.0],
            squares: Vec::new(),
            fold: Default::default(),
        };
        poison(&mut deltas, None, 3.0);
        assert_eq!(deltas.mean().unwrap(), vec![1.5, -3.0]);
    }
}
