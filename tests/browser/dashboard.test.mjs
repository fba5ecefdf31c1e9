// The dashboard in headless Chromium next to two client tabs: it updates live (no reload) while
// 3 rounds run, its uPlot charts plot one point per round (bytes on log scales, values in the
// legend) and say so when the library is missing, its controls refuse a wrong admin token and
// obey the right one, and "try the model" predicts a drawn digit on the dashboard and in a tab.
// Screenshots go to the run folder.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { startServer, launch, openTab, waitFor, artifactsDir } from './harness.mjs';

const TOKEN = 'test-admin-token-7f3a';

// A "7" in three strokes of the mouse, drawn on the page's #pad canvas.
async function drawSeven(page) {
  await page.locator('#pad').scrollIntoViewIfNeeded();
  const b = await page.locator('#pad').boundingBox();
  const at = (x, y) => [b.x + x * b.width, b.y + y * b.height];
  await page.mouse.move(...at(0.25, 0.2));
  await page.mouse.down();
  for (const [x, y] of [[0.75, 0.2], [0.6, 0.5], [0.45, 0.85]]) await page.mouse.move(...at(x, y), { steps: 10 });
  await page.mouse.up();
}

const checkProbs = (p, where) => {
  assert.equal(p.probs.length, 10, `${where}: ten classes`);
  assert.ok(Math.abs(p.probs.reduce((a, b) => a + b) - 1) < 1e-3, `${where}: probabilities sum to 1 (${p.probs})`);
  assert.ok(p.best >= 0 && p.best <= 9);
};

