// The tab's training runtime, in a dedicated Web Worker: loads the wasm client, chooses the
// backend, owns the WebSocket, queues frames into the runtime one at a time and reconnects with
// backoff. A CNN step takes hundreds of milliseconds on the CPU backend; here it never blocks the
// page, which only renders what this worker posts (web/client.js).
//
// To the page: { state, set: {elementId: text}, bar, log } after every change, where `state`
// is the tab's whole public state (tests read it as window.canopy.state). From the page:
// { start: { name, backend, timeSoftware, userAgent } } once, then { call, id, args } for the client's methods
// ("try the model", "teach it", benchmarks), answered with { reply: id, value } or { reply: id, error }.
//
// Three builds of the client, chosen by web/bundle.js from what the tab really has: web/pkg
// (WebGPU and the CPU backend, one thread) for a hardware WebGPU adapter, web/pkg-mt (threaded,
// CPU only) on a cross-origin isolated page (https, localhost), web/pkg-cpu (one thread, CPU
// only) otherwise, a plain-http LAN page above all. Only the chosen one is downloaded.
import { fmtBytes } from './format.js';
import { chooseBundle } from './bundle.js';

const query = new URLSearchParams(self.location.search);

const state = {
  status: 'loading', backend: null, adapter: null, speeds: [], clientId: null, round: null,
  roundsDone: 0, results: [], bytesSent: 0, bytesReceived: 0, errors: [], finished: false, lastSummary: null,
  firstProgress: null, resources: [],
  // The bundle the tab runs ('pkg' WebGPU, 'pkg-mt' threaded, 'pkg-cpu' single-threaded CPU),
  // the threads burn's CPU backend computes on, and why that bundle.
  bundle: null, threads: 1, threadsNote: null, crossOriginIsolated: Boolean(self.crossOriginIsolated),
};

function post(set = {}, extra = {}) { postMessage({ state, set, ...extra }); }
function log(text) { post({}, { log: text }); }
function setStatus(s) { state.status = s; post({ status: s }); }
const bytesText = () => `${fmtBytes(state.bytesSent)} / ${fmtBytes(state.bytesReceived)}`;

let ws = null;
let queue = Promise.resolve();
let backoff = 500;
let client;

function sendFrame(bytes) {
  if (ws && ws.readyState === WebSocket.OPEN) {
    ws.send(bytes);
    state.bytesSent += bytes.byteLength;
    post({ bytes: bytesText() });
  }
}

function onProgress(json) {
  const p = JSON.parse(json);
  // When training first got under way, on the worker's clock (its origin is the page's start
  // within a millisecond or so; the page records its own time of arrival too).
  if (!state.firstProgress) state.firstProgress = { step: p.step, workerMs: performance.now() };
  post({
    step: `step ${p.step}/${p.steps}, epoch ${p.epoch}/${p.epochs}`,
    loss: p.loss.toFixed(4), sps: p.samples_per_sec.toFixed(0),
  }, { bar: p.step / Math.max(1, p.steps), progress: p });
}

function onSummary(json) {
  const s = JSON.parse(json);
  state.lastSummary = s;
  switch (s.kind) {
    case 'welcome':
      state.clientId = s.client_id;
      // A run on the tabs' own data names its classes: the page labels and keeps the examples.
      state.classes = s.run.classes;
      post({
        run: `${s.run.strategy} · ${s.run.model} · ${s.run.dataset} · ${s.run.partition} · ${s.run.rounds} rounds`,
        shard: s.run.classes.length ? `this tab's own examples (${s.run.classes.join(', ')})` : `#${s.shard}: ${s.train} training + ${s.test} test samples`,
      });
      setStatus('waiting for a round');
      log(`joined as client ${s.client_id}, data shard ${s.shard} (${s.train} samples)`);
      break;
    case 'task':
      state.round = s.round;
      post({ round: String(s.round) });
      if (s.result) {
        state.roundsDone += 1;
        state.results.push({ round: s.round, params: s.params, taskBytes: s.bytes, mask: s.mask, uploadBytes: s.reply_bytes, ...s.result });
        post({
          done: String(state.roundsDone), acc: `${(100 * s.result.local_accuracy).toFixed(1)} %`,
          loss: s.result.train_loss.toFixed(4), sps: s.result.samples_per_sec.toFixed(0),
        });
        log(`round ${s.round}: trained ${s.result.steps} steps in ${s.result.seconds.toFixed(1)} s, local accuracy ${(100 * s.result.local_accuracy).toFixed(1)} %, sent ${fmtBytes(s.reply_bytes)}`);
      } else if (s.failed) {
        state.errors.push(s.failed);
        log(`round ${s.round} failed: ${s.failed}`);
      }
      setStatus('waiting for a round');
      break;
    case 'wait':
      setStatus(`idle (${s.reason})`);
      break;
    case 'error':
    case 'bad_frame':
      state.errors.push(s.message);
      log(`server says: ${s.message}`);
      break;
    case 'bye':
      state.finished = true;
      setStatus(`finished: ${s.reason}`);
      log(`the server ended the run: ${s.reason}`);
      break;
  }
}

function connect() {
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
  setStatus('connecting');
  ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => {
    backoff = 500;
    setStatus('connected');
    sendFrame(client.hello());
  };
  ws.onmessage = (ev) => {
    const bytes = new Uint8Array(ev.data);
    state.bytesReceived += bytes.byteLength;
    post({ bytes: bytesText() });
    // A reply to the running task's exchange request goes straight to the request awaiting it.
    if (client.route(bytes)) { state.exchanges = (state.exchanges || 0) + 1; return; }
    // Other frames are handled strictly one after another: a task runs to completion first.
    queue = queue.then(() => {
      if (state.finished) return;
      const small = bytes.byteLength < 4096 ? '' : ` (${fmtBytes(bytes.byteLength)})`;
      if (small) setStatus(`training${small}`);
      return client.handle(bytes).then(onSummary);
    }).catch((e) => {
      state.errors.push(String(e));
      log(`error: ${e}`);
    });
  };
  ws.onclose = () => {
    client.connection_lost();
    if (state.finished) return;
    setStatus(`disconnected; retrying in ${(backoff / 1000).toFixed(1)} s`);
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 10000);
  };
}

