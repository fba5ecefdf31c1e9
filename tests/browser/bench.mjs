// Training speed in real tabs against the same code built natively, in one run: the tab's CPU
// backend (in its Web Worker, and once on the page's main thread), WebGPU (SwiftShader here),
// full and half-width models, then `canopy bench` for the native figures. Also what a tab that
// times both backends at start measures and picks (`?time=all`). Run with `just bench-browser`.
// Prints figures only; nothing here is a pass/fail test.
import { execFileSync } from 'node:child_process';
import { canopyBin, root, startServer, launch, openTab, waitFor } from './harness.mjs';

const CASES = [['mlp', 1.0], ['mlp', 0.5], ['cnn', 1.0], ['cnn-small', 1.0], ['cnn-small', 0.5]];
// Steps per timed run: enough for a few seconds on the CPU backend. SwiftShader compiles every
// shader on the first step and then runs ~20-40× slower, so it gets fewer and skips FedAvg's CNN.
const STEPS = { cpu: { mlp: 40, cnn: 4, 'cnn-small': 6 }, webgpu: { mlp: 8, 'cnn-small': 2 } };

const server = await startServer(['--rounds', '1', '--min-clients', '100', '--name', 'bench']);
const rows = [];
const ready = (page) => waitFor(() => page.evaluate(() => window.canopy?.client !== undefined), 120_000, 'the wasm client');
let picked;
for (const webgpu of [false, true]) {
  const browser = await launch({ webgpu });
  const logs = [];
  const page = await openTab(browser, `${server.url}?name=bench-${webgpu ? 'gpu' : 'cpu'}&backend=${webgpu ? 'webgpu' : 'cpu'}`, logs);
  await ready(page);
  const backend = await page.evaluate(() => window.canopy.state.backend);
  for (const [model, keep] of CASES) {
    const steps = STEPS[backend][model];
    if (!steps) continue;
    const r = JSON.parse(await page.evaluate(([m, k, s]) => window.canopy.client.bench(m, 32, s, k), [model, keep, steps]));
    rows.push({ where: backend === 'cpu' ? 'tab CPU, worker' : 'tab WebGPU', backend, model, keep, ...r });
  }
  if (!webgpu) {
    // The same wasm on the page's main thread (as tabs ran before the worker): for the ratio only.
    for (const [model, keep] of CASES.filter(([m]) => m !== 'cnn')) {
      const r = JSON.parse(await page.evaluate(async ([m, k, s]) => {
        const w = await import('/pkg/canopy_client.js');
        await w.default();
        const c = await w.CanopyClient.create('main', 'cpu', false, false, '', () => {}, () => {});
        return c.bench(m, 32, s, k);
      }, [model, keep, STEPS.cpu[model]]));
      rows.push({ where: 'tab CPU, main thread', backend: 'cpu-main', model, keep, ...r });
    }
  } else {
    // A tab left to choose, told to time the software adapter too.
    const chooser = await openTab(browser, `${server.url}?name=bench-chooser&time=all`, logs);
    await ready(chooser);
    picked = await chooser.evaluate(() => ({ backend: window.canopy.state.backend, speeds: window.canopy.state.speeds }));
  }
  await browser.close();
}
server.proc.kill();

// Native figures from `canopy bench` in the same run (same batch size and widths).
const native = {};
const out = execFileSync(canopyBin, ['bench'], { cwd: root, encoding: 'utf8' });
for (const [label, model, keep] of [['mlp, batch 32', 'mlp', 1.0], ['mlp at half width', 'mlp', 0.5], ['FedAvg cnn, batch 32', 'cnn', 1.0], ['cnn-small', 'cnn-small', 1.0], ['cnn-small at half width', 'cnn-small', 0.5]]) {
  const m = out.match(new RegExp(`^native training, ${label}\\s+(\\d+) samples/s`, 'm'));
  if (m) native[`${model}@${keep}`] = Number(m[1]);
}

const find = (backend, model, keep) => rows.find((x) => x.backend === backend && x.model === model && x.keep === keep);
const ratio = (a, b) => (a && b ? `${(a / b).toFixed(2)}×` : '–');
console.log('| where | model | width | params | MFLOP/sample | step ms | samples/s | vs full width | vs native | vs tab CPU (worker) |');
console.log('|---|---|---|---|---|---|---|---|---|---|');
for (const r of rows) {
  const full = find(r.backend, r.model, 1.0);
  const cpu = find('cpu', r.model, r.keep);
  console.log(`| ${r.where} | ${r.model} | ${(r.keep * 100).toFixed(0)}% | ${r.params} | ${(r.flops / 1e6).toFixed(2)} | ${r.step_ms.toFixed(1)} | ${r.samples_per_sec.toFixed(0)} | ${ratio(r.samples_per_sec, full?.samples_per_sec)} | ${ratio(r.samples_per_sec, native[`${r.model}@${r.keep}`])} | ${r.backend === 'cpu' ? '1.00×' : ratio(r.samples_per_sec, cpu?.samples_per_sec)} |`);
}
for (const [k, v] of Object.entries(native)) {
  const [model, keep] = k.split('@');
  console.log(`| native (canopy bench) | ${model} | ${(Number(keep) * 100).toFixed(0)}% | | | | ${v} | | 1.00× | ${ratio(v, find('cpu', model, Number(keep))?.samples_per_sec)} |`);
}
if (picked) {
  console.log(`\nA tab choosing its backend (?time=all, MLP, batch 32): ${picked.speeds.map((s) => `${s.backend} ${s.samples_per_sec?.toFixed(0) ?? '–'} samples/s (${s.note})`).join('; ')} → trains on ${picked.backend}`);
}
console.log('(WebGPU here is SwiftShader, a software adapter: its figures say nothing about a real GPU.)');
