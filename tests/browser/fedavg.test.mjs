// The real server and three headless Chromium tabs: one trains on WebGPU (SwiftShader), two fall
// back to the CPU backend because their browser has no WebGPU adapter; of those, one runs the
// threaded bundle (wasm threads, the default on a cross-origin isolated localhost page) and one
// the single-threaded CPU-only bundle (`?threads=1`, what a plain-http LAN tab gets): all three
// builds of the client in one run.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runWithTabs } from './harness.mjs';

test('three browser tabs train a model together with FedAvg', { timeout: 600_000 }, async () => {
  const { pages: tabs, states, metrics: m, close } = await runWithTabs([
    '--rounds', '3', '--shards', '3', '--min-clients', '3', '--clients-per-round', '3',
    '--partition', 'iid', '--max-train', '3000', '--epochs', '1', '--batch-size', '32', '--lr', '0.1', '--name', 'browser-fedavg',
  ], [{ name: 'gpu-tab', webgpu: true }, { name: 'cpu-tab-1', webgpu: false }, { name: 'cpu-tab-2', webgpu: false, query: 'threads=1' }], 'fedavg');
  try {
    // Each tab reported the backend it really used.
    assert.equal(states[0].backend, 'webgpu', `tab 0: ${states[0].adapter}`);
    assert.equal(states[1].backend, 'cpu');
    assert.equal(states[2].backend, 'cpu');
    assert.match(states[1].adapter, /no WebGPU/);
    // Which bundle each tab ran: WebGPU the WebGPU build, `?threads=1` the CPU-only one, the
    // other CPU tab the threaded one on every core this machine reports (at least 2).
    assert.deepEqual(states.map((s) => s.bundle), ['pkg', 'pkg-mt', 'pkg-cpu'], states.map((s) => s.threadsNote).join('; '));
    assert.ok(states[1].threads >= 2, `threads: ${states[1].threads} (${states[1].threadsNote})`);
    assert.equal(states[2].threads, 1);

    assert.equal(m.rounds.length, 3);
    for (const r of m.rounds) {
      assert.equal(r.results, 3, `round ${r.round}: every tab's result was aggregated`);
      assert.deepEqual([...r.backends].sort(), ['cpu', 'cpu', 'webgpu']);
    }
    const clients = m.clients.map((c) => [c.name, c.device.backend]).sort();
    assert.deepEqual(clients, [['cpu-tab-1', 'cpu'], ['cpu-tab-2', 'cpu'], ['gpu-tab', 'webgpu']]);
    const last = m.rounds[2];
    assert.ok(last.test_accuracy > 0.5, `global accuracy after 3 rounds: ${last.test_accuracy}`);
    assert.ok(last.test_loss < m.rounds[0].test_loss, 'loss fell');
    for (const s of states) {
      assert.equal(s.roundsDone, 3, 'each tab trained every round');
      assert.equal(s.finished, true);
      assert.deepEqual(s.errors, []);
    }
    // WebGPU and the CPU backend compute the same function: both tabs hold the last global model.
    const probe = (page) => page.evaluate(async () => {
      const px = new Float32Array(784).map((_, i) => ((i * 7919) % 255) / 255);
      return Array.from(await window.canopy.client.predict(px));
    });
    const [pg, pc, p1] = [await probe(tabs[0]), await probe(tabs[1]), await probe(tabs[2])];
    assert.equal(pg.length, 10);
    const diff = Math.max(...pg.map((v, i) => Math.abs(v - pc[i])));
    assert.ok(diff < 1e-3, `WebGPU and CPU predictions differ by ${diff}: ${pg} vs ${pc}`);
    // So do the threaded and the CPU-only single-threaded bundles.
    const diffMt = Math.max(...p1.map((v, i) => Math.abs(v - pc[i])));
    assert.ok(diffMt < 1e-3, `threaded and single-threaded predictions differ by ${diffMt}: ${pc} vs ${p1}`);
    assert.ok(Math.abs(pg.reduce((a, b) => a + b) - 1) < 1e-3, 'probabilities sum to 1');

    // Figures for the record.
    const sps = (name) => m.clients.find((c) => c.name === name).samples_per_sec.toFixed(0);
    console.log(`samples/s: webgpu ${sps('gpu-tab')}, cpu ${sps('cpu-tab-1')} (${states[1].threads} threads), cpu ${sps('cpu-tab-2')} (1 thread); bytes/round up ${last.bytes_up} down ${last.bytes_down}; accuracy ${m.rounds.map((r) => r.test_accuracy.toFixed(3)).join(' → ')}`);
  } finally {
    await close();
  }
});
