//! Lightweight federated split learning (Zhang, Ni & Wang 2024): each client trains only the
//! front of the model (layers up to the cut), the server trains the back, one exchange per batch.
//!
//! Per batch the client sends its front's output (a random fraction κ of it, with the seed that
//! chose it), the server runs its copy of the back forward and backward, steps the back and
//! returns the gradient at the cut quantized to `bits` per value; the client back-propagates it
//! through its front. The front is pruned at rate ρ each round, by default as structured
//! surgery (whole units go, so the tab computes less and sends fewer activations), or per weight
//! (the paper's magnitude pruning, a mask). Backs are one per client for the round, averaged at
//! round end (SplitFed v1), or one shared back. Fronts are averaged every `front_every` rounds;
//! in between each client keeps its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::tensor::Device;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{
    ClientView, Contribution, Exchange, RoundContext, RoundOutcome, RoundPlan, Settings, Strategy,
    StrategyConfig, UploadKind, parse_settings, sample_clients, task_on, weighted_values,
};
use crate::codec::exchange;
use crate::metric_keys as keys;
use crate::model::state::ModelState;
use crate::protocol::UploadSpec;
use crate::train::Optimizer;
use crate::train::split::{Back, Front, back_offset, back_step};
use crate::train::step::LossSource;

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PruneKind {
    /// Whole units of the front with the smallest L1 norm go: a narrower front.
    #[default]
    Structured,
    /// The front's weights of smallest magnitude are masked (the paper's pruning; the tab
    /// computes as much as before, since it has no sparse kernels).
    Magnitude,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SplitConfig {
    /// Dense or conv layers in the front; the cut follows their activation and pooling. The
    /// front must end flat (for CNNs: cut after the last conv block).
    pub cut: usize,
    /// κ: fraction of the front's output values sent per batch (activation dropout).
    pub keep: f32,
    /// b: bits per gradient value sent back (32: exact f32; 2–16: stochastic rounding).
    pub bits: u8,
    /// ρ: fraction of the front pruned, re-evaluated every round from the current weights.
    pub prune: f32,
    pub prune_kind: PruneKind,
    /// I: fronts are averaged every this many rounds; in between each client keeps its own.
    pub front_every: u32,
    /// One back shared by every client (its batches take turns), instead of one per client
    /// averaged at round end.
    pub shared_back: bool,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            cut: 1,
            keep: 1.0,
            bits: 8,
            prune: 0.0,
            prune_kind: PruneKind::Structured,
            front_every: 1,
            shared_back: false,
        }
    }
}

impl SplitConfig {
    fn check(&self) -> Result<(), String> {
        exchange::check_bits(self.bits)?;
        if !(self.keep > 0.0 && self.keep <= 1.0) {
            return Err(format!(
                "keep {}: the fraction of activations sent must be in (0, 1]",
                self.keep
            ));
        }
        if !(0.0..1.0).contains(&self.prune) {
            return Err(format!("prune {}: must be in [0, 1)", self.prune));
        }
        if self.front_every == 0 {
            return Err("front_every must be ≥ 1".into());
        }
        Ok(())
    }
}

pub fn build(
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    let s: SplitConfig = parse_settings("split", settings)?;
    s.check().map_err(|e| format!("[strategy.split]: {e}"))?;
    Ok(Box::new(Split::new(config, s)))
}

pub struct Split {
    config: StrategyConfig,
    settings: SplitConfig,
    server: Arc<BackServer>,
    /// Each client's own full-width front, between front averagings.
    own: HashMap<u64, Vec<f32>>,
    /// The fronts handed out this round, by client.
    fronts: HashMap<u64, Arc<Front>>,
    mask_version: u64,
}

impl Split {
    pub fn new(config: StrategyConfig, settings: SplitConfig) -> Split {
        Split {
            config,
            settings,
            server: Arc::default(),
            own: HashMap::new(),
            fronts: HashMap::new(),
            mask_version: 0,
        }
    }

    /// The front client `client` trains this round.
    fn front_for(&mut self, global: &ModelState, cut: usize, client: u64) -> Result<Front, String> {
        let own = self.own.get(&client).map(|v| v.as_slice());
        let s = &self.settings;
        match s.prune_kind {
            PruneKind::Structured => Front::pruned(global, own, cut, s.prune),
            PruneKind::Magnitude => {
                let mut f = Front::pruned(global, own, cut, 0.0)?;
                if s.prune > 0.0 {
                    let mask = magnitude_mask(&f.model, s.prune);
                    f.model.set_mask(mask);
                    f.model.mask_version = self.mask_version;
                }
                Ok(f)
            }
        }
    }
}