test('live dashboard, admin controls and draw-a-digit', { timeout: 240_000 }, async () => {
  const server = await startServer([
    '--rounds', '4', '--shards', '2', '--min-clients', '2', '--partition', 'iid', '--max-train', '2000',
    '--epochs', '1', '--batch-size', '32', '--lr', '0.1', '--hold', '--admin-token', TOKEN, '--name', 'browser-dashboard',
  ], { linger: true });
  const browser = await launch({ webgpu: false });
  const logs = [];
  const shots = artifactsDir(server.runDir);
  const api = async () => (await fetch(`${server.url}api/metrics`)).json();
  try {
    const dash = await openTab(browser, `${server.url}dashboard`, logs);
    await dash.setViewportSize({ width: 1280, height: 900 });
    // Survives only if the page is never reloaded.
    await dash.evaluate(() => { window.sameDocument = true; });
    const dv = () => dash.evaluate(() => {
      const v = window.canopyDashboard;
      // The uPlot charts as what they plot: x (rounds), and each line's label, scale and values.
      const plotted = (u) => u && { xs: u.data[0], series: u.series.slice(1).map((s, i) => ({ label: s.label, scale: s.scale, values: u.data[i + 1] })), distr: u.scales.y.distr, plots: u.root.parentElement.querySelectorAll('.uplot').length };
      const charts = Object.fromEntries(Object.entries(window.canopyCharts || {}).map(([id, u]) => [id, plotted(u)]));
      return { updates: v.updates, source: v.source, data: v.data, charts: { ...v.charts, ...charts }, lastAdmin: v.lastAdmin, lastPrediction: v.lastPrediction, same: window.sameDocument };
    });
    await waitFor(async () => (await dv()).updates > 0, 30_000, 'the first live update');

    // The slowest bundle (`bundle=pkg`, the WebGPU build on its CPU backend): the pause below
    // needs rounds that last a moment, and the threaded bundle trains these MLP rounds in ~0.3 s
    // each (all 4 were over before the Pause click landed).
    const tabs = [
      await openTab(browser, `${server.url}?name=alice&backend=cpu&bundle=pkg`, logs),
      await openTab(browser, `${server.url}?name=bob&backend=cpu&bundle=pkg`, logs),
    ];
    await waitFor(() => dash.evaluate(() => document.querySelectorAll('#clients tr.idle').length === 2), 60_000, 'two client rows');
    assert.equal(await dash.textContent('#phase'), 'waiting for Start', 'held until the teacher starts');
    await dash.screenshot({ path: join(shots, 'dashboard-1-joined.png'), fullPage: true });

    // A wrong token is refused, from the form and from a bare request.
    await dash.fill('#token', 'not-the-token');
    await dash.click('#btnStart');
    await waitFor(async () => (await dv()).lastAdmin?.action === 'start', 10_000, 'the start request');
    assert.equal((await dv()).lastAdmin.status, 401);
    assert.match(await dash.textContent('#ctlMsg'), /401: wrong admin token/);
    const bare = await dash.evaluate(async () => {
      const r = await fetch('/api/admin/stop', { method: 'POST' });
      return [r.status, (await r.json()).error];
    });
    assert.equal(bare[0], 401);
    assert.match(bare[1], /token missing/);
    await new Promise((r) => setTimeout(r, 1500));
    const held = await api();
    assert.equal(held.phase, 'paused');
    assert.equal(held.rounds.length, 0, 'nothing ran on a wrong token');
    assert.equal(held.control.stop, false);

    // The right token: 3 rounds instead of 4 and FedAvgM for the next run, then start.
    await dash.fill('#token', TOKEN);
    await dash.fill('#setRounds', '3');
    await dash.selectOption('#setStrategy', 'fedavgm');
    await dash.press('#setRounds', 'Enter');
    await waitFor(async () => (await dv()).lastAdmin?.action === 'settings', 10_000, 'the settings request');
    assert.equal((await dv()).lastAdmin.status, 200, JSON.stringify((await dv()).lastAdmin));
    await waitFor(async () => /Next run: fedavgm/.test(await dash.textContent('#nextRun')), 5000, 'the next run to show');
    assert.match(readFileSync(join(server.runDir, 'next-run.toml'), 'utf8'), /name = "fedavgm"/);
    await dash.click('#btnStart');
    await waitFor(async () => { const a = (await dv()).lastAdmin; return a.action === 'start' && a.status === 200; }, 10_000, 'start accepted');

    // Pause once round 1 is under way: the run holds at the next round boundary.
    await waitFor(async () => { const m = await api(); return m.round >= 1 && m.phase !== 'paused'; }, 60_000, 'round 1 to start');
    await dash.click('#btnPause');
    await waitFor(async () => { const m = await api(); return m.phase === 'paused' && m.rounds.length >= 1; }, 90_000, 'the pause');
    const pausedAt = (await api()).rounds.length;
    await new Promise((r) => setTimeout(r, 2500));
    assert.equal((await api()).rounds.length, pausedAt, 'no round starts while paused');
    assert.ok(pausedAt < 3);
    await waitFor(async () => (await dash.textContent('#phase')) === 'paused', 5000, 'the dashboard to show the pause');
    await dash.screenshot({ path: join(shots, 'dashboard-2-paused.png'), fullPage: true });
    await dash.click('#btnStart');

    // The run ends after 3 rounds; the dashboard follows without a reload.
    await waitFor(async () => (await dv()).data?.phase === 'done', 150_000, 'the dashboard to show the run done');
    const v = await dv();
    assert.equal(v.same, true, 'the dashboard was never reloaded');
    assert.equal(v.source, 'sse');
    assert.ok(v.updates >= 5, `live updates: ${v.updates}`);
    assert.equal(await dash.textContent('#round'), '3 / 3');
    const acc = v.charts.accChart;
    assert.deepEqual(acc.xs, [1, 2, 3]);
    assert.equal(acc.series[0].label, 'accuracy');
    assert.equal(acc.series[0].values.length, 3);
    assert.ok(acc.series[0].values[2] > 0.3, `accuracy after 3 rounds: ${acc.series[0].values}`);
    assert.equal(acc.plots, 1, 'one uPlot per chart, fed with setData, not one per update');
    const bytes = v.charts.bytesChart;
    assert.deepEqual(bytes.xs, [1, 2, 3]);
    assert.deepEqual(bytes.series.map((s) => s.label), ['up', 'down', 'in all']);
    assert.equal(bytes.series[2].values.length, 3, 'cumulative bytes');
    assert.ok(bytes.series[2].values[2] > bytes.series[2].values[0], `cumulative bytes grow: ${bytes.series[2].values}`);
    assert.equal(bytes.distr, 3, 'bytes on a log scale');
    assert.equal(await dash.evaluate(() => window.canopyCharts.bytesChart.scales.r.distr), 3, 'the running total too');
    // FedAvg reports none of the described method figures: no extra lines, no sentence.
    assert.ok(v.data.metric_keys.figures.length > 0, 'the server describes its figures');
    assert.deepEqual(v.charts.sizeChart.series.map((s) => s.label), ['parameters']);
    assert.deepEqual(v.charts.sizeChart.xs, [1, 2, 3]);
    // The legend shows the values under the cursor: round 1's traffic with the pointer on the
    // left edge of the plot, then the latest round's once it leaves.
    const legend = () => dash.$$eval('#bytesChart .u-legend .u-series', (rows) => rows.map((r) => r.textContent.trim()));
    const over = dash.locator('#bytesChart .u-over');
    await over.scrollIntoViewIfNeeded();
    const box = await over.boundingBox();
    await dash.mouse.move(box.x + 2, box.y + box.height / 2);
    await waitFor(async () => (await legend())[0].includes('1'), 5000, 'the legend to follow the cursor');
    const atCursor = await legend();
    assert.match(atCursor[0], /round\s*1$/, atCursor.join(' | '));
    assert.match(atCursor[1], /up\s*[0-9.]+ (KiB|MiB)/, atCursor.join(' | '));
    await dash.mouse.move(1, 1);
    await waitFor(async () => /3 \(latest\)/.test((await legend())[0]), 5000, 'the legend to show the latest round');
    assert.equal(await dash.textContent('#figureLine'), '');
    // Without uPlot in web/vendor (setup not run), each chart's place says what to do.
    const noLib = await browser.newPage();
    const noLibErrors = [];
    noLib.on('pageerror', (e) => noLibErrors.push(e.message));
    await noLib.route('**/vendor/uPlot.iife.min.js', (r) => r.fulfill({ status: 404, body: 'not found' }));
    await noLib.goto(`${server.url}dashboard`);
    await waitFor(() => noLib.evaluate(() => window.canopyDashboard.updates > 0), 30_000, 'an update without uPlot');
    for (const id of ['accChart', 'bytesChart', 'sizeChart']) assert.match(await noLib.textContent(`#${id}`), /run just setup/, id);
    assert.deepEqual(noLibErrors, []);
    await noLib.close();
    assert.deepEqual(v.charts.layerChart.layers.map((l) => l.width), [200, 200, 10]);
    const rows = await dash.$$eval('#clients tr', (trs) => trs.map((tr) => Array.from(tr.cells, (c) => c.textContent)));
    assert.deepEqual(rows.map((r) => r[0]).sort(), ['alice', 'bob']);
    for (const r of rows) assert.equal(r[5], '3', `${r[0]} took part in every round`);
    // Suspicion: each client's norm relative to the round's median, from the robust layer.
    for (const r of rows) assert.match(r[9], /norm ×[0-9.]+/, `${r[0]}: ${r[9]}`);

    // Try the model: on the dashboard (model.bin, wasm on the CPU) and in a tab.
    await drawSeven(dash);
    await waitFor(async () => (await dv()).lastPrediction, 60_000, 'a prediction on the dashboard')
      .catch(async (e) => { throw new Error(`${e.message}: ${await dash.textContent('#guess')}\n${logs.join('\n')}`); });
    const dp = (await dv()).lastPrediction;
    checkProbs(dp, 'dashboard');
    assert.equal(dp.round, 3, 'the dashboard uses the final model');
    await dash.screenshot({ path: join(shots, 'dashboard-3-done.png'), fullPage: true });

    const alice = tabs[0];
    await drawSeven(alice);
    await waitFor(() => alice.evaluate(() => window.canopy.lastPrediction), 30_000, 'a prediction in the tab');
    checkProbs(await alice.evaluate(() => window.canopy.lastPrediction), 'tab');
    // "Teach it": the drawing joins the tab's own training data (and stays there).
    await alice.click('#teach summary');
    await alice.click('#labels button:nth-child(8)');
    // The tab's worker holds the data; the page hears back asynchronously.
    await waitFor(() => alice.evaluate(() => window.canopy.state.ownDigits === 1), 10_000, 'the drawing to join the training data');
    // The dealt shard (as the welcome announced it) plus the one drawn digit.
    const dealt = Number((await alice.textContent('#shard')).match(/(\d+) training/)[1]);
    assert.ok(dealt > 100, `dealt shard: ${dealt}`);
    assert.match(await alice.textContent('#ownMsg'), new RegExp(`Added as a 7\\. Your own digits in this tab's training data: 1 \\(${dealt + 1} samples in all\\)`));
    await drawSeven(alice);
    await waitFor(() => alice.evaluate(() => window.canopy.lastPrediction), 30_000, 'a second prediction');
    await alice.screenshot({ path: join(shots, 'client-alice.png'), fullPage: true });
    await tabs[1].screenshot({ path: join(shots, 'client-bob.png'), fullPage: true });

    const errors = logs.filter((l) => l.startsWith('[pageerror]'));
    assert.deepEqual(errors, [], logs.join('\n'));
    console.log(`dashboard: ${v.updates} live updates; accuracy ${acc.series[0].values.map((a) => a.toFixed(3)).join(' → ')}; screenshots in ${shots}`);
  } finally {
    await browser.close();
    server.proc.kill();
  }
});
