//! The browser tab's side of Canopy: picks the faster of WebGPU and the CPU backend (by timing
//! both) and runs the shared client runtime. It runs in a dedicated Web Worker (web/worker.js),
//! which owns the WebSocket; frames go through [`CanopyClient::handle`] and replies come back
//! through the `send` callback. The page only renders what the worker posts.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use burn::tensor::Device;
use canopy_core::client::{ClientHost, ClientRuntime};
use canopy_core::codec::{self, MaskCache};
use canopy_core::data::Dataset;
use canopy_core::model::arch::Arch;
use canopy_core::model::state::ModelState;
use canopy_core::protocol::{
    Backend, BackendSpeed, Blob, ClientMsg, DeviceInfo, MaskSpec, ServerMsg, decode, encode,
    is_exchange_reply,
};
use canopy_core::train::{Host, Progress, predict};
use js_sys::{Function, Promise, Uint8Array};
use serde_json::json;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};

/// Starts the rayon pool of `n` Web Workers burn's CPU backend computes on (threaded bundle
/// only; call once, before [`CanopyClient::create`], from a worker: the calling thread blocks
/// on atomics while the pool works).
#[cfg(feature = "threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

/// Threads burn's CPU backend computes on: the rayon pool's size in the threaded bundle (after
/// `initThreadPool`), 1 in the single-threaded one.
#[wasm_bindgen]
pub fn cpu_threads() -> usize {
    #[cfg(feature = "threads")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "threads"))]
    {
        1
    }
}

/// Exchange requests awaiting their reply, by (round, seq): the promise's resolve and reject.
type Pending = Rc<RefCell<HashMap<(u32, u32), (Function, Function)>>>;

struct WebHost {
    send: Function,
    progress: Function,
    pending: Pending,
}

fn now_ms() -> f64 {
    js_sys::Reflect::get(&js_sys::global(), &"performance".into())
        .ok()
        .and_then(|p| p.dyn_into::<web_sys::Performance>().ok())
        .map(|p| p.now())
        .unwrap_or_else(js_sys::Date::now)
}

/// Resolves on the next turn of the event loop, so the page can paint and the socket can breathe.
async fn yield_now() {
    let p = Promise::new(&mut |resolve, _| {
        let set_timeout = js_sys::Reflect::get(&js_sys::global(), &"setTimeout".into())
            .ok()
            .and_then(|f| f.dyn_into::<Function>().ok());
        if let Some(f) = set_timeout {
            let _ = f.call2(&JsValue::NULL, &resolve, &0.into());
        } else {
            let _ = resolve.call0(&JsValue::NULL);
        }
    });
    let _ = JsFuture::from(p).await;
}

impl Host for WebHost {
    fn now_ms(&self) -> f64 {
        now_ms()
    }

    async fn progress(&mut self, p: &Progress) {
        let v = json!({ "epoch": p.epoch, "epochs": p.epochs, "step": p.step, "steps": p.steps, "loss": p.loss, "samples_per_sec": p.samples_per_sec });
        let _ = self
            .progress
            .call1(&JsValue::NULL, &JsValue::from_str(&v.to_string()));
        yield_now().await;
    }
}

impl ClientHost for WebHost {
    fn send(&mut self, msg: ClientMsg) {
        let bytes = encode(&msg);
        let _ = self
            .send
            .call1(&JsValue::NULL, &Uint8Array::from(bytes.as_slice()));
    }

    /// Sends the request and awaits a promise that [`CanopyClient::route`] settles when the
    /// reply arrives (or [`CanopyClient::connection_lost`] rejects).
    async fn request(&mut self, round: u32, seq: u32, payload: Vec<u8>) -> Result<Blob, String> {
        let pending = self.pending.clone();
        let reply = Promise::new(&mut |resolve, reject| {
            pending.borrow_mut().insert((round, seq), (resolve, reject));
        });
        self.send(ClientMsg::Exchange {
            round,
            seq,
            payload: Blob(payload),
        });
        match JsFuture::from(reply).await {
            Ok(v) => Ok(Blob(Uint8Array::new(&v).to_vec())),
            Err(e) => Err(e.as_string().unwrap_or_else(|| "exchange failed".into())),
        }
    }
}

