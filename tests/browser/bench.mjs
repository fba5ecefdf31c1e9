// Training speed in real tabs, WebGPU and CPU, full and half-width models, against the same code
// built natively (`canopy bench`-style figures). Run with `just bench-browser`.
// Prints figures only; nothing here is a pass/fail test.
import { startServer, launch, openTab, waitFor } from './harness.mjs';

const server = await startServer(['--rounds', '1', '--min-clients', '100', '--name', 'bench']);
const rows = [];
for (const webgpu of [false, true]) {
  const browser = await launch({ webgpu });
  const logs = [];
  const page = await openTab(browser, `${server.url}?name=bench-${webgpu ? 'gpu' : 'cpu'}`, logs);
  await waitFor(() => page.evaluate(() => window.canopy?.client !== undefined), 60_000, 'the wasm client');
  const backend = await page.evaluate(() => window.canopy.state.backend);
  for (const [model, keep, steps] of [['mlp', 1.0, webgpu ? 10 : 40], ['mlp', 0.5, webgpu ? 10 : 40], ['cnn-small', 1.0, webgpu ? 2 : 5], ['cnn-small', 0.5, webgpu ? 2 : 5]]) {
    const r = JSON.parse(await page.evaluate(([m, k, s]) => window.canopy.client.bench(m, 32, s, k), [model, keep, steps]));
    rows.push({ backend, model, keep, ...r });
  }
  await browser.close();
}
server.proc.kill();
console.log('backend  model       width  params   MFLOP/sample  step ms   samples/s  vs full width');
for (const r of rows) {
  const full = rows.find((x) => x.backend === r.backend && x.model === r.model && x.keep === 1.0);
  console.log(`${r.backend.padEnd(8)} ${r.model.padEnd(11)} ${(r.keep * 100).toFixed(0).padStart(4)}%  ${String(r.params).padStart(7)}  ${(r.flops / 1e6).toFixed(2).padStart(12)}  ${r.step_ms.toFixed(1).padStart(7)}  ${r.samples_per_sec.toFixed(0).padStart(9)}  ${(r.samples_per_sec / full.samples_per_sec).toFixed(2)}×`);
}
console.log('(WebGPU here is SwiftShader, a software adapter: its figures say nothing about a real GPU.)');
