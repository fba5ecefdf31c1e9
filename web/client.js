// The page around the wasm client: owns the WebSocket, queues frames into the wasm runtime one
// at a time, shows what happens, and reconnects with backoff when the server goes away.
import init, { CanopyClient } from './pkg/canopy_client.js';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const state = {
  status: 'loading', backend: null, adapter: null, clientId: null, round: null,
  roundsDone: 0, results: [], bytesSent: 0, bytesReceived: 0, errors: [], finished: false, lastSummary: null,
};
window.canopy = { state };

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(2)} MiB`;
}
function log(text) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  const ol = $('log');
  ol.prepend(li);
  while (ol.children.length > 60) ol.lastChild.remove();
}
function setStatus(s) { state.status = s; $('status').textContent = s; }
function showBytes() { $('bytes').textContent = `${fmtBytes(state.bytesSent)} / ${fmtBytes(state.bytesReceived)}`; }

const name = params.get('name') || sessionStorage.getItem('canopy-name') || `tab-${Math.random().toString(36).slice(2, 6)}`;
sessionStorage.setItem('canopy-name', name);
$('name').textContent = name;

let ws = null;
let queue = Promise.resolve();
let backoff = 500;

function sendFrame(bytes) {
  if (ws && ws.readyState === WebSocket.OPEN) {
    ws.send(bytes);
    state.bytesSent += bytes.byteLength;
    showBytes();
  }
}

function onProgress(json) {
  const p = JSON.parse(json);
  $('bar').value = p.step / Math.max(1, p.steps);
  $('step').textContent = `step ${p.step}/${p.steps}, epoch ${p.epoch}/${p.epochs}`;
  $('loss').textContent = p.loss.toFixed(4);
  $('sps').textContent = p.samples_per_sec.toFixed(0);
}

function onSummary(json) {
  const s = JSON.parse(json);
  state.lastSummary = s;
  switch (s.kind) {
    case 'welcome':
      state.clientId = s.client_id;
      $('run').textContent = `${s.run.strategy} · ${s.run.model} · ${s.run.dataset} · ${s.run.partition} · ${s.run.rounds} rounds`;
      $('shard').textContent = `#${s.shard}: ${s.train} training + ${s.test} test samples`;
      setStatus('waiting for a round');
      log(`joined as client ${s.client_id}, data shard ${s.shard} (${s.train} samples)`);
      break;
    case 'task':
      state.round = s.round;
      $('round').textContent = s.round;
      if (s.result) {
        state.roundsDone += 1;
        state.results.push({ round: s.round, params: s.params, taskBytes: s.bytes, mask: s.mask, uploadBytes: s.reply_bytes, ...s.result });
        $('done').textContent = state.roundsDone;
        $('acc').textContent = `${(100 * s.result.local_accuracy).toFixed(1)} %`;
        $('loss').textContent = s.result.train_loss.toFixed(4);
        $('sps').textContent = s.result.samples_per_sec.toFixed(0);
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
    showBytes();
    // Frames are handled strictly one after another: a task runs to completion first.
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
    if (state.finished) return;
    setStatus(`disconnected; retrying in ${(backoff / 1000).toFixed(1)} s`);
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 10000);
  };
}

let client;
try {
  await init();
  const tryGpu = params.get('backend') !== 'cpu';
  client = await CanopyClient.create(name, tryGpu, navigator.userAgent, sendFrame, onProgress);
  state.backend = client.backend();
  state.adapter = client.adapter();
  $('backend').textContent = state.backend === 'webgpu' ? 'WebGPU' : 'CPU (wasm)';
  $('adapter').textContent = state.adapter;
  log(`runtime ready on ${state.backend}`);
  window.canopy.client = client;
  connect();
} catch (e) {
  setStatus(`failed to start: ${e}`);
  state.errors.push(String(e));
}