// The adapter WebGPU would use, as the browser describes it: a software one (SwiftShader when
// Chromium has no usable GPU) gets only a short try against the CPU backend.
async function adapterInfo() {
  try {
    const a = await navigator.gpu?.requestAdapter();
    if (!a) return null;
    const i = a.info || {};
    const text = [i.vendor, i.architecture, i.device, i.description].filter(Boolean).join(' ');
    const software = Boolean(i.isFallbackAdapter ?? a.isFallbackAdapter) || /swiftshader|llvmpipe|lavapipe|softpipe|microsoft basic render/i.test(text);
    return { text, software };
  } catch {
    return null;
  }
}

// What the tab has, as web/bundle.js reads it.
function environment(gpu) {
  return {
    secure: Boolean(self.isSecureContext),
    isolated: Boolean(self.crossOriginIsolated) && typeof SharedArrayBuffer === 'function',
    cores: navigator.hardwareConcurrency || 1,
    gpu,
  };
}

// Loads the chosen bundle and, for the threaded one, starts its pool. Falls back to web/pkg-cpu
// when the threaded bundle fails (a browser without wasm threads).
async function load(gpu) {
  const p = chooseBundle(environment(gpu), query);
  if (p.bundle === 'pkg-mt') {
    try {
      const wasm = await import('./pkg-mt/canopy_client.js');
      await wasm.default();
      await wasm.initThreadPool(p.threads);
      return { wasm, bundle: 'pkg-mt', threads: wasm.cpu_threads(), note: p.note };
    } catch (e) {
      Object.assign(p, { bundle: 'pkg-cpu', note: `one thread: the threaded bundle failed (${e})` });
    }
  }
  const wasm = await import(p.bundle === 'pkg' ? './pkg/canopy_client.js' : './pkg-cpu/canopy_client.js');
  await wasm.default();
  return { wasm, bundle: p.bundle, threads: 1, note: p.note };
}

// The wasm module downloads and compiles while the page asks for a nickname.
const ready = adapterInfo().then(async (gpu) => [await load(gpu), gpu]);
const started = new Promise((res) => {
  self.onmessage = (ev) => {
    if (ev.data.start) res(ev.data.start);
    else if (ev.data.call) answer(ev.data);
  };
});

// The client's methods the page may call; each answer goes back with the call's id.
const methods = {
  predict: (px) => client.predict(px),
  try_model: (px) => client.try_model(px),
  model_round: () => client.model_round(),
  add_sample: (px, label) => client.add_sample(px, label),
  train_samples: () => client.train_samples(),
  // The tab's own examples (bytes, labels; training then held out): the runtime keeps them,
  // and the server gets the counts per class, nothing more.
  set_examples: (px, labels, testPx, testLabels) => { sendFrame(client.set_examples(px, labels, testPx, testLabels)); },
  bench: (model, batch, steps, keep) => client.bench(model, batch, steps, keep),
};
async function answer({ call, id, args }) {
  try {
    if (!client) throw new Error('the training runtime is not ready yet');
    const value = await methods[call](...args);
    postMessage({ reply: id, value });
  } catch (e) {
    postMessage({ reply: id, error: String(e) });
  }
}

try {
  setStatus('loading the training runtime…');
  const [[loaded, gpu], start] = await Promise.all([ready, started]);
  Object.assign(state, { bundle: loaded.bundle, threads: loaded.threads, threadsNote: loaded.note });
  // Absolute times (ms since 1970), so the page can put them on its own clock.
  const now = () => performance.timeOrigin + performance.now();
  state.timing = { wasmReady: now() };
  state.resources = performance.getEntriesByType('resource').map((r) => ({ name: r.name, transferSize: r.transferSize, encodedBodySize: r.encodedBodySize, decodedBodySize: r.decodedBodySize }));
  const wanted = ['cpu', 'webgpu'].includes(start.backend) ? start.backend : 'auto';
  if (wanted === 'auto' && gpu) setStatus('timing the backends…');
  // The Hello's adapter line says which bundle and why (the dashboard shows it per client).
  const bundleText = `bundle ${loaded.bundle}: ${loaded.note}`;
  client = await loaded.wasm.CanopyClient.create(start.name, wanted, gpu?.software ?? false, start.timeSoftware, start.userAgent, bundleText, sendFrame, onProgress);
  state.backend = client.backend();
  state.adapter = client.adapter();
  state.speeds = JSON.parse(client.speeds());
  state.timing.backendChosen = now();
  const speedText = state.speeds.map((s) => `${s.backend === 'webgpu' ? 'WebGPU' : 'CPU'} ${s.samples_per_sec === null ? 'not timed (software adapter)' : `${s.samples_per_sec.toFixed(0)} samples/s`}`).join(', ');
  const cpuText = state.threads > 1 ? `CPU (wasm, ${state.threads} threads)` : 'CPU (wasm)';
  post({ backend: state.backend === 'webgpu' ? 'WebGPU' : cpuText, adapter: state.adapter, speeds: speedText || '–' }, { ready: true });
  log(`runtime ready on ${state.backend}${speedText ? ` (timed: ${speedText})` : ''}; ${loaded.note}`);
  connect();
} catch (e) {
  state.errors.push(String(e));
  setStatus(`failed to start: ${e}`);
}
