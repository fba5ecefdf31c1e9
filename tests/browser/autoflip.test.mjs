// AutoFLIP in two real tabs (WebGPU and CPU): exploration, a global mask, masked training.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { root, runWithTabs } from './harness.mjs';

test('AutoFLIP prunes half the model and the tabs keep the mask', { timeout: 600_000 }, async () => {
  const { states, metrics: m, close } = await runWithTabs(['--config', join(root, 'tests/browser/autoflip.toml'), '--name', 'browser-autoflip'], [{ name: 'gpu-tab', webgpu: true }, { name: 'cpu-tab', webgpu: false }], 'autoflip');
  try {
    assert.deepEqual(states.map((s) => s.backend), ['webgpu', 'cpu']);

    assert.equal(m.rounds.length, 3);
    assert.equal(m.rounds[0].extra.explore_clients, 2, 'both tabs explored');
    for (const r of m.rounds) {
      assert.equal(r.results, 2, `round ${r.round}: both tabs' updates accepted`);
      assert.equal(r.rejected, 0);
    }
    assert.ok(Math.abs(m.rounds[2].extra.sparsity - 0.5) < 1e-3, `sparsity ${m.rounds[2].extra.sparsity}`);
    const params = m.rounds[0].params;
    for (const s of states) {
      assert.deepEqual(s.errors, []);
      const [explore, first, second] = s.results;
      // The mask held exactly in the tab, on WebGPU and CPU alike.
      assert.equal(first.pruned_nonzero, 0, `${s.backend}: pruned weights moved`);
      assert.equal(second.pruned_nonzero, 0);
      // Uploads carry int8 values of the kept half only: far below 4 bytes per parameter.
      assert.ok(first.uploadBytes < 0.6 * params + 1000, `${s.backend} uploaded ${first.uploadBytes} B for ${params} params`);
      assert.ok(explore.uploadBytes > params, 'exploration sends every entry');
      // The mask came once (round 2) and was then named by its version only.
      assert.deepEqual([first.mask.sent, second.mask.sent], [true, false]);
      assert.ok(second.taskBytes < first.taskBytes - params / 8 + 100, `task frames ${first.taskBytes} then ${second.taskBytes}`);
    }
    assert.ok(m.rounds[2].test_accuracy > 0.5, `accuracy ${m.rounds.map((r) => r.test_accuracy)}`);
    console.log(`autoflip: accuracy ${m.rounds.map((r) => r.test_accuracy.toFixed(3)).join(' → ')}; up per round ${m.rounds.map((r) => r.bytes_up).join(', ')}`);
  } finally {
    await close();
  }
});
