// The page around the training worker (web/worker.js): the worker loads the wasm client, owns
// the WebSocket and trains; this page asks for a nickname, renders what the worker posts, and
// runs the drawing pad. Nothing heavy runs here, so training never freezes the page.
import { drawPad, toMnist, showInput, showProbs } from './draw.js';
import { startByo } from './byo.js';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
// A mirror of the worker's state (tests read it), plus what only the page can see.
const state = { status: 'loading' };
const longTasks = [];
window.canopy = { state, longTasks, marks: {} };

// Main-thread tasks over 50 ms, for the long-task check in tests/browser/tab.test.mjs, and the
// long animation frames around them with the scripts that ran in them (to tell what caused one).
const longFrames = [];
window.canopy.longFrames = longFrames;
const observe = (type, fn) => PerformanceObserver.supportedEntryTypes?.includes(type) && new PerformanceObserver((list) => list.getEntries().forEach(fn)).observe({ type, buffered: true });
observe('longtask', (e) => longTasks.push({ start: e.startTime, duration: e.duration }));
observe('long-animation-frame', (e) => longFrames.push({
  start: e.startTime, duration: e.duration, blocking: e.blockingDuration, render: e.renderStart ? e.startTime + e.duration - e.renderStart : 0,
  scripts: e.scripts.map((x) => ({ invoker: x.invoker, source: x.sourceURL, fn: x.sourceFunctionName, duration: x.duration })),
}));

function log(text) {
  const li = document.createElement('li');
  // Not toLocaleTimeString: its first call loads locale data and blocked the page for ~70 ms.
  const d = new Date();
  li.textContent = `${[d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, '0')).join(':')} ${text}`;
  const ol = $('log');
  ol.prepend(li);
  while (ol.children.length > 60) ol.lastChild.remove();
}

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

// The worker starts downloading and compiling the wasm at once, while the nickname is asked.
// It reads the page's query too (`?threads=`, `?backend=`: which bundle to load).
const workerUrl = new URL('./worker.js', import.meta.url);
workerUrl.search = location.search;
const worker = new Worker(workerUrl, { type: 'module' });
const calls = new Map();
let nextCall = 0;
// The client's methods, answered by the worker (same names as the wasm CanopyClient's, all async).
const call = (method) => (...args) => new Promise((resolve, reject) => {
  const id = nextCall++;
  calls.set(id, { resolve, reject });
  worker.postMessage({ call: method, id, args });
});
const client = Object.fromEntries(['predict', 'try_model', 'model_round', 'add_sample', 'train_samples', 'bench', 'set_examples'].map((m) => [m, call(m)]));

worker.onmessage = (ev) => {
  const m = ev.data;
  if (m.reply !== undefined) {
    const c = calls.get(m.reply);
    calls.delete(m.reply);
    if (m.error !== undefined) c.reject(new Error(m.error)); else c.resolve(m.value);
    return;
  }
  Object.assign(state, m.state);
  for (const [id, text] of Object.entries(m.set)) $(id).textContent = text;
  if (m.bar !== undefined) $('bar').value = m.bar;
  // When things happened, on the page's clock (ms since navigation started).
  const marks = window.canopy.marks;
  if (m.ready) marks.ready ??= performance.now();
  if (m.progress) marks.firstProgress ??= { step: m.progress.step, pageMs: performance.now() };
  if (state.roundsDone > 0) marks.firstResult ??= performance.now();
  if (m.log) log(m.log);
  if (m.ready) window.canopy.client = client;
  // A run on the tabs' own data: the examples panel replaces the digit pad.
  if (state.classes?.length && !byoStarted) {
    byoStarted = true;
    $('tryCard').hidden = true;
    startByo({ client, classes: state.classes, log, mount: $('byoCard') }).catch((e) => log(`examples panel failed: ${e.message}`));
  }
};
let byoStarted = false;
worker.onerror = (e) => {
  state.status = `failed to start: ${e.message}`;
  $('status').textContent = state.status;
};

const name = await askName();
sessionStorage.setItem('canopy-name', name);
$('name').textContent = name;
// `?time=all` also times a software WebGPU adapter (slow; for benchmarks).
worker.postMessage({ start: { name, backend: params.get('backend') || 'auto', timeSoftware: params.get('time') === 'all', userAgent: navigator.userAgent } });

// "Try the model": predictions use the global model of the latest round on the CPU backend, so
// they work even while this tab trains.
const pad = drawPad($('pad'), predict);
let lastInput = null;
async function predict() {
  const px = toMnist($('pad'));
  if (!px) return;
  lastInput = px;
  showInput($('seen'), px);
  try {
    const probs = Array.from(await client.try_model(px));
    const best = showProbs($('probs'), probs);
    $('guess').textContent = `The model says: ${best}`;
    const round = await client.model_round();
    $('modelRound').textContent = `(round ${round})`;
    window.canopy.lastPrediction = { probs, best, round };
  } catch (e) {
    $('guess').textContent = e.message;
  }
}
$('clearPad').onclick = () => { pad.clear(); lastInput = null; $('guess').textContent = ''; };
for (let d = 0; d < 10; d++) {
  const b = document.createElement('button');
  b.type = 'button'; b.textContent = d;
  b.onclick = async () => {
    if (!lastInput) { $('ownMsg').textContent = 'Draw a digit first.'; return; }
    const px = lastInput;
    try {
      const n = await client.add_sample(px, d);
      state.ownDigits = n;
      $('ownMsg').textContent = `Added as a ${d}. Your own digits in this tab's training data: ${n} (${await client.train_samples()} samples in all). They never leave this tab.`;
      log(`added a drawn ${d} to the local training data`);
      pad.clear(); lastInput = null;
    } catch (e) {
      $('ownMsg').textContent = e.message;
    }
  };
  $('labels').append(b);
}

// What this page's origin allows, and on https the certificate's fingerprint, so a student can
// check that the certificate they accepted is this server's (the dashboard shows the same one).
async function showOrigin() {
  const parts = [location.protocol === 'https:' ? 'https' : 'plain http'];
  parts.push(window.isSecureContext ? 'secure context' : 'not a secure context (no WebGPU, no threads)');
  if (window.crossOriginIsolated) parts.push('cross-origin isolated');
  try {
    const { fingerprint } = await (await fetch('/api/join')).json();
    if (fingerprint) parts.push(`certificate SHA-256 ${fingerprint}`);
  } catch { /* the line is informative only */ }
  $('origin').textContent = parts.join(' · ');
  state.origin = { secure: window.isSecureContext, isolated: window.crossOriginIsolated, protocol: location.protocol };
}
showOrigin();
