// Training speed in real tabs, WebGPU and CPU, full and half-width models, and burn's conv2d
// against Canopy's im2col convolution on the same tab in the same run. Run with
// `just bench-browser`. Prints figures only; nothing here is a pass/fail test.
import { startServer, launch, openTab, waitFor } from './harness.mjs';

const server = await startServer(['--rounds', '1', '--min-clients', '100', '--name', 'bench']);
const rows = [];
// CANOPY_BENCH_CPU_ONLY=1 skips the WebGPU tab (SwiftShader takes minutes on the CNNs).
for (const webgpu of process.env.CANOPY_BENCH_CPU_ONLY === '1' ? [false] : [false, true]) {
  const browser = await launch({ webgpu });
  const logs = [];
  const page = await openTab(browser, `${server.url}?name=bench-${webgpu ? 'gpu' : 'cpu'}`, logs);
  await waitFor(() => page.evaluate(() => window.canopy?.client !== undefined), 60_000, 'the wasm client');
  const backend = await page.evaluate(() => window.canopy.state.backend);
  // [model, width kept, steps on CPU, steps on WebGPU (SwiftShader is slow), conv]
  const runs = [
    ['mlp', 1.0, 40, 10, 'im2col'], ['mlp', 0.5, 40, 10, 'im2col'],
    ['cnn', 1.0, 6, 2, 'burn'], ['cnn', 1.0, 6, 2, 'im2col'],
    ['cnn-small', 1.0, 6, 2, 'burn'], ['cnn-small', 1.0, 6, 2, 'im2col'], ['cnn-small', 0.5, 6, 2, 'im2col'],
    ['cnn-paper', 1.0, 10, 2, 'burn'], ['cnn-paper', 1.0, 10, 2, 'im2col'],
  ];
  for (const [model, keep, cpuSteps, gpuSteps, conv] of runs) {
    const steps = webgpu ? gpuSteps : cpuSteps;
    const r = JSON.parse(await page.evaluate(([m, k, s, c]) => window.canopy.client.bench(m, 32, s, k, c), [model, keep, steps, conv]));
    rows.push({ backend, model, keep, conv, ...r });
  }
  await browser.close();
}
server.proc.kill();
const ratio = (a, b) => (b ? `${(a / b).toFixed(2)}×` : '');
console.log('backend  model       width  conv    params   MFLOP/sample  step ms   samples/s  vs burn conv2d  vs full width');
for (const r of rows) {
  const same = (x) => x.backend === r.backend && x.model === r.model;
  const burn = r.model.startsWith('cnn') && r.conv === 'im2col' && r.keep === 1.0 ? rows.find((x) => same(x) && x.conv === 'burn') : null;
  const full = r.keep < 1.0 ? rows.find((x) => same(x) && x.keep === 1.0 && x.conv === r.conv) : null;
  const conv = r.model.startsWith('cnn') ? r.conv : '-';
  console.log(`${r.backend.padEnd(8)} ${r.model.padEnd(11)} ${(r.keep * 100).toFixed(0).padStart(4)}%  ${conv.padEnd(6)} ${String(r.params).padStart(7)}  ${(r.flops / 1e6).toFixed(2).padStart(12)}  ${r.step_ms.toFixed(1).padStart(7)}  ${r.samples_per_sec.toFixed(0).padStart(9)}  ${(burn ? ratio(r.samples_per_sec, burn.samples_per_sec) : '').padStart(14)}  ${(full ? ratio(r.samples_per_sec, full.samples_per_sec) : '').padStart(13)}`);
}
console.log('(WebGPU here is SwiftShader, a software adapter: its figures say nothing about a real GPU.)');
