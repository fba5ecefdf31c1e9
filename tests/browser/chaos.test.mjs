// Chaos: tabs come and go and the server dies. A tab is closed mid-round, a new tab joins late,
// and the server is killed with SIGKILL mid-run and restarted with --resume on the same port while
// the tabs stay open. The tabs reconnect by themselves and the run ends with every round recorded
// exactly once.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { launch, openTab, startServer, state, waitFor } from './harness.mjs';

const ROUNDS = 8;
const ARGS = [
  '--rounds', String(ROUNDS), '--shards', '4', '--min-clients', '2', '--partition', 'iid', '--max-train', '3000',
  '--epochs', '6', '--batch-size', '32', '--lr', '0.05', '--deadline', '60', '--name', 'chaos',
];

test('tabs closing, joining late and a server killed and resumed: every round once', { timeout: 300_000 }, async () => {
  const t0 = Date.now();
  let server = await startServer(ARGS);
  const port = new URL(server.url).port;
  const browser = await launch({ webgpu: false });
  const logs = [];
  const servers = [server];
  const roundsDone = () => {
    const f = join(server.runDir, 'metrics.json');
    return existsSync(f) ? JSON.parse(readFileSync(f, 'utf8')).rounds.length : 0;
  };
  const training = async (page) => (await state(page))?.status?.startsWith('training');
  try {
    const a = await openTab(browser, `${server.url}?name=leaver&backend=cpu`, logs);
    const b = await openTab(browser, `${server.url}?name=stayer&backend=cpu`, logs);
    // Close a tab in the middle of its second task.
    await waitFor(async () => (await state(a))?.roundsDone >= 1 && await training(a), 60_000, 'the first tab to train a second time');
    await a.close();
    // A third tab joins late.
    const c = await openTab(browser, `${server.url}?name=latecomer&backend=cpu`, logs);
    await waitFor(async () => (await state(c))?.roundsDone >= 1, 60_000, 'the late tab to finish a round');
    // Kill the server while a round is under way, after at least three rounds.
    await waitFor(async () => roundsDone() >= 3 && await training(b), 60_000, 'round 4 to be under way');
    const before = roundsDone();
    server.proc.kill('SIGKILL');
    await server.exited;
    await waitFor(async () => (await state(b))?.status?.startsWith('disconnected'), 15_000, 'the tab to notice');
    server = await startServer([...ARGS, '--resume'], { port, outDir: server.outDir });
    servers.push(server);
    let timer;
    const code = await Promise.race([server.exited, new Promise((r) => { timer = setTimeout(() => r('timeout'), 120_000); })]);
    clearTimeout(timer);
    assert.equal(code, 0, `the resumed server finished the run\n${server.log().slice(-3000)}\n${logs.join('\n')}`);

    const m = server.metrics();
    const rounds = m.rounds.map((r) => r.round);
    assert.deepEqual(rounds, Array.from({ length: ROUNDS }, (_, i) => i + 1), 'every round recorded exactly once, in order');
    const csv = readFileSync(join(server.runDir, 'metrics.csv'), 'utf8').trim().split('\n');
    assert.equal(csv.length, ROUNDS + 1, 'metrics.csv: a header and one line per round');
    assert.ok(before >= 3 && before < ROUNDS, `killed after ${before} rounds`);
    assert.ok(m.rounds.some((r) => r.dropped >= 1), 'the closed tab was counted as dropped');
    assert.equal(m.phase, 'done');
    // Both open tabs came back to the new server on their own and saw the run end.
    const log2 = server.log();
    for (const name of ['stayer', 'latecomer']) assert.match(log2, new RegExp(`client joined.*name=${name}|name=${name}.*client joined`), `${name} reconnected`);
    for (const p of [b, c]) {
      const s = await state(p);
      assert.equal(s.finished, true, `${JSON.stringify(s)}`);
    }
    assert.ok(m.rounds.at(-1).test_accuracy > 0.5, `accuracy ${m.rounds.at(-1).test_accuracy}`);
    console.log(`chaos run: killed after ${before} rounds, ${ROUNDS} rounds recorded once each, ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  } finally {
    await browser.close();
    for (const s of servers) s.proc.kill('SIGKILL');
  }
});