struct BenchHost;

impl Host for BenchHost {
    fn now_ms(&self) -> f64 {
        now_ms()
    }
    async fn progress(&mut self, _p: &Progress) {
        yield_now().await;
    }
}

/// Digits the student drew and labelled in this tab. They join the local training split and
/// never leave the tab: only model updates are sent, as for the rest of the shard.
#[derive(Default)]
struct OwnDigits {
    samples: Vec<(Vec<u8>, u8)>,
    /// How many of `samples` are already in the runtime's current shard.
    applied: usize,
    /// Training samples of the shard the server dealt us; the aggregation weight we report
    /// stays at this, since the server checks results against it.
    server_train: u64,
    /// Pixels per sample and class count of the shard, to check drawings without touching the
    /// runtime (it is borrowed while training).
    sample_len: usize,
    classes: usize,
    shape: [usize; 3],
    /// In a run on the tabs' own data (the welcome named classes): the examples the page
    /// labelled and stored, which replace the (empty) shard's training and held-out splits.
    tab: Option<TabExamples>,
    /// The run's data comes from the tab (the welcome named its classes).
    on_tabs: bool,
}

/// The tab's own examples, as the page hands them over (bytes 0–255, as every dataset).
struct TabExamples {
    train: Dataset,
    test: Dataset,
    /// Not yet written into the runtime's shard.
    dirty: bool,
}

impl TabExamples {
    /// The `ClientMsg::Examples` frame: how many examples per class, numbers only.
    fn counts_frame(&self) -> Vec<u8> {
        encode(&ClientMsg::Examples {
            train: self
                .train
                .class_counts()
                .iter()
                .map(|&n| n as u32)
                .collect(),
            test: self.test.class_counts().iter().map(|&n| n as u32).collect(),
        })
    }
}

impl OwnDigits {
    fn apply(&mut self, rt: &mut ClientRuntime<WebHost>) {
        if let Some(tab) = self.tab.as_mut() {
            if let Some(shard) = rt.shard.as_mut()
                && tab.dirty
            {
                shard.train = tab.train.clone();
                shard.test = tab.test.clone();
                tab.dirty = false;
            }
            return;
        }
        if let Some(shard) = rt.shard.as_mut() {
            for (px, label) in &self.samples[self.applied..] {
                shard.train.images.extend_from_slice(px);
                shard.train.labels.push(*label);
            }
            self.applied = self.samples.len();
        }
    }
}

#[wasm_bindgen]
pub struct CanopyClient {
    rt: Rc<RefCell<ClientRuntime<WebHost>>>,
    pending: Pending,
    own: Rc<RefCell<OwnDigits>>,
    /// The global model of the latest task and its round, kept outside the runtime so the page
    /// can try it while the runtime is busy training.
    latest: Rc<RefCell<Option<(Arch, Vec<f32>, u32)>>>,
    /// The Hello as of the last frame handled: a socket that reopens while a task is running
    /// (the server restarted mid-round) must say Hello at once, and the runtime is borrowed by
    /// the task until it ends.
    hello: Rc<RefCell<Vec<u8>>>,
}

#[wasm_bindgen]
impl CanopyClient {
    /// Starts the runtime. `backend`: "cpu" or "webgpu" forces one (`?backend=`); anything else
    /// ("auto") times a short MLP run on burn's CPU backend and, when the browser has a WebGPU
    /// adapter, on WebGPU, and keeps the faster. A software adapter (`software_adapter`: the
    /// worker read `isFallbackAdapter` and the adapter info; SwiftShader when Chromium has no
    /// usable GPU) is not timed unless `time_software`: its warm-up step took 12–21 s here, with
    /// the worker blocked for 10 s of it, and it then trained ~20–100× slower than the CPU backend. `send(Uint8Array)`
    /// sends a frame; `progress(json)` receives training progress. `bundle` says which build
    /// the worker loaded and why; it joins the adapter line of the Hello.
    pub async fn create(
        name: String,
        backend: String,
        software_adapter: bool,
        time_software: bool,
        user_agent: String,
        bundle: String,
        send: Function,
        progress: Function,
    ) -> CanopyClient {
        console_error_panic_hook::set_once();
        let (device, backend, mut adapter, speeds) =
            pick_backend(&backend, software_adapter, time_software).await;
        let threads = cpu_threads();
        if backend == Backend::WasmCpu && threads > 1 {
            adapter = format!("{adapter}; CPU backend on {threads} wasm threads");
        }
        // Which build the worker loaded and why ("bundle pkg-cpu: one thread: insecure
        // origin..."), so the dashboard can say why a tab is slow.
        if !bundle.is_empty() {
            adapter = format!("{adapter}; {bundle}");
        }
        let info = DeviceInfo {
            backend,
            adapter,
            user_agent,
            speeds,
        };
        let pending = Pending::default();
        let host = WebHost {
            send,
            progress,
            pending: pending.clone(),
        };
        let rt = ClientRuntime::new(host, device, info, name);
        let hello = Rc::new(RefCell::new(encode(&rt.hello())));
        CanopyClient {
            rt: Rc::new(RefCell::new(rt)),
            pending,
            own: Rc::default(),
            latest: Rc::default(),
            hello,
        }
    }