/// Per weight tensor, the fraction `rho` of entries of smallest magnitude pruned; biases kept.
fn magnitude_mask(front: &ModelState, rho: f32) -> Vec<bool> {
    let mut mask = vec![true; front.params.len()];
    for p in front.arch.params().iter().filter(|p| p.shape.len() > 1) {
        let w = &front.params[p.offset..p.offset + p.len];
        let mut order: Vec<usize> = (0..p.len).collect();
        order.sort_by(|&a, &b| w[a].abs().total_cmp(&w[b].abs()).then(a.cmp(&b)));
        for &i in &order[..((p.len as f32 * rho) as usize).min(p.len - 1)] {
            mask[p.offset + i] = false;
        }
    }
    mask
}

/// The server's half: the backs and the per-batch step, called from the exchange workers.
#[derive(Default)]
pub struct BackServer {
    round: Mutex<Option<Arc<RoundBacks>>>,
    /// Batches being worked on now, and the most at once this round (several clients are
    /// served side by side).
    busy: AtomicUsize,
    peak: AtomicUsize,
    /// The client of the last batch served (+1; 0: none yet), and how often the next batch
    /// came from another client: clients served one after another would switch once per round.
    last: AtomicU64,
    switches: AtomicU64,
}

/// Counts a batch in work while it lives.
struct InWork<'a>(&'a BackServer);

impl<'a> InWork<'a> {
    fn new(s: &'a BackServer) -> Self {
        let now = s.busy.fetch_add(1, Ordering::SeqCst) + 1;
        s.peak.fetch_max(now, Ordering::SeqCst);
        InWork(s)
    }
}

impl Drop for InWork<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the back needs for one round.
struct RoundBacks {
    round: u32,
    arch: crate::model::arch::Arch,
    cut: usize,
    lr: f64,
    momentum: f64,
    bits: u8,
    clients: HashMap<u64, Mutex<ClientBack>>,
    /// The shared back, if backs are shared (then `ClientBack::back` is unused).
    shared: Option<Mutex<Back>>,
}

struct ClientBack {
    front: Arc<Front>,
    back: Back,
    next_seq: u32,
    bytes_up: u64,
    bytes_down: u64,
    seconds: f64,
}

impl Exchange for BackServer {
    fn handle(&self, round: u32, client: u64, seq: u32, request: &[u8]) -> Result<Vec<u8>, String> {
        let t0 = Instant::now();
        let _work = InWork::new(self);
        let r = self
            .round
            .lock()
            .unwrap()
            .clone()
            .filter(|r| r.round == round)
            .ok_or(format!("no split round {round} in progress"))?;
        let mut c = r
            .clients
            .get(&client)
            .ok_or("no split task of yours in this round")?
            .lock()
            .unwrap();
        if seq != c.next_seq {
            return Err(format!(
                "batch {seq} out of order: expected batch {}",
                c.next_seq
            ));
        }
        let batch = exchange::decode_request(request, r.arch.classes)?;
        let width = c.front.features.len();
        if batch.cols != width {
            return Err(format!(
                "activations of width {}, your front outputs {width}",
                batch.cols
            ));
        }
        let mut full = batch.clone();
        full.cols = c.front.full_width;
        full.values = c.front.widen(batch.rows, &batch.values);
        let device = Device::flex();
        let (loss, grad) = match &r.shared {
            Some(shared) => pollster::block_on(back_step(
                &r.arch,
                r.cut,
                &mut shared.lock().unwrap(),
                &full,
                r.lr,
                r.momentum,
                &device,
            ))?,
            None => pollster::block_on(back_step(
                &r.arch,
                r.cut,
                &mut c.back,
                &full,
                r.lr,
                r.momentum,
                &device,
            ))?,
        };
        let grad = c.front.narrow(batch.rows, &grad);
        // Stochastic rounding drawn per client and batch, reproducibly.
        let seed = ((round as u64) << 40) ^ (client << 20) ^ seq as u64;
        let reply = exchange::encode_reply(loss, &grad, &batch, r.bits, seed);
        c.next_seq += 1;
        let prev = self.last.swap(client + 1, Ordering::SeqCst);
        if prev != 0 && prev != client + 1 {
            self.switches.fetch_add(1, Ordering::SeqCst);
        }
        c.bytes_up += request.len() as u64;
        c.bytes_down += reply.len() as u64;
        c.seconds += t0.elapsed().as_secs_f64();
        Ok(reply)
    }
}

