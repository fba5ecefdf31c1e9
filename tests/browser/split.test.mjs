// Split learning in real tabs (WebGPU and CPU): each tab trains a pruned front and, for every
// batch, sends half its activations and awaits the 8-bit gradient from the server, which trains
// the back. The server serves both tabs' batches side by side. The CPU tab runs the
// single-threaded WebGPU build on its CPU backend (`bundle=pkg`), the slowest: with the threaded
// one, faster on this MLP, the batches switched tabs only once a round (1, 1) in the run that
// tried it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { root, runWithTabs } from './harness.mjs';

test('tabs train pruned fronts, the server the back, batch by batch', { timeout: 600_000 }, async () => {
  const { states, metrics: m, close } = await runWithTabs(['--config', join(root, 'tests/browser/split.toml'), '--name', 'browser-split'], [{ name: 'gpu-tab', webgpu: true }, { name: 'cpu-tab', webgpu: false, query: 'bundle=pkg' }], 'split');
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
      const x = r.extra;
      assert.equal(r.results, 2, `round ${r.round}: both tabs' results accepted`);
      const steps = states.reduce((n, s) => n + s.results[i].steps, 0);
      assert.equal(x.exchanges, steps, `round ${r.round}: the server answered every batch`);
      // ρ = 0.25 of 200 units: the tabs train a 784 × 150 front.
      assert.equal(x.front_params, 784 * 150 + 150);
      // κ = 0.5 of 32 × 150 f32 activations up, 8-bit gradients for those down (+ envelopes).
      const up = x.act_bytes_up / steps, down = x.grad_bytes_down / steps;
      assert.ok(up > 0.45 * 19200 && up < 0.55 * 19200 + 200, `activation bytes per batch ${up}`);
      assert.ok(down > 0.45 * 4800 && down < 0.55 * 4800 + 200, `gradient bytes per batch ${down}`);
    }
    // The server answered one tab's batch while the other was mid-task (A … B … A): it serves
    // tabs side by side, not one task after the other (that switches once a round). In the first
    // round the CPU tab may finish before the WebGPU tab has set up, so any round will do.
    const switches = m.rounds.map((r) => r.extra.exchange_switches);
    assert.ok(Math.max(...switches) >= 2, `batches of the two tabs interleaved: ${switches}`);
    assert.ok(m.rounds[1].test_accuracy > 0.5, `accuracy ${m.rounds.map((r) => r.test_accuracy)}`);
    const r = m.rounds.at(-1).extra;
    console.log(`split: ${m.rounds.map((x) => x.extra.exchanges).join(' + ')} batches; per batch ${(r.act_bytes_up / r.exchanges / 1e3).toFixed(1)} KB up, ${(r.grad_bytes_down / r.exchanges / 1e3).toFixed(1)} KB down; tab ${r.tab_ms_per_batch.toFixed(1)} ms/batch, server ${(1e3 * r.server_seconds / r.exchanges).toFixed(1)} ms/batch; interleaved ${m.rounds.map((x) => x.extra.exchange_switches).join(', ')} times, at most ${m.rounds.map((x) => x.extra.exchanges_at_once).join(', ')} at once; accuracy ${m.rounds.map((x) => x.test_accuracy.toFixed(3)).join(' → ')}`);
  } finally {
    await close();
  }
});
