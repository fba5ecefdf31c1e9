// The page around the wasm client: owns the WebSocket, queues frames into the wasm runtime one
// at a time, shows what happens, and reconnects with backoff when the server goes away.
import init, { CanopyClient } from './pkg/canopy_client.js';
import { drawPad, toMnist, showInput, showProbs } from './draw.js';
import { fmtBytes } from './format.js';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const state = {
  status: 'loading', backend: null, adapter: null, clientId: null, round: null,
  roundsDone: 0, results: [], bytesSent: 0, bytesReceived: 0, errors: [], finished: false, lastSummary: null,
};
window.canopy = { state };

function log(text) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  const ol = $('log');
  ol.prepend(li);
  while (ol.children.length > 60) ol.lastChild.remove();
}
function setStatus(s) { state.status = s; $('status').textContent = s; }
function showBytes() { $('bytes').textContent = `${fmtBytes(state.bytesSent)} / ${fmtBytes(state.bytesReceived)}`; }

// The nickname: `?name=` skips the question (tests, scripted tabs); otherwise the student picks
// one, prefilled with the last one this tab used.
const TREES = ['oak', 'birch', 'maple', 'cedar', 'willow', 'aspen', 'rowan', 'hazel', 'alder', 'elm', 'linden', 'larch'];
async function askName() {
  const given = params.get('name');
  if (given) return given;
  const form = $('joinForm'), input = $('nick');
  input.value = sessionStorage.getItem('canopy-name') || `${TREES[Math.floor(Math.random() * TREES.length)]}-${Math.floor(Math.random() * 90 + 10)}`;
  form.hidden = false;
  input.select();
  await new Promise((res) => form.addEventListener('submit', (e) => { e.preventDefault(); if (input.value.trim()) res(); }));
  form.hidden = true;
  return input.value.trim();
}

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

let client;
try {
  setStatus('loading the training runtime…');
  const [name] = await Promise.all([askName(), init()]);
  sessionStorage.setItem('canopy-name', name);
  $('name').textContent = name;
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

// "Try the model": predictions use the global model of the latest round on the CPU backend, so
// they work even while this tab trains.
const pad = drawPad($('pad'), predict);
let lastInput = null;
async function predict() {
  const px = toMnist($('pad'));
  if (!px || !client) return;
  lastInput = px;
  showInput($('seen'), px);
  try {
    const probs = Array.from(await client.try_model(px));
    const best = showProbs($('probs'), probs);
    $('guess').textContent = `The model says: ${best}`;
    $('modelRound').textContent = `(round ${client.model_round()})`;
    window.canopy.lastPrediction = { probs, best, round: client.model_round() };
  } catch (e) {
    $('guess').textContent = String(e);
  }
}
$('clearPad').onclick = () => { pad.clear(); lastInput = null; $('guess').textContent = ''; };
for (let d = 0; d < 10; d++) {
  const b = document.createElement('button');
  b.type = 'button'; b.textContent = d;
  b.onclick = () => {
    if (!lastInput) { $('ownMsg').textContent = 'Draw a digit first.'; return; }
    try {
      const n = client.add_sample(lastInput, d);
      state.ownDigits = n;
      $('ownMsg').textContent = `Added as a ${d}. Your own digits in this tab's training data: ${n} (${client.train_samples()} samples in all). They never leave this tab.`;
      log(`added a drawn ${d} to the local training data`);
      pad.clear(); lastInput = null;
    } catch (e) {
      $('ownMsg').textContent = String(e);
    }
  };
  $('labels').append(b);
}
