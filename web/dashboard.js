// Live dashboard: polls /api/metrics once a second and redraws (no reload needed).
const $ = (id) => document.getElementById(id);
const view = { data: null, updates: 0 };
window.canopyDashboard = view;

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(2)} MiB`;
}
const PHASES = { waiting_for_clients: 'waiting for clients', training: 'training', aggregating: 'aggregating', done: 'done' };

// A small line chart: series = [{label, color, values, axis: 'left'|'right'}].
function lineChart(canvas, xs, series, leftMax) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 220;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext('2d');
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const pad = { l: 44, r: 48, t: 18, b: 24 };
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  g.strokeStyle = '#dfe6de'; g.fillStyle = '#6b7a6d'; g.font = '11px system-ui';
  const maxOf = (axis) => {
    if (axis === 'left' && leftMax) return leftMax;
    const vals = series.filter((s) => s.axis === axis).flatMap((s) => s.values).filter(Number.isFinite);
    return Math.max(1e-9, ...vals) * 1.1;
  };
  const lmax = maxOf('left'), rmax = maxOf('right');
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + ph - (ph * i) / 4;
    g.beginPath(); g.moveTo(pad.l, y); g.lineTo(pad.l + pw, y); g.stroke();
    g.fillText(fmtAxis(lmax * i / 4), 4, y + 4);
    if (series.some((s) => s.axis === 'right')) g.fillText(fmtAxis(rmax * i / 4), pad.l + pw + 4, y + 4);
  }
  const n = xs.length;
  const xAt = (i) => pad.l + (n <= 1 ? pw / 2 : (pw * i) / (n - 1));
  if (n) { g.fillText(`round ${xs[0]}`, pad.l, h - 6); g.fillText(`${xs[n - 1]}`, pad.l + pw - 16, h - 6); }
  let lx = pad.l;
  for (const s of series) {
    const max = s.axis === 'right' ? rmax : lmax;
    g.strokeStyle = s.color; g.fillStyle = s.color; g.lineWidth = 2;
    g.beginPath();
    s.values.forEach((v, i) => {
      const x = xAt(i), y = pad.t + ph - (ph * v) / max;
      i ? g.lineTo(x, y) : g.moveTo(x, y);
    });
    g.stroke();
    s.values.forEach((v, i) => { g.beginPath(); g.arc(xAt(i), pad.t + ph - (ph * v) / max, 2.5, 0, 7); g.fill(); });
    g.fillText(s.label, lx, 12); lx += g.measureText(s.label).width + 16;
    g.lineWidth = 1; g.strokeStyle = '#dfe6de';
  }
}
function fmtAxis(v) {
  if (v >= 1 << 20) return `${(v / (1 << 20)).toFixed(1)}M`;
  if (v >= 1024) return `${(v / 1024).toFixed(0)}K`;
  return v < 10 ? v.toFixed(2) : v.toFixed(0);
}

function render(d) {
  const r = d.run;
  $('runline').textContent = `${r.strategy} · model ${r.model} · ${r.dataset} · ${r.partition} · run ${r.run_id}`;
  $('phase').textContent = PHASES[d.phase] || d.phase;
  $('round').textContent = `${d.round} / ${r.rounds}`;
  const last = d.rounds[d.rounds.length - 1];
  $('acc').textContent = last ? `${(100 * last.test_accuracy).toFixed(1)} %` : '–';
  $('connected').textContent = d.connected;
  $('elapsed').textContent = `${Math.round(d.elapsed_seconds)} s`;
  const xs = d.rounds.map((x) => x.round);
  lineChart($('accChart'), xs, [
    { label: 'accuracy', color: '#2f7d32', values: d.rounds.map((x) => x.test_accuracy), axis: 'left' },
    { label: 'loss', color: '#b26a00', values: d.rounds.map((x) => x.test_loss), axis: 'right' },
  ], 1);
  lineChart($('bytesChart'), xs, [
    { label: 'up', color: '#1565c0', values: d.rounds.map((x) => x.bytes_up), axis: 'left' },
    { label: 'down', color: '#8e24aa', values: d.rounds.map((x) => x.bytes_down), axis: 'left' },
  ]);
  const rows = d.clients.map((c) => {
    const status = c.status === 'training' && c.progress ? `training ${c.progress.step}/${c.progress.steps}` : c.status;
    return `<tr class="${c.status}"><td>${esc(c.name)}</td><td>${c.device.backend}</td><td class="small">${esc(c.device.adapter)}</td>` +
      `<td>${status}</td><td>${c.shard}</td><td>${c.train_samples}</td><td>${c.samples_per_sec.toFixed(0)}</td>` +
      `<td>${c.rounds_done}</td><td>${c.last_round ?? '–'}</td><td>${fmtBytes(c.bytes_up)}</td></tr>`;
  });
  $('clients').innerHTML = rows.join('');
}
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`); }

async function poll() {
  try {
    const res = await fetch('/api/metrics', { cache: 'no-store' });
    view.data = await res.json();
    view.updates += 1;
    render(view.data);
  } catch (e) {
    $('runline').textContent = `server unreachable (${e}); retrying…`;
  }
  setTimeout(poll, 1000);
}
poll();
