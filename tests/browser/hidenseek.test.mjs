// HideNseek in real tabs (WebGPU and CPU): the tabs regenerate θ₀ from the seed, learn sign
// scores, and upload at most one bit per surviving weight: their signs (the paper's vote), or
// with vote = "steps" which way each score moved.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { root, runWithTabs } from './harness.mjs';

// The run's shape, the same for both votes: a WebGPU and a CPU tab, both tabs' bits accepted in
// every round, at most one bit per surviving weight. Surviving entries: half the weights plus
// every bias; per tensor at most ⌈kept/8⌉ bytes, so an upload frame is at most kept/8 + 6
// tensors' padding + the envelope.
function bothTabsEveryRound(states, m, rounds) {
  assert.deepEqual(states.map((s) => s.backend), ['webgpu', 'cpu']);
  assert.equal(m.rounds.length, rounds);
  const params = m.rounds[0].params;
  const biases = 200 + 200 + 10;
  const kept = Math.round(0.5 * (params - biases)) + biases;
  for (const r of m.rounds) {
    assert.equal(r.results, 2, `round ${r.round}: both tabs' bits accepted`);
    assert.equal(r.rejected, 0);
    assert.ok(r.extra.upload_bits_per_weight <= 1 + 42 / kept, `round ${r.round}: ${r.extra.upload_bits_per_weight} bits per weight`);
  }
  return { params, kept };
}

test('tabs learn weight signs and send bits, not weights', { timeout: 600_000 }, async () => {
  const { states, metrics: m, close } = await runWithTabs(['--config', join(root, 'tests/browser/hidenseek.toml'), '--name', 'browser-hidenseek'], [{ name: 'gpu-tab', webgpu: true }, { name: 'cpu-tab', webgpu: false }], 'hidenseek');
  try {
    const { params, kept } = bothTabsEveryRound(states, m, 3);
    assert.ok(Math.abs(m.rounds[0].extra.density - 0.5) < 1e-3, `density ${m.rounds[0].extra.density}`);
    for (const s of states) {
      assert.deepEqual(s.errors, []);
      for (const res of s.results) {
        assert.ok(res.uploadBytes <= Math.ceil(kept / 8) + 6 + 400, `${s.backend}: upload ${res.uploadBytes} B for ${kept} surviving weights`);
        assert.ok(res.uploadBytes * 32 < params * 4, `${s.backend}: ≥ 32× below sending weights`);
        assert.equal(res.pruned_nonzero, 0, `${s.backend}: pruned weights stay zero`);
      }
      // Downloads: the seed and the bits, never θ₀ (the first task also carries the mask).
      assert.ok(s.results[1].taskBytes < kept / 8 + 2000, `${s.backend}: task ${s.results[1].taskBytes} B`);
    }
    assert.ok(m.rounds[2].test_accuracy > 0.4, `accuracy ${m.rounds.map((r) => r.test_accuracy)}`);
    console.log(`hidenseek: accuracy ${m.rounds.map((r) => r.test_accuracy.toFixed(3)).join(' → ')}, own ${m.rounds.map((r) => r.local_accuracy.toFixed(3)).join(' → ')}; bits/weight up ${m.rounds.map((r) => r.extra.upload_bits_per_weight.toFixed(3)).join(', ')}; upload frames ${states.map((s) => s.results.map((x) => x.uploadBytes).join('/')).join(' | ')}`);
  } finally {
    await close();
  }
});

test('tabs send score steps: one stochastically rounded bit per surviving weight, and the vote moves', { timeout: 600_000 }, async () => {
  const { states, metrics: m, close } = await runWithTabs(['--config', join(root, 'tests/browser/hidenseek-steps.toml'), '--name', 'browser-hidenseek-steps'], [{ name: 'gpu-tab', webgpu: true }, { name: 'cpu-tab', webgpu: false }], 'hidenseek-steps');
  try {
    const { kept } = bothTabsEveryRound(states, m, 4);
    for (const s of states) {
      assert.deepEqual(s.errors, []);
      // Coin tosses where a tab barely moved a score do not compress into flips, as a tab's
      // own signs do after round 1: every upload is about one bit per surviving weight.
      for (const res of s.results) assert.ok(res.uploadBytes >= 0.95 * kept / 8, `${s.backend}: upload ${res.uploadBytes} B for ${kept} surviving weights`);
    }
    // The server's scores start at ±1 and move by at most 0.5 a round: nothing can flip in
    // round 1, bits flip once the tabs' steps add up.
    assert.equal(m.rounds[0].extra.bits_changed, 0);
    assert.ok(m.rounds.slice(1).some((r) => r.extra.bits_changed > 0), `bits changed ${m.rounds.map((r) => r.extra.bits_changed)}`);
    // Natively, five clients on IID digits: 0.078, 0.078, 0.688, 0.708 (docs/src/methods/hidenseek.md).
    assert.ok(m.rounds[3].test_accuracy > m.rounds[0].test_accuracy + 0.1, `accuracy ${m.rounds.map((r) => r.test_accuracy)}`);
    console.log(`hidenseek steps: accuracy ${m.rounds.map((r) => r.test_accuracy.toFixed(3)).join(' → ')}; bits changed ${m.rounds.map((r) => r.extra.bits_changed.toFixed(4)).join(', ')}; upload frames ${states.map((s) => s.results.map((x) => x.uploadBytes).join('/')).join(' | ')}`);
  } finally {
    await close();
  }
});
