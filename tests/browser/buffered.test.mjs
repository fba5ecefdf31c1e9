// Asynchronous buffered aggregation (FedBuff) in real tabs: three CPU tabs train without rounds
// in lock-step, one is closed in the middle of a task, and the other two carry the run to its
// last version without waiting for it: the closed tab costs its own update and nothing else.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { launch, openTab, root, startServer, state, waitFor } from './harness.mjs';

const STEPS = 6;

test('buffered run: a tab closed mid-task holds nobody up', { timeout: 300_000 }, async () => {
  const server = await startServer(['--config', join(root, 'tests/browser/buffered.toml'), '--name', 'browser-buffered']);
  const browser = await launch({ webgpu: false });
  const logs = [];
  try {
    const tabs = [];
    for (const name of ['leaver', 'stayer-a', 'stayer-b']) tabs.push(await openTab(browser, `${server.url}?name=${name}&backend=cpu`, logs));
    const [leaver, ...stayers] = tabs;
    // Close the first tab in the middle of its second task.
    await waitFor(async () => { const s = await state(leaver); return s?.roundsDone >= 1 && s?.status?.startsWith('training'); }, 120_000, 'the first tab to train a second time');
    await leaver.close();
    let timer;
    const code = await Promise.race([server.exited, new Promise((r) => { timer = setTimeout(() => r('timeout'), 180_000); })]);
    clearTimeout(timer);
    assert.equal(code, 0, `the server finished the run\n${server.log().slice(-3000)}\n${logs.join('\n')}`);

    const m = server.metrics();
    assert.deepEqual(m.rounds.map((r) => r.round), Array.from({ length: STEPS }, (_, i) => i + 1), 'every version made once, in order');
    for (const r of m.rounds) {
      assert.equal(r.results, 2, `version ${r.round}: a step takes K = 2 results`);
      assert.equal(r.rejected, 0);
      assert.equal(r.extra['buffer.size'], 2);
      assert.ok(r.extra['buffer.staleness_max'] <= 10);
    }
    assert.ok(m.rounds.some((r) => r.dropped >= 1), 'the closed tab was counted as dropped');
    assert.equal(m.buffer.size, 2);
    assert.equal(m.buffer.version, STEPS + 1, 'the buffer waits for the version after the last');
    assert.equal(m.phase, 'done');
    for (const p of stayers) {
      const s = await waitFor(async () => { const s = await state(p); return s?.finished && s; }, 10_000, 'a stayer to see the Bye');
      assert.deepEqual(s.errors, []);
    }
    const acc = m.rounds.map((r) => r.test_accuracy);
    assert.ok(acc.at(-1) > 0.6, `accuracy ${acc}`);
    console.log(`buffered run: accuracy ${acc.map((a) => a.toFixed(3)).join(' → ')}; staleness mean ${m.rounds.map((r) => r.extra['buffer.staleness_mean'].toFixed(2)).join(', ')}; dropped ${m.rounds.map((r) => r.dropped).join(', ')}`);
  } finally {
    await browser.close();
    server.proc.kill('SIGKILL');
  }
});