    /// What the start-up timing measured, as JSON: `[{backend, samples_per_sec, note}]`.
    pub fn speeds(&self) -> String {
        let rt = self.rt.borrow();
        serde_json::Value::Array(rt.info.speeds.iter().map(|s| json!({ "backend": s.backend.to_string(), "samples_per_sec": s.samples_per_sec, "note": s.note })).collect()).to_string()
    }

    /// Call for every frame before queueing it for [`CanopyClient::handle`]: a reply to an
    /// exchange request settles the request awaiting it (the task in progress) and returns
    /// true; any other frame returns false and goes to the queue. Replies nobody awaits (an
    /// earlier task's) are dropped.
    pub fn route(&self, frame: &[u8]) -> bool {
        if !is_exchange_reply(frame) {
            return false;
        }
        match decode::<ServerMsg>(frame) {
            Ok(ServerMsg::Exchange {
                round,
                seq,
                payload,
            }) => {
                if let Some((resolve, _)) = self.pending.borrow_mut().remove(&(round, seq)) {
                    let _ = resolve.call1(&JsValue::NULL, &Uint8Array::from(payload.0.as_slice()));
                }
                true
            }
            Ok(ServerMsg::ExchangeFailed {
                round,
                seq,
                message,
                ..
            }) => {
                if let Some((_, reject)) = self.pending.borrow_mut().remove(&(round, seq)) {
                    let _ = reject.call1(
                        &JsValue::NULL,
                        &JsValue::from_str(&format!("exchange refused: {message}")),
                    );
                }
                true
            }
            _ => false,
        }
    }

    /// The socket closed: every request awaiting a reply fails, so the task ends with an error
    /// instead of waiting forever.
    pub fn connection_lost(&self) {
        for (_, (_, reject)) in self.pending.borrow_mut().drain() {
            let _ = reject.call1(
                &JsValue::NULL,
                &JsValue::from_str("connection lost while awaiting an exchange reply"),
            );
        }
    }

    /// "webgpu" or "cpu".
    pub fn backend(&self) -> String {
        self.rt.borrow().info.backend.to_string()
    }

    pub fn adapter(&self) -> String {
        self.rt.borrow().info.adapter.clone()
    }

    /// The hello frame to send when the socket opens (carries the old id after a reconnect).
    pub fn hello(&self) -> Vec<u8> {
        match self.rt.try_borrow() {
            Ok(rt) => {
                let h = encode(&rt.hello());
                *self.hello.borrow_mut() = h.clone();
                h
            }
            // Mid-task: the id and mask version as of the last frame handled.
            Err(_) => self.hello.borrow().clone(),
        }
    }

