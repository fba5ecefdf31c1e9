// FedProx in two real tabs (WebGPU and CPU): the proximal term is part of each tab's training
// step, on both backends, and the run learns.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { root, runWithTabs } from './harness.mjs';

test('FedProx trains in a WebGPU tab and a CPU tab', { timeout: 600_000 }, async () => {
  const { states, metrics: m, close } = await runWithTabs(['--config', join(root, 'tests/browser/fedprox.toml'), '--name', 'browser-fedprox'], [{ name: 'gpu-tab', webgpu: true }, { name: 'cpu-tab', webgpu: false }], 'fedprox');
  try {
    assert.deepEqual(states.map((s) => s.backend), ['webgpu', 'cpu']);
    assert.equal(m.rounds.length, 3);
    for (const r of m.rounds) {
      assert.equal(r.results, 2, `round ${r.round}: both tabs' updates accepted`);
      assert.equal(r.rejected, 0);
    }
    for (const s of states) {
      assert.deepEqual(s.errors, []);
      assert.equal(s.roundsDone, 3);
    }
    const acc = m.rounds.map((r) => r.test_accuracy);
    assert.ok(acc[2] > 0.5, `accuracy ${acc}`);
    assert.ok(m.rounds[2].test_loss < m.rounds[0].test_loss, 'loss fell');
    console.log(`fedprox μ = 0.5: accuracy ${acc.map((a) => a.toFixed(3)).join(' → ')}; median update norm ${m.rounds.map((r) => (r.extra['robust.median_norm'] ?? 0).toFixed(3)).join(', ')}`);
  } finally {
    await close();
  }
});
