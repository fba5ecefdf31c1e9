// Training speed in real tabs against the same code built natively, in one run: the tab's CPU
// backend (in its Web Worker, and once on the page's main thread), WebGPU (SwiftShader here),
// full and half-width models, then `canopy bench` for the native figures. Also what a tab that
// times both backends at start measures and picks (`?time=all`), and TF.js 4.22 training the
// same models in the same browser (tfjs-bench.js; its wasm backend with SIMD on one thread, and
// its plain JS `cpu` backend on the MLP). Run with `just bench-browser`.
// The tab's CPU backend runs in all three bundles: the WebGPU build on its CPU backend (web/pkg,
// `?bundle=pkg`), the CPU-only single-threaded one (web/pkg-cpu, what a plain-http LAN tab gets)
// and the threaded one (web/pkg-mt, wasm threads) at 1, 2 threads and more, up to this machine's
// cores (capped at 8); the "vs tab CPU (worker)" column is against web/pkg, same run.
// Prints figures only; nothing here is a pass/fail test.
import { execFileSync } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { canopyBin, root, startServer, launch, openTab, waitFor, transferred, LAN_HOST } from './harness.mjs';

const CASES = [['mlp', 1.0], ['mlp', 0.5], ['cnn', 1.0], ['cnn-small', 1.0], ['cnn-small', 0.5]];
// Steps per timed run: about 2 s of the CPU backend's full-width models on a 2-core VM, as long
// as TF.js's timed runs below. SwiftShader compiles every shader on the first step and then runs
// ~20-40× slower, so it gets fewer and skips FedAvg's CNN.
const STEPS = { cpu: { mlp: 400, cnn: 20, 'cnn-small': 24 }, webgpu: { mlp: 8, 'cnn-small': 2 } };
// Pool sizes for the threaded bundle (1: the threaded build with a pool of one, which tells the
// threads' gain apart from the build's).
const THREADS = [1, 2, 4, 8].filter((n) => n <= Math.max(2, availableParallelism()));

// TF.js: a page on a server of its own serving its UMD bundles and .wasm files from
// node_modules/@tensorflow (nothing of it goes into the product's web/ page). The page is not
// cross-origin isolated, so there is no SharedArrayBuffer: the wasm backend runs on one thread.
// Timed for TFJS_BUDGET_MS after one warm-up step (at least 3 steps); the plain `cpu` backend
// takes ~8 s a step on the CNNs, so it runs the MLP only.
const TFJS = [['wasm', 'TF.js 4.22 wasm (SIMD, 1 thread)', ['mlp', 'cnn', 'cnn-small']], ['cpu', 'TF.js 4.22 cpu (plain JS)', ['mlp']]];
const TFJS_BUDGET_MS = 2500;
const TFJS_PAGE = `<!doctype html><meta charset="utf-8"><title>TF.js bench</title>
<script src="/tfjs/tfjs/dist/tf.min.js"></script>
<script src="/tfjs/tfjs-backend-wasm/dist/tf-backend-wasm.min.js"></script>
<script src="/tfjs-bench.js"></script>`;
const TYPES = { js: 'text/javascript', wasm: 'application/wasm' };
const tfjsDir = join(root, 'node_modules', '@tensorflow');
const tfjsServer = createServer(async (req, res) => {
  const path = decodeURIComponent(new URL(req.url, 'http://localhost').pathname);
  if (path === '/') return res.writeHead(200, { 'content-type': 'text/html' }).end(TFJS_PAGE);
  let file = path === '/tfjs-bench.js' ? join(import.meta.dirname, 'tfjs-bench.js') : null;
  if (path.startsWith('/tfjs/') && !relative(tfjsDir, join(tfjsDir, path.slice(6))).startsWith('..')) file = join(tfjsDir, path.slice(6));
  if (!file) return res.writeHead(404).end();
  try {
    const body = await readFile(file);
    res.writeHead(200, { 'content-type': TYPES[file.split('.').pop()] ?? 'application/octet-stream' }).end(body);
  } catch {
    res.writeHead(404).end();
  }
});
await new Promise((r) => tfjsServer.listen(0, '127.0.0.1', r));