    /// Handles one frame from the server. Resolves to a JSON string describing what happened,
    /// for the page to show. Call it for one frame at a time (the page queues them).
    pub fn handle(&self, frame: Vec<u8>) -> Promise {
        let rt = self.rt.clone();
        let own = self.own.clone();
        let latest = self.latest.clone();
        let hello = self.hello.clone();
        future_to_promise(async move {
            let msg: ServerMsg = match decode(&frame) {
                Ok(m) => m,
                Err(e) => {
                    return Ok(JsValue::from_str(
                        &json!({ "kind": "bad_frame", "message": e.to_string() }).to_string(),
                    ));
                }
            };
            let summary = match &msg {
                ServerMsg::Welcome(w) => json!({
                    "kind": "welcome", "client_id": w.client_id, "run": {
                        "run_id": w.run.run_id, "strategy": w.run.strategy, "model": w.run.model,
                        "dataset": w.run.dataset, "partition": w.run.partition, "rounds": w.run.rounds,
                        "classes": w.run.classes },
                    "shard": w.shard.index, "train": w.shard.train.len(), "test": w.shard.test.len(),
                    "classes": w.shard.train.class_counts(),
                }),
                ServerMsg::Task(t) => json!({
                    "kind": "task", "round": t.round, "params": t.model.arch.num_params(), "bytes": frame.len(),
                    "mask": t.model.mask.as_ref().map(|m| match m {
                        MaskSpec::Full { version, .. } => json!({ "version": version, "sent": true }),
                        MaskSpec::Cached { version } => json!({ "version": version, "sent": false }),
                    }),
                }),
                ServerMsg::Wait { round, reason } => {
                    json!({ "kind": "wait", "round": round, "reason": reason })
                }
                ServerMsg::Error { code, message } => {
                    json!({ "kind": "error", "code": format!("{code:?}"), "message": message })
                }
                ServerMsg::Bye { reason } => json!({ "kind": "bye", "reason": reason }),
                ServerMsg::Exchange { round, seq, .. } => {
                    json!({ "kind": "exchange", "round": round, "seq": seq })
                }
                ServerMsg::ExchangeFailed {
                    round,
                    seq,
                    message,
                    ..
                } => json!({ "kind": "error", "round": round, "seq": seq, "message": message }),
            };
            let mut rt = rt
                .try_borrow_mut()
                .map_err(|_| JsValue::from_str("handle() called while a task is running"))?;
            let welcome = matches!(msg, ServerMsg::Welcome(_));
            if let ServerMsg::Task(t) = &msg {
                // Peek at the model for "try the model" (the runtime decodes it for training).
                let mut cache: MaskCache = rt.state.mask.clone();
                if let Ok(m) = codec::decode_model(&t.model, &mut cache, false) {
                    *latest.borrow_mut() = Some((m.arch, m.params, t.round));
                }
            }
            own.borrow_mut().apply(&mut rt);
            let mut reply = rt.handle(msg).await;
            *hello.borrow_mut() = encode(&rt.hello());
            if welcome {
                // A (re)joined tab gets its shard afresh: put the student's digits back in.
                let mut own = own.borrow_mut();
                if let Some(s) = rt.shard.as_ref() {
                    (own.server_train, own.sample_len, own.classes, own.shape) = (
                        s.train.len() as u64,
                        s.train.sample_len(),
                        s.train.classes,
                        s.train.shape,
                    );
                }
                own.on_tabs = rt.run.as_ref().is_some_and(|r| !r.classes.is_empty());
                own.applied = 0;
                if let Some(tab) = own.tab.as_mut() {
                    // The server forgets a tab's counts when it leaves: say them again.
                    tab.dirty = true;
                    let _ = rt.host.send.call1(
                        &JsValue::NULL,
                        &Uint8Array::from(tab.counts_frame().as_slice()),
                    );
                }
                own.apply(&mut rt);
            }
            let mut summary = summary;
            if let Some(ClientMsg::Result(r)) = reply.as_mut()
                && !own.borrow().on_tabs
            {
                r.samples = r.samples.min(own.borrow().server_train.max(1));
            }
            if let Some(reply) = reply {
                match &reply {
                    ClientMsg::Result(r) => {
                        summary["result"] = json!({
                            "samples": r.samples, "train_loss": r.metrics.train_loss,
                            "local_accuracy": r.metrics.local_test.accuracy, "local_loss": r.metrics.local_test.loss,
                            "samples_per_sec": r.metrics.samples_per_sec, "seconds": r.metrics.train_seconds,
                            "steps": r.metrics.steps, "epochs": r.metrics.epochs,
                            "pruned_nonzero": r.metrics.pruned_nonzero, "mask_version": r.mask_version,
                        });
                    }
                    ClientMsg::Error { message, .. } => summary["failed"] = json!(message),
                    _ => {}
                }
                let bytes = encode(&reply);
                summary["reply_bytes"] = json!(bytes.len());
                let _ = rt
                    .host
                    .send
                    .call1(&JsValue::NULL, &Uint8Array::from(bytes.as_slice()));
            }
            Ok(JsValue::from_str(&summary.to_string()))
        })
    }