impl Strategy for Split {
    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> RoundPlan {
        let s = self.settings.clone();
        let cut = match global.arch.split_point(s.cut) {
            Ok(c) => c,
            Err(e) => {
                // `check_model` passed at start-up, so only a model that changed shape since
                // gets here: give no tasks, say why.
                eprintln!("split: {e}");
                return RoundPlan::buffered(Vec::new());
            }
        };
        self.mask_version += 1;
        let base = back_offset(&global.arch, cut);
        let momentum = match self.config.optimizer {
            Optimizer::Sgd { momentum } => momentum,
            Optimizer::Adam => 0.0,
        };
        let mut tasks = Vec::new();
        let mut backs = HashMap::new();
        self.fronts.clear();
        let mut shared_front: Option<Arc<Front>> = None;
        // Clients without a front of their own share one front and so one encoding of it.
        let mut shared_payload: Option<Arc<crate::protocol::ModelPayload>> = None;
        for c in sample_clients(clients, self.config.fraction, self.config.min_fit, rng) {
            let front = match (&shared_front, self.own.contains_key(&c.id)) {
                (Some(f), false) => f.clone(),
                _ => match self.front_for(global, cut, c.id) {
                    Ok(f) => Arc::new(f),
                    Err(e) => {
                        eprintln!("split: {e}");
                        return RoundPlan::buffered(Vec::new());
                    }
                },
            };
            if !self.own.contains_key(&c.id) {
                shared_front = Some(front.clone());
            }
            let model = if self.own.contains_key(&c.id) {
                Arc::new(crate::codec::encode_model(&front.model))
            } else {
                shared_payload
                    .get_or_insert_with(|| Arc::new(crate::codec::encode_model(&front.model)))
                    .clone()
            };
            let mut task = task_on(round, model, &self.config, c.id, UploadSpec::Weights);
            task.train.step.loss = LossSource::Remote {
                cut: front.model.arch.layers.len() as u32,
                keep: s.keep,
            };
            backs.insert(
                c.id,
                Mutex::new(ClientBack {
                    front: front.clone(),
                    back: Back::new(Vec::new()),
                    next_seq: 0,
                    bytes_up: 0,
                    bytes_down: 0,
                    seconds: 0.0,
                }),
            );
            self.fronts.insert(c.id, front);
            tasks.push((c.id, task));
        }
        let back = global.params[base..].to_vec();
        let shared = s.shared_back.then(|| Mutex::new(Back::new(back.clone())));
        if !s.shared_back {
            for c in backs.values_mut() {
                c.get_mut().unwrap().back = Back::new(back.clone());
            }
        }
        let lr = self.config.lr;
        *self.server.round.lock().unwrap() = Some(Arc::new(RoundBacks {
            round,
            arch: global.arch.clone(),
            cut,
            lr,
            momentum,
            bits: s.bits,
            clients: backs,
            shared,
        }));
        // The server trains the back batch by batch, and each client's result needs its own
        // back (`complete`): the round does not stream.
        RoundPlan::buffered(tasks).with_exchange(self.server.clone())
    }

    fn check_model(&self, arch: &crate::model::arch::Arch) -> Result<(), String> {
        arch.split_point(self.settings.cut)
            .map(|_| ())
            .map_err(|e| format!("[strategy.split]: {e}"))
    }

    /// The client's trained front written into its full-width front, followed by the back the
    /// server trained on its batches: the client's model, as FedAvg would have it.
    fn complete(&self, mut c: Contribution, global: &ModelState) -> Result<Contribution, String> {
        if c.kind != UploadKind::Weights {
            return Err("split learning expects front weights".into());
        }
        let r = self
            .server
            .round
            .lock()
            .unwrap()
            .clone()
            .ok_or("no split round in progress")?;
        let f = self.fronts.get(&c.client).ok_or(format!(
            "a result from client {} without a front this round",
            c.client
        ))?;
        let base = back_offset(&global.arch, r.cut);
        let mut full = self
            .own
            .get(&c.client)
            .cloned()
            .unwrap_or_else(|| global.params[..base].to_vec());
        f.expand_into(&c.values, &mut full)?;
        let cb = r
            .clients
            .get(&c.client)
            .ok_or("a result without a back")?
            .lock()
            .unwrap();
        // The front trained on exactly the batches the server answered this round (a result
        // carried over from an earlier round, or one that skipped batches, does not fit).
        if c.metrics.steps != cb.next_seq {
            return Err(format!(
                "a result of {} batches, the server answered {} this round",
                c.metrics.steps, cb.next_seq
            ));
        }
        match &r.shared {
            Some(b) => full.extend_from_slice(&b.lock().unwrap().params),
            None => full.extend_from_slice(&cb.back.params),
        }
        c.values = full;
        Ok(c)
    }

