// Structured pruning in two real tabs (WebGPU and CPU): the model physically shrinks and every
// tab rebuilds and trains the server's architecture.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { root, runWithTabs } from './harness.mjs';

test('structured pruning shrinks the model the tabs train', { timeout: 600_000 }, async () => {
  const { states, metrics: m, close } = await runWithTabs(['--config', join(root, 'tests/browser/structured.toml'), '--name', 'browser-structured'], [{ name: 'gpu-tab', webgpu: true }, { name: 'cpu-tab', webgpu: false }], 'structured');
  try {
    assert.deepEqual(states.map((s) => s.backend), ['webgpu', 'cpu']);

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
    await close();
  }
});