    /// Training speed on this tab's backend, in samples per second: `steps` steps of `model`
    /// (a preset name) on random 28×28 inputs, with every hidden layer cut to `keep` of its
    /// units by the same surgery structured pruning uses (1.0: the full model). For benchmarks.
    pub fn bench(&self, model: String, batch: usize, steps: u32, keep: f32) -> Promise {
        let rt = self.rt.clone();
        future_to_promise(async move {
            let device = rt
                .try_borrow()
                .map_err(|_| JsValue::from_str("busy training"))?
                .device
                .clone();
            let r = timed_run(&device, &model, batch, steps, keep, f64::INFINITY)
                .await
                .map_err(|e| JsValue::from_str(&e))?;
            let v = json!({ "samples_per_sec": r.samples_per_sec, "params": r.params, "flops": r.flops, "step_ms": r.step_ms });
            Ok(JsValue::from_str(&v.to_string()))
        })
    }

    /// Adds one drawn digit (784 pixels in [0, 1], white on black) with its label to this tab's
    /// training data. It stays in the tab. Returns how many own digits the tab holds.
    pub fn add_sample(&self, pixels: Vec<f32>, label: u8) -> Result<u32, JsValue> {
        let (len, classes) = {
            let own = self.own.borrow();
            (own.sample_len, own.classes)
        };
        if len == 0 {
            return Err(JsValue::from_str(
                "no data shard yet: wait until the tab has joined",
            ));
        }
        if pixels.len() != len {
            return Err(JsValue::from_str(&format!(
                "expected {len} pixels, got {}",
                pixels.len()
            )));
        }
        if label as usize >= classes {
            return Err(JsValue::from_str(&format!(
                "label {label} is not below {classes}"
            )));
        }
        let bytes = pixels
            .iter()
            .map(|p| (p.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        let mut own = self.own.borrow_mut();
        own.samples.push((bytes, label));
        // Straight into the shard when no task is running; otherwise before the next task.
        if let Ok(mut rt) = self.rt.try_borrow_mut() {
            own.apply(&mut rt);
        }
        Ok(own.samples.len() as u32)
    }

    /// In a run on the tabs' own data: replaces the tab's examples with these (28×28 bytes per
    /// example, 0–255, row-major, and one label each; the held-out ones measure the tab's own
    /// accuracy). They stay in the tab. Returns the `ClientMsg::Examples` frame to send: the
    /// counts per class, nothing else.
    pub fn set_examples(
        &self,
        train_images: Vec<u8>,
        train_labels: Vec<u8>,
        test_images: Vec<u8>,
        test_labels: Vec<u8>,
    ) -> Result<Vec<u8>, JsValue> {
        let mut own = self.own.borrow_mut();
        if !own.on_tabs {
            return Err(JsValue::from_str(
                "this run's data is dealt by the server: it takes no examples of the tab's own",
            ));
        }
        let (len, classes, shape) = (own.sample_len, own.classes, own.shape);
        let data = |images: Vec<u8>, labels: Vec<u8>| -> Result<Dataset, JsValue> {
            if images.len() != labels.len() * len {
                return Err(JsValue::from_str(&format!(
                    "{} bytes for {} examples of {len}",
                    images.len(),
                    labels.len()
                )));
            }
            if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
                return Err(JsValue::from_str(&format!(
                    "label {l} is not below {classes}"
                )));
            }
            Ok(Dataset {
                shape,
                classes,
                images,
                labels,
            })
        };
        let tab = TabExamples {
            train: data(train_images, train_labels)?,
            test: data(test_images, test_labels)?,
            dirty: true,
        };
        let frame = tab.counts_frame();
        own.tab = Some(tab);
        // Straight into the shard when no task is running; otherwise before the next task.
        if let Ok(mut rt) = self.rt.try_borrow_mut() {
            own.apply(&mut rt);
        }
        Ok(frame)
    }

    /// Training samples in this tab's shard now (the dealt ones plus the student's own digits);
    /// while a task runs, what it will hold for the next one.
    pub fn train_samples(&self) -> u32 {
        match self.rt.try_borrow() {
            Ok(rt) if self.own.borrow().applied == self.own.borrow().samples.len() => {
                rt.shard.as_ref().map_or(0, |s| s.train.len() as u32)
            }
            _ => {
                let own = self.own.borrow();
                own.server_train as u32 + own.samples.len() as u32
            }
        }
    }

    /// Class probabilities from the global model of the latest task, on the CPU backend, so it
    /// works while this tab trains ("try the model"). Pixels in [0, 1].
    pub fn try_model(&self, pixels: Vec<f32>) -> Promise {
        let latest = self.latest.borrow().clone();
        let classes = self.own.borrow().classes;
        future_to_promise(async move {
            let (arch, params, _) = latest.ok_or_else(|| {
                JsValue::from_str("no model yet: the first round has not started")
            })?;
            if arch.classes != classes {
                return Err(JsValue::from_str(
                    "this tab holds only the front of the model (split learning): try the whole model on the dashboard",
                ));
            }
            let probs = predict(&arch, &params, &pixels, &Device::flex())
                .await
                .map_err(|e| JsValue::from_str(&e))?;
            Ok(js_sys::Float32Array::from(probs.as_slice()).into())
        })
    }

    /// Round of the model `try_model` uses (0: none yet).
    pub fn model_round(&self) -> u32 {
        self.latest.borrow().as_ref().map_or(0, |m| m.2)
    }

    /// Class probabilities of the latest model for one image (pixels in [0, 1]).
    pub fn predict(&self, pixels: Vec<f32>) -> Promise {
        let rt = self.rt.clone();
        future_to_promise(async move {
            let (arch, params, device) = {
                let rt = rt
                    .try_borrow()
                    .map_err(|_| JsValue::from_str("busy training"))?;
                let (a, p) = rt
                    .last_model
                    .clone()
                    .ok_or_else(|| JsValue::from_str("no model yet"))?;
                (a, p, rt.device.clone())
            };
            let probs = predict(&arch, &params, &pixels, &device)
                .await
                .map_err(|e| JsValue::from_str(&e))?;
            Ok(js_sys::Float32Array::from(probs.as_slice()).into())
        })
    }
}

/// Class probabilities for one image from a model downloaded from the server (`/api/model.bin`,
/// a postcard-encoded `ModelState`), on burn's CPU backend: the dashboard's "try the model".
#[wasm_bindgen]
pub fn predict_with_model(model: Vec<u8>, pixels: Vec<f32>) -> Promise {
    console_error_panic_hook::set_once();
    future_to_promise(async move {
        let state: ModelState = postcard::from_bytes(&model)
            .map_err(|e| JsValue::from_str(&format!("model.bin: {e}")))?;
        state
            .arch
            .validate()
            .map_err(|e| JsValue::from_str(&e.to_string()))?;
        let expected: usize = state.arch.input.iter().product();
        if pixels.len() != expected {
            return Err(JsValue::from_str(&format!(
                "expected {expected} pixels, got {}",
                pixels.len()
            )));
        }
        let probs = predict(
            &state.arch,
            &state.masked_params(),
            &pixels,
            &Device::flex(),
        )
        .await
        .map_err(|e| JsValue::from_str(&e))?;
        Ok(js_sys::Float32Array::from(probs.as_slice()).into())
    })
}

/// One timed training run on synthetic data (see [`CanopyClient::bench`]).
struct Timed {
    samples_per_sec: f64,
    step_ms: f64,
    params: usize,
    flops: u64,
    /// Whether the warm-up step alone went over the budget (the timed steps were skipped).
    #[cfg_attr(not(feature = "webgpu"), allow(dead_code))]
    over_budget: bool,
}

/// `steps` steps of `model` (a preset name) on random 28×28 inputs after one warm-up step
/// (shader compilation on WebGPU), every hidden layer cut to `keep` of its units. When the
/// warm-up alone takes longer than `budget_ms`, its own speed is returned instead.
async fn timed_run(
    device: &Device,
    model: &str,
    batch: usize,
    steps: u32,
    keep: f32,
    budget_ms: f64,
) -> Result<Timed, String> {
    let arch = Arch::preset(model, [1, 28, 28], 10).map_err(|e| e.to_string())?;
    let state = canopy_core::model::surgery::shrink_to(&ModelState::init(arch, 1), keep);
    let n = batch * steps as usize;
    let images: Vec<u8> = (0..n * 784).map(|i| (i * 7919 % 251) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let data = canopy_core::data::Dataset {
        shape: [1, 28, 28],
        classes: 10,
        images,
        labels,
    };
    let spec = canopy_core::train::TrainSpec {
        epochs: 1,
        batch_size: batch,
        lr: 0.01,
        optimizer: canopy_core::train::Optimizer::Sgd { momentum: 0.0 },
        seed: 1,
        patience: 0,
        step: Default::default(),
    };
    let mut host = BenchHost;
    let (params, flops) = (state.arch.num_params(), state.arch.flops_per_sample());
    let warm = data.select(&(0..batch).collect::<Vec<_>>());
    let t0 = now_ms();
    canopy_core::train::train_local(
        &state.arch,
        &state.params,
        None,
        &warm,
        &spec,
        device,
        &mut host,
    )
    .await?;
    let warm_ms = now_ms() - t0;
    if warm_ms > budget_ms {
        return Ok(Timed {
            samples_per_sec: batch as f64 * 1000.0 / warm_ms,
            step_ms: warm_ms,
            params,
            flops,
            over_budget: true,
        });
    }
    let t = canopy_core::train::train_local(
        &state.arch,
        &state.params,
        None,
        &data,
        &spec,
        device,
        &mut host,
    )
    .await?;
    Ok(Timed {
        samples_per_sec: t.samples_per_sec(),
        step_ms: 1000.0 * t.seconds / t.steps.max(1) as f64,
        params,
        flops,
        over_budget: false,
    })
}

/// Timed steps of the start-up comparison (MLP, batch 32): enough to average out one slow step,
/// few enough that the CPU side costs about 100 ms.
const PROBE_STEPS: u32 = 6;
/// Time WebGPU's warm-up step (which compiles every shader) may take before the CPU backend
/// wins without the timed steps: generous for a hardware adapter, short for a software one.
#[cfg(feature = "webgpu")]
const HARDWARE_BUDGET_MS: f64 = 10_000.0;
#[cfg(feature = "webgpu")]
const SOFTWARE_BUDGET_MS: f64 = 1000.0;

/// Chooses the training device (see [`CanopyClient::create`]). Returns the device, its backend,
/// the adapter description (or why WebGPU is not used) and the timings behind the choice.
async fn pick_backend(
    wanted: &str,
    software_adapter: bool,
    time_software: bool,
) -> (Device, Backend, String, Vec<BackendSpeed>) {
    if wanted == "cpu" {
        return (
            Device::flex(),
            Backend::WasmCpu,
            "WebGPU not requested (?backend=cpu)".into(),
            Vec::new(),
        );
    }
    // The CPU-only bundles (threaded web/pkg-mt, single-threaded web/pkg-cpu) have no WebGPU:
    // web/bundle.js picks them only when the browser has no adapter or a software one (which is
    // not timed unless `time_software`, and then the worker loads the WebGPU build instead), so
    // the answer is the CPU backend. It still times it, and says what it did not time, as the
    // WebGPU build would.
    #[cfg(not(feature = "webgpu"))]
    {
        let _ = time_software;
        if !software_adapter {
            return (
                Device::flex(),
                Backend::WasmCpu,
                "no WebGPU adapter (this bundle is CPU only)".into(),
                Vec::new(),
            );
        }
        let cpu = Device::flex();
        let cpu_speed = match timed_run(&cpu, "mlp", 32, PROBE_STEPS, 1.0, f64::INFINITY).await {
            Ok(t) => BackendSpeed {
                backend: Backend::WasmCpu,
                samples_per_sec: Some(t.samples_per_sec as f32),
                note: format!(
                    "{PROBE_STEPS} MLP steps of 32 after a warm-up, {:.1} ms a step",
                    t.step_ms
                ),
            },
            Err(e) => BackendSpeed {
                backend: Backend::WasmCpu,
                samples_per_sec: None,
                note: format!("failed: {e}"),
            },
        };
        let gpu_speed = BackendSpeed {
            backend: Backend::WebGpu,
            samples_per_sec: None,
            note: "software adapter (isFallbackAdapter): not timed, the CPU backend is used".into(),
        };
        (
            cpu,
            Backend::WasmCpu,
            "CPU backend, not WebGPU on a software adapter".into(),
            vec![cpu_speed, gpu_speed],
        )
    }
    #[cfg(feature = "webgpu")]
    pick_webgpu(wanted, software_adapter, time_software).await
}

/// [`pick_backend`] when the bundle has WebGPU.
#[cfg(feature = "webgpu")]
async fn pick_webgpu(
    wanted: &str,
    software_adapter: bool,
    time_software: bool,
) -> (Device, Backend, String, Vec<BackendSpeed>) {
    let (gpu, label) = match Device::wgpu_options().init_with_setup_async().await {
        Ok((device, setup)) => {
            let i = setup.adapter.get_info();
            let name = [i.name.as_str(), i.driver.as_str(), i.driver_info.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(" / ");
            let kind = if software_adapter {
                ", software adapter"
            } else {
                ""
            };
            (
                device,
                format!(
                    "{} ({:?}, vendor {:#x}{kind})",
                    if name.is_empty() {
                        "WebGPU adapter"
                    } else {
                        &name
                    },
                    i.device_type,
                    i.vendor
                ),
            )
        }
        Err(e) => {
            return (
                Device::flex(),
                Backend::WasmCpu,
                format!("no WebGPU: {e}"),
                Vec::new(),
            );
        }
    };
    if wanted == "webgpu" {
        return (
            gpu,
            Backend::WebGpu,
            format!("{label}; forced by ?backend=webgpu"),
            Vec::new(),
        );
    }
    let cpu = Device::flex();
    let speed = |backend, t: Result<Timed, String>, budget: f64| match t {
        Ok(t) if t.over_budget => BackendSpeed {
            backend,
            samples_per_sec: Some(t.samples_per_sec as f32),
            note: format!(
                "warm-up step alone took {:.0} ms, over its {budget:.0} ms budget (an upper bound)",
                t.step_ms
            ),
        },
        Ok(t) => BackendSpeed {
            backend,
            samples_per_sec: Some(t.samples_per_sec as f32),
            note: format!(
                "{PROBE_STEPS} MLP steps of 32 after a warm-up, {:.1} ms a step",
                t.step_ms
            ),
        },
        Err(e) => BackendSpeed {
            backend,
            samples_per_sec: None,
            note: format!("failed: {e}"),
        },
    };
    let cpu_speed = speed(
        Backend::WasmCpu,
        timed_run(&cpu, "mlp", 32, PROBE_STEPS, 1.0, f64::INFINITY).await,
        f64::INFINITY,
    );
    let gpu_speed = if software_adapter && !time_software {
        BackendSpeed {
            backend: Backend::WebGpu,
            samples_per_sec: None,
            note: "software adapter (isFallbackAdapter): not timed, the CPU backend is used".into(),
        }
    } else {
        let budget = if software_adapter {
            SOFTWARE_BUDGET_MS
        } else {
            HARDWARE_BUDGET_MS
        };
        speed(
            Backend::WebGpu,
            timed_run(&gpu, "mlp", 32, PROBE_STEPS, 1.0, budget).await,
            budget,
        )
    };
    let faster =
        gpu_speed.samples_per_sec.unwrap_or(0.0) > cpu_speed.samples_per_sec.unwrap_or(0.0);
    let speeds = vec![cpu_speed, gpu_speed];
    if faster {
        (
            gpu,
            Backend::WebGpu,
            format!("{label}; faster than the CPU backend"),
            speeds,
        )
    } else {
        (
            cpu,
            Backend::WasmCpu,
            format!("CPU backend, not WebGPU on {label}"),
            speeds,
        )
    }
}