const server = await startServer(['--rounds', '1', '--min-clients', '100', '--name', 'bench']);
const rows = [];
const ready = (page) => waitFor(() => page.evaluate(() => window.canopy?.client !== undefined), 120_000, 'the wasm client');
let picked;
for (const webgpu of [false, true]) {
  const browser = await launch({ webgpu });
  const logs = [];
  const page = await openTab(browser, `${server.url}?name=bench-${webgpu ? 'gpu' : 'cpu'}&backend=${webgpu ? 'webgpu' : 'cpu'}&bundle=pkg`, logs);
  await ready(page);
  const backend = await page.evaluate(() => window.canopy.state.backend);
  for (const [model, keep] of CASES) {
    const steps = STEPS[backend][model];
    if (!steps) continue;
    const r = JSON.parse(await page.evaluate(([m, k, s]) => window.canopy.client.bench(m, 32, s, k), [model, keep, steps]));
    rows.push({ where: backend === 'cpu' ? 'tab CPU, worker, 1 thread' : 'tab WebGPU', backend, model, keep, ...r });
  }
  if (!webgpu) {
    // The CPU-only single-threaded bundle in the same browser.
    const lean = await openTab(browser, `${server.url}?name=bench-cpu-only&bundle=pkg-cpu`, logs);
    await ready(lean);
    for (const [model, keep] of CASES) {
      const r = JSON.parse(await lean.evaluate(([m, k, s]) => window.canopy.client.bench(m, 32, s, k), [model, keep, STEPS.cpu[model]]));
      rows.push({ where: 'tab CPU, worker, CPU-only bundle, 1 thread', backend: 'cpu-only', model, keep, ...r });
    }
    await lean.close();
    // The threaded bundle in the same browser, one tab per pool size.
    for (const threads of THREADS) {
      const mt = await openTab(browser, `${server.url}?name=bench-mt${threads}&backend=cpu&bundle=pkg-mt&threads=${threads}`, logs);
      await ready(mt);
      const st = await mt.evaluate(() => window.canopy.state);
      if (st.bundle !== 'pkg-mt' || st.threads !== threads) throw new Error(`asked for ${threads} threads, got ${st.bundle} with ${st.threads}: ${st.threadsNote}`);
      for (const [model, keep] of CASES) {
        const r = JSON.parse(await mt.evaluate(([m, k, s]) => window.canopy.client.bench(m, 32, s, k), [model, keep, STEPS.cpu[model]]));
        rows.push({ where: `tab CPU, worker, threaded bundle, ${threads} thread${threads > 1 ? 's' : ''}`, backend: `cpu-mt${threads}`, model, keep, ...r });
      }
      await mt.close();
    }
    // The same wasm on the page's main thread (as tabs ran before the worker): for the ratio only.
    for (const [model, keep] of CASES.filter(([m]) => m !== 'cnn')) {
      const r = JSON.parse(await page.evaluate(async ([m, k, s]) => {
        const w = await import('/pkg/canopy_client.js');
        await w.default();
        const c = await w.CanopyClient.create('main', 'cpu', false, false, '', 'bundle pkg (main thread)', () => {}, () => {});
        return c.bench(m, 32, s, k);
      }, [model, keep, STEPS.cpu[model]]));
      rows.push({ where: 'tab CPU, main thread', backend: 'cpu-main', model, keep, ...r });
    }
    // TF.js in the same browser, on the page's main thread.
    const tf = await openTab(browser, `http://127.0.0.1:${tfjsServer.address().port}/`, logs);
    await waitFor(() => tf.evaluate(() => typeof window.tfjsBench === 'function'), 60_000, 'TF.js');
    for (const [backend, where, models] of TFJS) {
      for (const model of models) {
        const r = await tf.evaluate(([b, m, ms]) => window.tfjsBench(b, m, 32, ms), [backend, model, TFJS_BUDGET_MS]);
        if (backend === 'wasm' && (r.backend !== 'wasm' || r.simd !== true || r.threads !== 1)) throw new Error(`TF.js wasm ran as ${JSON.stringify(r)}`);
        const flops = rows.find((x) => x.backend === 'cpu' && x.model === model && x.keep === 1.0)?.flops;
        rows.push({ ...r, where, backend: `tfjs-${backend}`, model, keep: 1.0, flops });
      }
    }
  } else {
    // A tab left to choose, told to time the software adapter too.
    const chooser = await openTab(browser, `${server.url}?name=bench-chooser&time=all`, logs);
    await ready(chooser);
    picked = await chooser.evaluate(() => ({ backend: window.canopy.state.backend, speeds: window.canopy.state.speeds }));
  }
  await browser.close();
}
// Where users are: the same page opened as localhost, as an https LAN name (self-signed
// certificate; Playwright's ignoreHTTPSErrors stands for the click through the warning, which
// tests/browser/origins.test.mjs checks gives the same page) and as a plain-http LAN name
// (classroom.test, resolved to 127.0.0.1 by Chromium, so nothing leaves this machine). Each tab
// picks its bundle as a student's would; what it downloads comes from its own resource timing.
const httpsServer = await startServer(['--rounds', '1', '--min-clients', '100', '--name', 'bench-https', '--tls', 'self-signed', '--state-dir', mkdtempSync(join(tmpdir(), 'canopy-bench-tls-'))]);
const lanBrowser = await launch({ webgpu: false, lan: true });
const origins = [];
for (const [kind, url] of [
  ['localhost', `${server.url}`],
  ['https LAN', `https://${LAN_HOST}:${new URL(httpsServer.url).port}/`],
  ['plain-http LAN', `http://${LAN_HOST}:${new URL(server.url).port}/`],
]) {
  const context = await lanBrowser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  const t0 = Date.now();
  await page.goto(`${url}?name=bench-${kind.replace(/\W+/g, '-')}`);
  await ready(page);
  const st = await page.evaluate(() => window.canopy.state);
  const bytes = (await transferred(page, st)).total;
  const readyS = (st.timing.backendChosen - t0) / 1000;
  for (const model of ['mlp', 'cnn-small', 'cnn']) {
    const r = JSON.parse(await page.evaluate(([m, s]) => window.canopy.client.bench(m, 32, s, 1.0), [model, STEPS.cpu[model]]));
    origins.push({ kind, model, bundle: st.bundle, threads: st.threads, note: st.threadsNote, bytes, readyS, ...r });
  }
  await context.close();
}
await lanBrowser.close();
httpsServer.proc.kill();
server.proc.kill();
tfjsServer.close();

