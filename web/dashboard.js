// Live dashboard: the server pushes the metrics JSON over Server-Sent Events (/api/events) once
// a second and the page redraws; no reload. When the stream drops it reconnects, and browsers
// without EventSource poll /api/metrics instead.
import { drawPad, toMnist, showInput, showProbs } from './draw.js';
import { fmtBytes } from './format.js';
import { timeChart, missingLibrary } from './charts.js';

const $ = (id) => document.getElementById(id);
const view = { data: null, updates: 0, source: null, charts: {}, lastPrediction: null, loadedAt: Date.now() };
window.canopyDashboard = view;

function fmtTime(s) {
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, r = String(s % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${r}` : `${m}:${r}`;
}
function fmtAxis(v) {
  if (v === 0) return '0';
  if (v >= 1e9) return `${(v / 1e9).toFixed(1)}G`;
  if (v >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (v >= 1e3) return `${(v / 1e3).toFixed(0)}K`;
  return v < 10 ? v.toFixed(2) : v.toFixed(0);
}
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// The round loop's phases; strategies may add their own (e.g. "exploring"), shown as named.
function phaseText(d) {
  if (d.phase === 'paused' && d.control?.held) return 'waiting for Start';
  return ({ waiting_for_clients: 'waiting for clients', training: 'training', aggregating: 'aggregating', paused: 'paused', done: 'done', stopped: 'stopped' })[d.phase]
    || String(d.phase).replaceAll('_', ' ');
}

// Horizontal bars, one per layer: width (units or filters), with sparsity when reported. Drawn
// by hand: uPlot's x axis is a number line, not a list of named layers.
function layerChart(canvas, layers) {
  view.charts[canvas.id] = { layers };
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 220;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext('2d');
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  g.font = '11px system-ui';
  if (!layers.length) return;
  const rowH = Math.min(28, (h - 10) / layers.length), max = Math.max(...layers.map((l) => l.width));
  const x0 = 90, bw = w - x0 - 120;
  layers.forEach((l, i) => {
    const y = 5 + i * rowH, bh = rowH * 0.7;
    g.fillStyle = '#6b7a6d'; g.fillText(`${l.name} ${l.kind}`, 4, y + bh * 0.75);
    g.fillStyle = '#cfe3d0'; g.fillRect(x0, y, (bw * l.width) / max, bh);
    if (l.sparsity != null) { g.fillStyle = '#b26a00'; g.fillRect(x0, y, (bw * l.width * l.sparsity) / max, bh); }
    g.fillStyle = '#1d2a1f';
    g.fillText(`${l.width}${l.sparsity != null ? ` · ${(100 * l.sparsity).toFixed(0)} % sparse` : ''}`, x0 + (bw * l.width) / max + 6, y + bh * 0.75);
  });
}

// A power of two of bytes, short: 512 KiB, 1 MiB, 64 MiB.
function fmtBytesTick(v) {
  const [d, unit] = v >= 1 << 30 ? [1 << 30, 'GiB'] : v >= 1 << 20 ? [1 << 20, 'MiB'] : v >= 1024 ? [1024, 'KiB'] : [1, 'B'];
  return `${Number((v / d).toPrecision(3))} ${unit}`;
}
// From 0 to a tenth above the largest value (0 to 1 before the first round).
const from0 = (u, min, max) => [0, max > 0 ? max * 1.1 : 1];
// The time series, one point per finished round (web/charts.js): each chart's scales, a left
// one (y) and a right one (r). Bytes are on log scales: a round's traffic and the running total
// are orders of magnitude apart, and compression shows as a step down.
const CHARTS = {
  accChart: {
    y: { range: [0, 1], axis: (v) => `${(100 * v).toFixed(0)} %`, fmt: (v) => `${(100 * v).toFixed(1)} %` },
    r: { range: from0, axis: (v) => v.toFixed(2), fmt: (v) => v.toFixed(4) },
  },
  bytesChart: {
    y: { log: true, axis: fmtBytesTick, fmt: fmtBytes },
    r: { log: true, axis: fmtBytesTick, fmt: fmtBytes },
  },
  sizeChart: {
    y: { range: from0, axis: fmtAxis, fmt: (v) => Math.round(v).toLocaleString('en') },
    // Fractions (sparsity, density) and bits per weight: 0 to 1, or more for bits.
    r: { range: (u, min, max) => [0, Math.max(1.05, (max ?? 0) * 1.05)], axis: (v) => v.toFixed(2), fmt: (v) => v.toFixed(2) },
  },
};
// The uPlot instances by element id (for tests and the console): window.canopyCharts.accChart.
const charts = {};
window.canopyCharts = charts;
const drawers = {};
function drawChart(id, xs, series) {
  // No web/vendor/uPlot.iife.min.js: the chart's place says to run setup.
  if (!window.uPlot) {
    if (!drawers[id]) { drawers[id] = true; missingLibrary($(id)); }
    return;
  }
  drawers[id] ??= timeChart($(id), { id, scales: CHARTS[id] });
  drawers[id].update(xs, series);
  charts[id] = drawers[id].plot;
}

// Colours of the strategies' figures, by their place in /api/metrics' list; lines of figures
// that are not the chart's own quantity are dashed (bytes beside the traffic totals, bits per
// weight beside fractions).
const PALETTE = ['#b26a00', '#6d4c41', '#1565c0', '#00838f', '#c2185b', '#455a64', '#7b1fa2', '#558b2f'];
const DASH = { bytes: [2, 2], bits: [4, 3] };

// A figure written as its kind says.
function fmtFigure(kind, v) {
  if (!Number.isFinite(v)) return '–';
  switch (kind) {
    case 'fraction': return `${(100 * v).toFixed(0)} %`;
    case 'bytes': return fmtBytes(v);
    case 'count': return Math.round(v).toLocaleString('en');
    case 'milliseconds': return `${v.toFixed(1)} ms`;
    case 'seconds': return v < 1 ? `${(1e3 * v).toFixed(1)} ms` : `${v.toFixed(2)} s`;
    case 'bits': return v.toFixed(2);
    // Four significant digits (a privacy ε of 7.984, a δ of 0.00001), not every digit a float has.
    default: return String(Number(v.toPrecision(4)));
  }
}

// A sentence of /api/metrics with its {key} and {key/per} slots filled from one round's extra;
// empty when the round reports none of its figures.
function sentence(text, figures, extra) {
  const kindOf = (key) => figures.find((f) => f.key === key)?.kind;
  let any = false;
  const out = text.replace(/\{([^{}/]+)(?:\/([^{}]+))?\}/g, (_, key, per) => {
    if (key in extra) any = true;
    return fmtFigure(kindOf(key), per ? extra[key] / extra[per] : extra[key]);
  });
  return any ? out : '';
}

// Per class: each tab's training + held-out examples, and the totals (what the tabs reported).
function exampleTotals(d) {
  const classes = d.run.classes || [];
  const rows = d.clients.filter((c) => c.examples).map((c) => ({ name: c.name, per: classes.map((_, k) => c.examples.train[k] + c.examples.test[k]) }));
  return { classes, rows, totals: classes.map((_, k) => rows.reduce((a, r) => a + r.per[k], 0)) };
}
function renderExamples(d) {
  const { classes, rows, totals } = exampleTotals(d);
  $('examplesCard').hidden = classes.length === 0;
  // Drawing a digit means nothing to a model of the tabs' own classes (each tab tries it on its camera).
  $('tryCard').hidden = classes.length > 0;
  if (!classes.length) return;
  $('examplesHead').innerHTML = `<tr><th>Tab</th>${classes.map((c) => `<th>${esc(c)}</th>`).join('')}</tr>`;
  $('examples').innerHTML = rows.map((r) => `<tr><td><b>${esc(r.name)}</b></td>${r.per.map((n) => `<td>${n}</td>`).join('')}</tr>`).join('') +
    `<tr class="total"><td><b>all tabs</b></td>${totals.map((n, k) => `<td id="examplesTotal-${k}"><b>${n}</b></td>`).join('')}</tr>`;
}

function render(d) {
  const r = d.run;
  $('runline').textContent = `${r.strategy} · model ${r.model} · ${r.dataset} · ${r.partition} · run ${r.run_id}`;
  // A buffered run (FedBuff) has model versions instead of rounds, and a buffer filling up.
  const b = d.buffer;
  $('phase').textContent = b && d.phase === 'buffering' ? `buffering ${b.filled}/${b.size} · ${b.in_flight} training` : phaseText(d);
  $('phase').className = `badge ${d.phase}`;
  $('round').previousElementSibling.textContent = b ? 'Version' : 'Round';
  $('round').textContent = `${d.round} / ${r.rounds}`;
  const rounds = d.rounds, last = rounds[rounds.length - 1];
  // A run on the tabs' own data has no global test set: no global accuracy, the tabs' own instead.
  $('acc').textContent = !last ? '–' : last.test_accuracy == null
    ? `— (no test set; tabs' own held-out ${(100 * last.local_accuracy).toFixed(1)} %)`
    : `${(100 * last.test_accuracy).toFixed(1)} %`;
  $('connected').textContent = d.connected;
  $('elapsed').textContent = fmtTime(d.elapsed_seconds);
  $('live').textContent = `live (${view.source}) · updated ${new Date().toLocaleTimeString()}`;
  $('live').className = 'live small ok';

  const xs = rounds.map((x) => x.round);
  drawChart('accChart', xs, [
    { label: 'accuracy', color: '#2f7d32', values: rounds.map((x) => x.test_accuracy), scale: 'y' },
    // Each client's own model on its own held-out split (personalised methods keep theirs).
    { label: 'clients\' own', color: '#2f7d32', values: rounds.map((x) => x.local_accuracy), scale: 'y', dash: [5, 4] },
    { label: 'loss', color: '#b26a00', values: rounds.map((x) => x.test_loss), scale: 'r' },
  ]);
  let up = 0, down = 0;
  const cum = rounds.map((x) => (up += x.bytes_up, down += x.bytes_down, up + down));
  const keys = d.metric_keys, extraOf = (key) => rounds.map((x) => x.extra?.[key] ?? NaN);
  // The strategy's own figures, as /api/metrics describes them, where some round reports them.
  const reported = (f) => rounds.some((x) => x.extra && f.key in x.extra);
  const figureLines = (panel, axis) => keys.figures
    .map((f, i) => ({ f, i })).filter(({ f }) => f.panel === panel && reported(f))
    .map(({ f, i }) => ({ label: f.label, color: PALETTE[i % PALETTE.length], values: extraOf(f.key), scale: axis, dash: DASH[f.kind], fmt: (v) => fmtFigure(f.kind, v) }));
  const traffic = [
    { label: 'up', color: '#1565c0', values: rounds.map((x) => x.bytes_up), scale: 'y' },
    // Dashed: with full weights both ways, up and down are often equal and would hide each other.
    { label: 'down', color: '#8e24aa', values: rounds.map((x) => x.bytes_down), scale: 'y', dash: [6, 4] },
    { label: 'in all', color: '#555', values: cum, scale: 'r', dash: [4, 3] },
    // Every figure on this panel is bytes (metric_keys.rs).
    ...figureLines('traffic', 'y'),
  ];
  drawChart('bytesChart', xs, traffic);
  $('figureLine').textContent = last ? keys.sentences.map((s) => sentence(s, keys.figures, last.extra || {})).filter(Boolean).join(' · ') : '';
  const size = [
    { label: 'parameters', color: '#2f7d32', values: rounds.map((x) => x.params), scale: 'y' },
    ...figureLines('size', 'r'),
  ];
  drawChart('sizeChart', xs, size);
  // A fraction of the model's size reported (sparsity, density) means it is pruned.
  const pruned = keys.figures.some((f) => f.panel === 'size' && f.kind === 'fraction' && reported(f)) || new Set(rounds.map((x) => x.params)).size > 1;
  $('sizeNote').textContent = pruned ? '' : `No pruning in this run: ${d.model.params.toLocaleString()} parameters, ${fmtAxis(d.model.flops_per_sample)} FLOPs per sample.`;
  // Per-layer sparsity, when the strategy reports it for the layer's weight tensor.
  const extra = last?.extra || {};
  // A pruning-at-init mask reports per-layer density once, in the round it was installed.
  const density = (name) => rounds.map((x) => x.extra?.[`${keys.tensor_density_prefix}${name}.weight`]).find((v) => v != null);
  const layers = d.model.layers.map((l) => {
    const dn = density(l.name);
    return { ...l, sparsity: extra[`${keys.tensor_sparsity_prefix}${l.name}.weight`] ?? (dn != null ? 1 - dn : null) };
  });
  layerChart($('layerChart'), layers);
  $('layerNote').textContent = `${d.model.layers.length} layers with weights; widths ${d.model.widths.join('-')}; ${d.model.params.toLocaleString()} parameters.`;

  // Suspicion: norm ÷ the round's median norm (latest, and the largest seen), and how often the
  // robust aggregation clipped, down-weighted or rejected this client's update.
  const suspicion = (c) => {
    const s = c.suspicion;
    if (!s || !s.judged) return '<span class="sub">–</span>';
    const hot = s.rejected + s.down_weighted + s.clipped > 0 || s.last_norm_ratio > 3;
    const counts = [['clipped', s.clipped], ['down-weighted', s.down_weighted], ['rejected', s.rejected]].filter(([, n]) => n > 0).map(([w, n]) => `${w} ${n}×`);
    return `<span class="${hot ? 'bad' : ''}">norm ×${s.last_norm_ratio.toPrecision(3)}</span>` +
      `<div class="small sub">${counts.length ? counts.join(', ') + ` of ${s.judged}` : `kept ${s.judged}×`}; max ×${s.max_norm_ratio.toPrecision(3)}</div>`;
  };

  // A root's edges: who serves how many tabs, and what became of each partial they sent.
  const edges = d.edges || [];
  $('edgesCard').hidden = edges.length === 0;
  // A root takes no tabs: the join link and QR code point to an edge.
  const edgeUrl = edges.find((e) => e.url)?.url;
  if (edgeUrl && $('joinUrl').dataset.edge !== edgeUrl) {
    $('joinUrl').dataset.edge = edgeUrl; $('joinUrl').href = edgeUrl; $('joinUrl').textContent = edgeUrl;
    $('qr').src = `/api/qr.svg?url=${encodeURIComponent(edgeUrl)}`;
    $('joinNote').textContent = `This server is a root: tabs join one of its ${edges.length} edges (listed in "Edges").`;
  }
  $('edges').innerHTML = edges.map((e) => {
    const partials = e.partials.slice(-6).map((p) =>
      `<div class="small ${p.outcome === 'merged' ? '' : 'bad'}">round ${p.round}: ${p.results} results, ${p.samples.toFixed(0)} samples, ` +
      `${fmtBytes(p.sum_bytes)}${p.in_store ? ' (OS)' : ''}, ${p.edge_seconds.toFixed(2)} s, ${esc(p.outcome)}</div>`).join('');
    // Late past the root's edge timeout ([scale] edge_timeout_ms), when it stops counting the edge.
    let heard = e.seen_ms_ago < d.edge_timeout_ms ? `${(e.seen_ms_ago / 1000).toFixed(1)} s ago` : `<span class="bad">${(e.seen_ms_ago / 1000).toFixed(0)} s ago</span>`;
    // Reports under its name the root refused (forged, unsigned, replayed): someone else speaks for it.
    if (e.reports_refused) heard += `<div class="bad">${e.reports_refused} report${e.reports_refused === 1 ? '' : 's'} refused: ${esc(e.last_refusal)}</div>`;
    return `<tr><td><b>${esc(e.name)}</b></td><td><a href="${esc(e.url)}">${esc(e.url)}</a></td><td>${e.connected}</td><td>${e.idle}</td><td>${heard}</td><td>${partials || '<span class="sub">none yet</span>'}</td></tr>`;
  }).join('');

  // A run on the tabs' own data: how many examples each tab says it holds, per class.
  renderExamples(d);

  // Contribution: samples trained on for the global model (shard size × rounds done).
  const contrib = (c) => c.train_samples * c.rounds_done;
  const total = d.clients.reduce((a, c) => a + contrib(c), 0) || 1;
  $('clients').innerHTML = d.clients.map((c) => {
    const status = c.status === 'training' && c.progress ? `training ${c.progress.step}/${c.progress.steps}` : c.status;
    const backend = { webgpu: 'WebGPU', cpu: 'CPU (wasm)', native: 'native' }[c.device.backend] || c.device.backend;
    const share = contrib(c) / total;
    // What the tab timed at start when it chose its backend.
    const speeds = (c.device.speeds || []).map((x) => `${x.backend === 'webgpu' ? 'WebGPU' : 'CPU'} ${x.samples_per_sec == null ? 'not timed' : x.samples_per_sec.toFixed(0)}`).join(' · ');
    return `<tr class="${c.status}"><td><b>${esc(c.name)}</b></td><td>${backend}<div class="small sub">${esc(c.device.adapter)}</div>` +
      `${speeds ? `<div class="small sub speeds" title="samples/s of a short MLP run at start">timed: ${esc(speeds)}</div>` : ''}</td>` +
      `<td>${status}</td><td>${c.train_samples}</td><td>${c.samples_per_sec.toFixed(0)}</td><td>${c.rounds_done}</td>` +
      `<td>${c.last_round ?? '–'}</td><td>${fmtBytes(c.bytes_up)}</td>` +
      `<td><span class="share"><i style="width:${(100 * share).toFixed(1)}%"></i></span> ${(100 * share).toFixed(0)} %</td>` +
      `<td class="suspicion">${suspicion(c)}</td>` +
      `<td>${c.banned ? '<span class="bad small">banned</span>' : `<button class="ban small" data-id="${c.id}" data-name="${esc(c.name)}">Ban</button>`}</td></tr>`;
  }).join('') || (edges.length
    ? `<tr><td colspan="11" class="sub">Tabs join this run's edges: ${edges.reduce((a, e) => a + e.connected, 0)} connected to ${edges.length} edges (see Edges above).</td></tr>`
    : '<tr><td colspan="11" class="sub">No one has joined yet: scan the QR code.</td></tr>');
  for (const b of document.querySelectorAll('button.ban')) {
    b.onclick = () => {
      const reason = prompt(`Ban ${b.dataset.name}? Reason shown to the tab:`, 'banned by the teacher');
      if (reason == null) return;
      // A reloaded tab is a new client: banning its address for an hour keeps it out.
      const address = confirm(`Also ban the address ${b.dataset.name} connects from for an hour (every tab there, and new ones)?`);
      admin('ban', address ? { client: Number(b.dataset.id), reason, address_minutes: 60 } : { client: Number(b.dataset.id), reason });
    };
  }

  // Keep the settings form in step with the run unless someone is editing it.
  if (document.activeElement?.closest('#settingsForm') == null) {
    $('setRounds').value = r.rounds;
    $('setClients').value = d.control?.clients_per_round ?? '';
    const sel = $('setStrategy');
    if (sel.options.length !== d.strategies.length) sel.innerHTML = d.strategies.map((s) => `<option>${esc(s)}</option>`).join('');
    sel.value = d.control?.next_strategy ?? r.strategy;
  }
  const next = d.control?.next_strategy;
  $('nextRun').textContent = next ? `Next run: ${next}. Start it, once this one has ended, with: canopy serve --config ${d.config.run.out_dir}/${r.run_id}/next-run.toml` : '';
  const n = completedRounds();
  if (n !== modelFor.round) $('modelRound').textContent = n ? `(after round ${n})` : '(initial, untrained)';
}

function onData(d) {
  view.data = d;
  view.updates += 1;
  render(d);
}

// Live stream, reconnecting with backoff; polling where EventSource is missing.
let backoff = 1000;
function connect() {
  if (!window.EventSource) { view.source = 'poll'; poll(); return; }
  const es = new EventSource('/api/events');
  es.onopen = () => { backoff = 1000; view.source = 'sse'; };
  es.onmessage = (ev) => { try { onData(JSON.parse(ev.data)); } catch (e) { console.error(e); } };
  es.onerror = () => {
    $('live').textContent = 'connection lost; reconnecting…';
    $('live').className = 'live small bad';
    // The browser retries by itself while CONNECTING; after a hard failure it gives up (CLOSED).
    if (es.readyState === EventSource.CLOSED) {
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 15000);
    }
  };
}
async function poll() {
  try {
    const res = await fetch('/api/metrics', { cache: 'no-store' });
    onData(await res.json());
  } catch (e) {
    $('live').textContent = `server unreachable (${e}); retrying…`;
  }
  setTimeout(poll, 1000);
}

// Join address and QR code. Opened through a LAN address, that is the one to share; opened on
// localhost, the first LAN address the server found (if it listens on the LAN at all).
async function showJoin() {
  const local = /^(localhost|127\.|\[::1\])/.test(location.hostname);
  let url = `${location.origin}/`;
  let note = '';
  const join = await (await fetch('/api/join')).json();
  // https: the certificate students are asked to accept, to check against their browser's.
  $('joinCert').textContent = join.fingerprint ? `Certificate SHA-256: ${join.fingerprint}` : '';
  if (local) {
    const { urls } = join;
    const lan = urls.find((u) => !/\/\/(localhost|127\.)/.test(u));
    if (lan) url = lan;
    else note = 'Only this computer can join: start the server with --bind 0.0.0.0 to let phones and laptops on the same network join.';
  }
  if ($('joinUrl').dataset.edge) return; // a root: render() pointed it at an edge
  $('joinUrl').href = url; $('joinUrl').textContent = url;
  $('qr').src = `/api/qr.svg?url=${encodeURIComponent(url)}`;
  $('joinNote').textContent = note;
}

// Admin controls. The token comes from the field (or the #token= link the server printed, then
// removed from the address bar so a projected screen does not show it) and is kept in this
// browser's localStorage.
const fromLink = new URLSearchParams(location.hash.slice(1)).get('token');
if (fromLink) { localStorage.setItem('canopy-admin-token', fromLink); history.replaceState(null, '', location.pathname); }
$('token').value = localStorage.getItem('canopy-admin-token') || '';

async function admin(action, body) {
  let res;
  try {
    res = await fetch(`/api/admin/${action}`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${$('token').value.trim()}`, 'Content-Type': 'application/json' },
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch (e) {
    $('ctlMsg').textContent = `server unreachable: ${e}`;
    $('ctlMsg').className = 'small bad';
    return 0;
  }
  const json = await res.json().catch(() => ({}));
  const msg = res.ok ? json.message : `${res.status}: ${json.error || res.statusText}`;
  $('ctlMsg').textContent = msg;
  $('ctlMsg').className = `small ${res.ok ? 'ok' : 'bad'}`;
  $('lock').textContent = res.status === 401 ? 'locked (wrong token)' : res.ok ? 'unlocked' : $('lock').textContent;
  view.lastAdmin = { action, status: res.status, message: msg };
  if (res.ok) localStorage.setItem('canopy-admin-token', $('token').value.trim());
  return res.status;
}
$('tokenForm').onsubmit = (e) => { e.preventDefault(); admin('check'); };
$('btnStart').onclick = () => admin('start');
$('btnPause').onclick = () => admin('pause');
$('btnStop').onclick = () => { if (confirm('Stop the run after the round in progress?')) admin('stop'); };
$('settingsForm').onsubmit = (e) => {
  e.preventDefault();
  const body = { rounds: Number($('setRounds').value), clients_per_round: Number($('setClients').value || 0) };
  if ($('setStrategy').value !== (view.data?.control?.next_strategy ?? view.data?.run.strategy)) body.next_strategy = $('setStrategy').value;
  admin('settings', body).then(() => document.activeElement?.blur());
};

// "Try the model" with the current global model: the same wasm module as the client page,
// loaded on first use, predicts on the CPU backend from /api/model.bin.
const completedRounds = () => view.data?.rounds.length ?? 0;
const modelFor = { round: -1, bytes: null };
let wasm = null;
async function predict() {
  const px = toMnist($('pad'));
  if (!px) return;
  showInput($('seen'), px);
  try {
    if (!wasm) {
      $('guess').textContent = 'loading the model runtime…';
      wasm = await import('./pkg-cpu/canopy_client.js');
      await wasm.default();
    }
    const round = completedRounds();
    if (modelFor.round !== round || !modelFor.bytes) {
      const res = await fetch('/api/model.bin', { cache: 'no-store' });
      modelFor.bytes = new Uint8Array(await res.arrayBuffer());
      modelFor.round = round;
    }
    const probs = Array.from(await wasm.predict_with_model(modelFor.bytes, px));
    const best = showProbs($('probs'), probs);
    $('guess').textContent = `The model says: ${best}`;
    $('modelRound').textContent = round ? `(after round ${round})` : '(initial, untrained)';
    view.lastPrediction = { probs, best, round };
  } catch (e) {
    $('guess').textContent = `could not predict: ${e}`;
  }
}
const pad = drawPad($('pad'), predict);
$('clearPad').onclick = () => { pad.clear(); $('guess').textContent = ''; };

showJoin().catch((e) => { $('joinNote').textContent = `join address unknown: ${e}`; });
connect();