    fn aggregate(
        &mut self,
        round: u32,
        global: &mut ModelState,
        results: &[Contribution],
        _ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        let s = self.settings.clone();
        let r = self
            .server
            .round
            .lock()
            .unwrap()
            .take()
            .filter(|r| r.round == round)
            .ok_or("no split round to aggregate")?;
        if results
            .iter()
            .any(|c| c.kind != UploadKind::Weights || c.values.len() != global.params.len())
        {
            return Err(
                "split learning aggregates whole models (fronts completed with their backs)".into(),
            );
        }
        let base = back_offset(&global.arch, r.cut);
        let (mut up, mut down, mut server_s, mut batches) = (0u64, 0u64, 0f64, 0u64);
        let mut tab_ms = Vec::new();
        for c in results {
            // A client that vanished mid-round took its back with it: only results count.
            let Some(cb) = r.clients.get(&c.client) else {
                continue;
            };
            let cb = cb.lock().unwrap();
            up += cb.bytes_up;
            down += cb.bytes_down;
            server_s += cb.seconds;
            batches += cb.next_seq as u64;
            let m = &c.metrics;
            let tab_s = (m.train_seconds - m.exchange_seconds).max(0.0);
            if m.steps > 0 {
                tab_ms.push(1000.0 * tab_s / m.steps as f64);
            }
        }
        // Fronts and per-client backs: the sample-weighted mean (SplitFed v1); a shared back is
        // the same in every completed result, so the mean is that back.
        global.params = weighted_values(results)?;
        // Between front averagings each client keeps its own front (the global model, for
        // evaluation, holds their mean).
        if round.is_multiple_of(s.front_every) {
            self.own.clear();
        } else {
            for c in results {
                self.own.insert(c.client, c.values[..base].to_vec());
            }
        }
        let front = self
            .fronts
            .values()
            .next()
            .map(|f| f.model.params.len())
            .unwrap_or(0);
        let mut m = BTreeMap::new();
        m.insert(keys::SPLIT_CUT.into(), s.cut as f64);
        m.insert(keys::SPLIT_PRUNE.into(), s.prune as f64);
        m.insert(keys::SPLIT_KEEP.into(), s.keep as f64);
        m.insert(keys::SPLIT_BITS.into(), s.bits as f64);
        m.insert(keys::ACT_BYTES_UP.into(), up as f64);
        m.insert(keys::GRAD_BYTES_DOWN.into(), down as f64);
        m.insert(keys::SERVER_SECONDS.into(), server_s);
        m.insert(keys::EXCHANGES.into(), batches as f64);
        m.insert(keys::FRONT_PARAMS.into(), front as f64);
        m.insert(
            keys::EXCHANGES_AT_ONCE.into(),
            self.server.peak.swap(0, Ordering::SeqCst) as f64,
        );
        m.insert(
            keys::EXCHANGE_SWITCHES.into(),
            self.server.switches.swap(0, Ordering::SeqCst) as f64,
        );
        self.server.last.store(0, Ordering::SeqCst);
        if !tab_ms.is_empty() {
            m.insert(
                keys::TAB_MS_PER_BATCH.into(),
                tab_ms.iter().sum::<f64>() / tab_ms.len() as f64,
            );
        }
        if s.prune_kind == PruneKind::Magnitude {
            m.insert(
                keys::SPARSITY.into(),
                self.fronts
                    .values()
                    .next()
                    .map_or(0.0, |f| f.model.sparsity()),
            );
        }
        Ok(RoundOutcome { metrics: m })
    }

    fn save_state(&self) -> Vec<u8> {
        let own: BTreeMap<u64, Vec<f32>> = self.own.iter().map(|(k, v)| (*k, v.clone())).collect();
        postcard::to_allocvec(&(self.mask_version, own)).unwrap_or_default()
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.is_empty() {
            return Ok(());
        }
        let (v, own): (u64, BTreeMap<u64, Vec<f32>>) =
            postcard::from_bytes(bytes).map_err(|e| format!("split state: {e}"))?;
        self.mask_version = v;
        self.own = own.into_iter().collect();
        Ok(())
    }
}