// Native figures from `canopy bench` in the same run (same batch size and widths).
const native = {};
const out = execFileSync(canopyBin, ['bench'], { cwd: root, encoding: 'utf8' });
for (const [label, model, keep] of [['mlp, batch 32', 'mlp', 1.0], ['mlp at half width', 'mlp', 0.5], ['FedAvg cnn, burn conv2d', 'cnn', 1.0], ['cnn-small, burn conv2d', 'cnn-small', 1.0], ['cnn-small at half width', 'cnn-small', 0.5]]) {
  const m = out.match(new RegExp(`^native training, ${label}\\s+(\\d+) samples/s`, 'm'));
  if (m) native[`${model}@${keep}`] = Number(m[1]);
}

const find = (backend, model, keep) => rows.find((x) => x.backend === backend && x.model === model && x.keep === keep);
const ratio = (a, b) => (a && b ? `${(a / b).toFixed(2)}×` : '–');
console.log('| where | model | width | params | MFLOP/sample | step ms | samples/s | vs full width | vs native | vs tab CPU (worker) | vs threaded bundle, 1 thread | Canopy tab CPU / TF.js |');
console.log('|---|---|---|---|---|---|---|---|---|---|---|---|');
for (const r of rows) {
  const full = find(r.backend, r.model, 1.0);
  const cpu = find('cpu', r.model, r.keep);
  const mt1 = r.backend.startsWith('cpu-mt') ? find('cpu-mt1', r.model, r.keep) : null;
  console.log(`| ${r.where} | ${r.model} | ${(r.keep * 100).toFixed(0)}% | ${r.params} | ${(r.flops / 1e6).toFixed(2)} | ${r.step_ms.toFixed(1)} | ${r.samples_per_sec.toFixed(0)} | ${ratio(r.samples_per_sec, full?.samples_per_sec)} | ${ratio(r.samples_per_sec, native[`${r.model}@${r.keep}`])} | ${r.backend === 'cpu' ? '1.00×' : ratio(r.samples_per_sec, cpu?.samples_per_sec)} | ${mt1 ? ratio(r.samples_per_sec, mt1.samples_per_sec) : ''} | ${r.backend.startsWith('tfjs-') ? ratio(cpu?.samples_per_sec, r.samples_per_sec) : ''} |`);
}
for (const [k, v] of Object.entries(native)) {
  const [model, keep] = k.split('@');
  console.log(`| native (canopy bench) | ${model} | ${(Number(keep) * 100).toFixed(0)}% | | | | ${v} | | 1.00× | ${ratio(v, find('cpu', model, Number(keep))?.samples_per_sec)} | | |`);
}
// Issue 12's goals against TF.js: ≥ 1.5× on the MLP, ≥ 3× on FedAvg's CNN (no goal for cnn-small).
const GOALS = { mlp: 1.5, cnn: 3 };
console.log('');
for (const model of ['mlp', 'cnn', 'cnn-small']) {
  const c = find('cpu', model, 1.0);
  const t = find('tfjs-wasm', model, 1.0);
  if (!c || !t) continue;
  const x = c.samples_per_sec / t.samples_per_sec;
  const goal = GOALS[model] ? ` (goal ≥ ${GOALS[model]}×: ${x >= GOALS[model] ? 'met' : 'missed'})` : '';
  console.log(`${model}: Canopy tab CPU ${c.samples_per_sec.toFixed(0)} samples/s (${c.step_ms.toFixed(1)} ms a step), TF.js wasm ${t.samples_per_sec.toFixed(0)} samples/s (${t.step_ms.toFixed(1)} ms a step, ${t.steps} steps) → Canopy / TF.js ${x.toFixed(2)}×${goal}`);
  // What a plain-http LAN page runs: the CPU-only bundle (goals: ≥ 2× web/pkg, ≥ 2.5× TF.js on
  // the MLP).
  const lean = find('cpu-only', model, 1.0);
  if (lean) {
    const [vsPkg, vsTf] = [lean.samples_per_sec / c.samples_per_sec, lean.samples_per_sec / t.samples_per_sec];
    const g = model === 'mlp' ? ` (goals ≥ 2× and ≥ 2.5×: ${vsPkg >= 2 && vsTf >= 2.5 ? 'met' : 'missed'})` : '';
    console.log(`${model}: CPU-only bundle (plain-http LAN), 1 thread: ${lean.samples_per_sec.toFixed(0)} samples/s → / web/pkg ${vsPkg.toFixed(2)}×, / TF.js ${vsTf.toFixed(2)}×${g}`);
  }
  // What an isolated page (localhost, https) runs: the threaded CPU bundle, on one thread (TF.js's
  // count) and on every core.
  for (const threads of [1, 2]) {
    const m = find(`cpu-mt${threads}`, model, 1.0);
    if (!m) continue;
    const y = m.samples_per_sec / t.samples_per_sec;
    const g = GOALS[model] ? ` (goal: ${y >= GOALS[model] ? 'met' : 'missed'})` : '';
    console.log(`${model}: threaded bundle, ${threads} thread${threads > 1 ? 's' : ''}: ${m.samples_per_sec.toFixed(0)} samples/s → / TF.js ${y.toFixed(2)}×${g}`);
  }
}
if (picked) {
  console.log(`\nA tab choosing its backend (?time=all, MLP, batch 32): ${picked.speeds.map((s) => `${s.backend} ${s.samples_per_sec?.toFixed(0) ?? '–'} samples/s (${s.note})`).join('; ')} → trains on ${picked.backend}`);
}
console.log(`(CPU-only row: web/pkg-cpu, one thread, no wgpu compiled in. Threaded rows: web/pkg-mt, burn's CPU backend on a pool of wasm threads; "vs tab CPU (worker)" is against web/pkg on one thread, "vs threaded bundle, 1 thread" against web/pkg-mt with a pool of one, both in this run. This machine has ${availableParallelism()} cores.)`);
console.log('(WebGPU here is SwiftShader, a software adapter: its figures say nothing about a real GPU.)');
console.log('(TF.js trains on the page\'s main thread with tf.fused ops, NHWC, its wasm backend lacking Conv2DBackpropFilter: tfjs-bench.js adds one from its Conv2D.)');

// By origin kind, this run: samples/s of the bundle each tab chose, and its ratio against TF.js's
// wasm backend and native training from the same run.
console.log('');
console.log('| page opened as | model | bundle | threads | transferred | ready after | samples/s | / TF.js wasm | native / this |');
console.log('|---|---|---|---|---|---|---|---|---|');
for (const o of origins) {
  const tf = find('tfjs-wasm', o.model, 1.0);
  const nat = native[`${o.model}@1`];
  console.log(`| ${o.kind} | ${o.model} | ${o.bundle} | ${o.threads} | ${(o.bytes / 1e6).toFixed(2)} MB | ${o.readyS.toFixed(1)} s | ${o.samples_per_sec.toFixed(0)} | ${ratio(o.samples_per_sec, tf?.samples_per_sec)} | ${ratio(nat, o.samples_per_sec)} |`);
}
console.log('("ready after": from navigation to the backend chosen, the short timed probe included; the first training step follows as soon as a task comes.)');
