// The in-round exchange in real tabs (WebGPU and CPU): each batch, the tab sends its model's
// output and awaits the loss gradient from the server before its optimizer step.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { root, runWithTabs } from './harness.mjs';

test('tabs await the server for every batch and the run learns', { timeout: 600_000 }, async () => {
  const { states, metrics: m, close } = await runWithTabs(['--config', join(root, 'tests/browser/echo.toml'), '--name', 'browser-echo'], [{ name: 'gpu-tab', webgpu: true }, { name: 'cpu-tab', webgpu: false }], 'echo');
  try {
    assert.deepEqual(states.map((s) => s.backend), ['webgpu', 'cpu']);
    assert.equal(m.rounds.length, 2);
    for (const s of states) {
      assert.deepEqual(s.errors, []);
      assert.equal(s.results.length, 2, `${s.backend}: a result every round`);
      const steps = s.results.reduce((n, r) => n + r.steps, 0);
      assert.ok(steps > 0);
      assert.equal(s.exchanges, steps, `${s.backend}: one awaited reply per batch`);
    }
    for (const [i, r] of m.rounds.entries()) {
      assert.equal(r.results, 2, `round ${r.round}: both tabs' results accepted`);
      const steps = states.reduce((n, s) => n + s.results[i].steps, 0);
      assert.equal(r.extra.exchanges, steps, `round ${r.round}: the server answered every batch`);
    }
    assert.ok(m.rounds[1].test_accuracy > 0.5, `accuracy ${m.rounds.map((r) => r.test_accuracy)}`);
    console.log(`echo: ${m.rounds.map((r) => r.extra.exchanges).join(' + ')} exchanges; accuracy ${m.rounds.map((r) => r.test_accuracy.toFixed(3)).join(' → ')}`);
  } finally {
    await close();
  }
});
