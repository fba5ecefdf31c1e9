// Structured pruning in two real tabs (WebGPU and CPU): the model physically shrinks and every
// tab rebuilds and trains the server's architecture.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { root, startServer, launch, openTab, state, artifactsDir } from './harness.mjs';

test('structured pruning shrinks the model the tabs train', { timeout: 600_000 }, async () => {
  const server = await startServer(['--config', join(root, 'tests/browser/structured.toml'), '--name', 'browser-structured']);
  const gpu = await launch({ webgpu: true });
  const cpu = await launch({ webgpu: false });
  const logs = [];
  try {
    const tabs = [await openTab(gpu, `${server.url}?name=gpu-tab`, logs), await openTab(cpu, `${server.url}?name=cpu-tab`, logs)];
    let timer;
    const code = await Promise.race([server.exited, new Promise((r) => { timer = setTimeout(() => r('timeout'), 540_000); })]);
    clearTimeout(timer);
    const states = await Promise.all(tabs.map(state));
    const shots = artifactsDir(server.runDir);
    await Promise.all(tabs.map((t, i) => t.screenshot({ path: join(shots, `structured-tab-${i}.png`) })));
    assert.equal(code, 0, `server should finish the run\n${server.log().slice(-3000)}\n${logs.join('\n')}`);
    assert.deepEqual(states.map((s) => s.backend), ['webgpu', 'cpu']);

    const m = server.metrics();
    assert.equal(m.rounds.length, 3);
    const params = m.rounds.map((r) => r.params);
    assert.ok(params[1] < params[0] && params[2] < params[1], `server model shrinks: ${params}`);
    for (const s of states) {
      assert.deepEqual(s.errors, []);
      assert.equal(s.results.length, 3, `${s.backend} trained every round, before and after pruning`);
      // The tab rebuilt exactly the architecture the server held in each round.
      assert.deepEqual(s.results.map((r) => r.params), params, `${s.backend} model sizes`);
    }
    for (const r of m.rounds) assert.equal(r.results, 2);
    // λ = 1 cuts about a third of the hidden units every round, so accuracy only has to stay
    // well clear of chance (0.1) here; the compare table measures what pruning costs.
    assert.ok(m.rounds[2].test_accuracy > 0.25, `accuracy ${m.rounds.map((r) => r.test_accuracy)}`);
    const stepMs = (s) => s.results.map((r) => (1000 * r.seconds / r.steps).toFixed(2));
    console.log(`structured: params ${params.join(' → ')}; step ms webgpu ${stepMs(states[0]).join(' → ')}, cpu ${stepMs(states[1]).join(' → ')}`);
  } finally {
    await gpu.close();
    await cpu.close();
    server.proc.kill();
  }
});
