// Bring your own data: a run with `dataset = "tab"` (tests/browser/byo.toml), where the server
// names three classes and holds no data. Two headless Chromium tabs label their own examples: one
// class from a fake camera (a y4m file this test writes: moving horizontal stripes), two from PNG
// files this test encodes (vertical bars, checks). Checks that
//   1. nothing the tabs send carries their pixels: every WebSocket frame a tab sends is a Canopy
//      message of an allowed kind and size (a Result is the size of the model update), no frame
//      holds any stored example's bytes, and no HTTP request has a body;
//   2. the run trains: every round aggregates both tabs, and their own held-out accuracy ends
//      well above chance (1/3);
//   3. the dashboard (page and JSON) shows the per-class counts the tabs hold;
//   4. the examples survive a reload (IndexedDB);
// and that there is no global test accuracy (null, not a made-up number).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deflateSync } from 'node:zlib';
import { chromium } from 'playwright-core';
import { root, startServer, waitFor, artifactsDir } from './harness.mjs';

const SIZE = 64;
const ROUNDS = 8;
const CLASSES = ['stripes', 'bars', 'checks'];

// A small deterministic random source, so every run draws the same examples.
function rng(seed) {
  let s = seed >>> 0;
  return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
}

// 64×64 grayscale: class 0 horizontal stripes, 1 vertical bars, 2 checks, period 16, shifted by
// `phase`, plus noise.
function pattern(cls, phase, rand) {
  const px = new Uint8Array(SIZE * SIZE);
  for (let y = 0; y < SIZE; y++) {
    for (let x = 0; x < SIZE; x++) {
      const h = Math.floor((y + phase) / 8) % 2, v = Math.floor((x + phase) / 8) % 2;
      const on = cls === 0 ? h : cls === 1 ? v : h ^ v;
      px[y * SIZE + x] = Math.max(0, Math.min(255, (on ? 220 : 30) + Math.round((rand() - 0.5) * 40)));
    }
  }
  return px;
}

// The camera: a YUV4MPEG2 file of moving class-0 stripes, which Chromium's fake device loops.
function y4m(path) {
  const rand = rng(7);
  const parts = [Buffer.from(`YUV4MPEG2 W${SIZE} H${SIZE} F10:1 Ip A1:1 C420jpeg\n`)];
  for (let f = 0; f < 16; f++) {
    parts.push(Buffer.from('FRAME\n'), Buffer.from(pattern(0, f, rand)), Buffer.alloc(2 * (SIZE / 2) ** 2, 128));
  }
  writeFileSync(path, Buffer.concat(parts));
}

// A minimal PNG encoder (8-bit grayscale), enough for files the tab is given.
const CRC = Array.from({ length: 256 }, (_, n) => { let c = n; for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1; return c >>> 0; });
const crc32 = (buf) => { let c = 0xffffffff; for (const b of buf) c = CRC[(c ^ b) & 0xff] ^ (c >>> 8); return (c ^ 0xffffffff) >>> 0; };
function chunk(type, data) {
  const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
  const td = Buffer.concat([Buffer.from(type), data]);
  const crc = Buffer.alloc(4); crc.writeUInt32BE(crc32(td));
  return Buffer.concat([len, td, crc]);
}
function png(px) {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(SIZE, 0); ihdr.writeUInt32BE(SIZE, 4); ihdr[8] = 8; ihdr[9] = 0;
  const raw = Buffer.alloc(SIZE * (SIZE + 1));
  for (let y = 0; y < SIZE; y++) Buffer.from(px.subarray(y * SIZE, (y + 1) * SIZE)).copy(raw, y * (SIZE + 1) + 1);
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr), chunk('IDAT', deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}
const files = (cls, n, seed) => {
  const rand = rng(seed);
  return Array.from({ length: n }, (_, i) => ({ name: `${CLASSES[cls]}-${i}.png`, mimeType: 'image/png', buffer: png(pattern(cls, Math.floor(rand() * 16), rand)) }));
};

// What a tab stored in IndexedDB (read in the page, as the page itself does).
const stored = (page) => page.evaluate(() => new Promise((res, rej) => {
  const r = indexedDB.open('canopy-byo', 1);
  r.onerror = () => rej(r.error);
  r.onsuccess = () => {
    const g = r.result.transaction('examples').objectStore('examples').getAll();
    g.onsuccess = () => res(g.result.map((e) => ({ label: e.label, heldOut: e.heldOut, pixels: Array.from(e.pixels) })));
  };
}));

// Canopy ClientMsg variant indices (postcard): Hello 0, Progress 1, Result 2, Error 3, Exchange 4, Bye 5, Examples 6.
const KIND = ['hello', 'progress', 'result', 'error', 'exchange', 'bye', 'examples'];

test('two tabs train on their own camera and file examples, which never leave them', { timeout: 600_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'canopy-byo-'));
  const cam = join(dir, 'camera.y4m');
  y4m(cam);
  const server = await startServer(['--config', join(root, 'tests/browser/byo.toml'), '--name', 'browser-byo'], { linger: true });
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic',
      '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream', `--use-file-for-fake-video-capture=${cam}`],
  });
  const logs = [];
  const sent = []; // every frame a tab sent: { tab, bytes }
  const bodies = []; // every HTTP request with a body
  try {
    const tabs = [];
    for (const [i, name] of ['byo-a', 'byo-b'].entries()) {
      const page = await browser.newPage(); // its own context: its own IndexedDB
      page.on('console', (m) => logs.push(`[${name}] ${m.text()}`));
      page.on('pageerror', (e) => logs.push(`[${name} pageerror] ${e.message}`));
      page.on('request', (r) => { const b = r.postDataBuffer(); if (b && b.length) bodies.push({ tab: i, url: r.url(), bytes: b.length }); });
      page.on('websocket', (ws) => ws.on('framesent', (f) => sent.push({ tab: i, bytes: Buffer.isBuffer(f.payload) ? f.payload : Buffer.from(f.payload) })));
      await page.goto(`${server.url}?name=${name}&bundle=pkg&backend=cpu`);
      tabs.push(page);
    }
    const byo = (page) => page.evaluate(() => window.canopy.byo && JSON.parse(JSON.stringify(window.canopy.byo)));
    for (const [i, page] of tabs.entries()) {
      await waitFor(() => byo(page), 90_000, `tab ${i}'s examples panel`);
      // Class 0 from the camera: turn it on, hold the button for a while.
      await page.click('#byoCamera');
      await waitFor(async () => (await byo(page)).camera && page.evaluate(() => document.getElementById('byoVideo').videoWidth > 0), 20_000, 'the camera');
      await page.dispatchEvent('#byoCam-0', 'pointerdown');
      await new Promise((r) => setTimeout(r, 1800));
      await page.dispatchEvent('#byoCam-0', 'pointerup');
      // Classes 1 and 2 from files.
      await page.setInputFiles('#byoFiles-1', files(1, 14, 11 + i));
      await page.setInputFiles('#byoFiles-2', files(2, 14, 21 + i));
      await waitFor(async () => { const b = await byo(page); return b.stored >= 38 && b.counts.every((n) => n >= 8); }, 20_000, `tab ${i}'s examples`);
    }
    const before = await Promise.all(tabs.map(byo));

    // The run: ROUNDS rounds, each aggregating both tabs.
    const api = async () => (await fetch(`${server.url}api/metrics`)).json();
    const m = await waitFor(async () => { const m = await api(); return m.rounds.length >= ROUNDS && m; }, 420_000, `${ROUNDS} rounds`);
    const states = await Promise.all(tabs.map((p) => p.evaluate(() => JSON.parse(JSON.stringify(window.canopy.state)))));

    // 2. It trained: both tabs in every round; their own held-out accuracy well above chance.
    for (const r of m.rounds) assert.equal(r.results, 2, `round ${r.round}: both tabs aggregated`);
    const acc = m.rounds.map((r) => r.local_accuracy);
    assert.ok(acc[acc.length - 1] >= 0.8, `tabs' own held-out accuracy by round: ${acc}`);
    for (const s of states) {
      assert.ok(s.roundsDone >= ROUNDS - 1, `each tab trained: ${s.roundsDone}`);
      const losses = s.results.map((x) => x.train_loss);
      assert.ok(losses[losses.length - 1] < losses[0], `training loss fell: ${losses}`);
    }
    // No global test set, so no global accuracy: null, never a number made up from nothing.
    for (const r of m.rounds) assert.equal(r.test_accuracy, null, `round ${r.round} test accuracy`);

    // 3. The counts the tabs hold, on the JSON API and the dashboard.
    assert.deepEqual(m.run.classes, CLASSES);
    const totals = CLASSES.map((_, k) => before.reduce((a, b) => a + b.counts[k] + b.heldOut[k], 0));
    for (const [i, b] of before.entries()) {
      const row = m.clients.find((c) => c.name === ['byo-a', 'byo-b'][i]);
      assert.deepEqual(row.examples, { train: b.counts, test: b.heldOut }, `tab ${i}'s counts`);
    }
    const dash = await browser.newPage();
    await dash.goto(`${server.url}dashboard`);
    await waitFor(async () => (await dash.textContent('#examplesTotal-2').catch(() => null)) === String(totals[2]), 20_000, 'the dashboard\'s counts');
    const shown = await Promise.all(CLASSES.map((_, k) => dash.textContent(`#examplesTotal-${k}`)));
    assert.deepEqual(shown.map(Number), totals, 'dashboard totals per class');
    assert.match(await dash.textContent('#acc'), /—/, 'the dashboard shows no global accuracy');
    const shots = artifactsDir(server.runDir);
    await dash.screenshot({ path: join(shots, 'byo-dashboard.png'), fullPage: true });
    await tabs[0].screenshot({ path: join(shots, 'byo-tab-0.png'), fullPage: true });

    // 1. Nothing carried pixels. Every frame sent is a Canopy message of an allowed kind and
    //    size: a Result is the update (4 bytes a parameter, as the task's upload asks) plus a
    //    few hundred bytes of metrics; the rest are small.
    assert.ok(sent.length >= 2 * (2 + ROUNDS), `frames seen: ${sent.length} (the test must see the tabs' sockets)`);
    const params = states[0].results[0].params;
    const kinds = {};
    for (const { tab, bytes } of sent) {
      assert.ok(bytes.length >= 4 && bytes[0] === 0x43 && bytes[1] === 0x4e && bytes[2] === 7, `tab ${tab} sent a non-Canopy frame of ${bytes.length} bytes`);
      const kind = KIND[bytes[3]];
      kinds[kind] = (kinds[kind] || 0) + 1;
      const limit = { hello: 4096, progress: 256, error: 1024, examples: 64, bye: 16 }[kind];
      if (kind === 'result') {
        assert.ok(bytes.length >= 4 * params && bytes.length <= 4 * params + 512, `a result of ${bytes.length} bytes for ${params} parameters`);
      } else {
        assert.ok(limit !== undefined && bytes.length <= limit, `tab ${tab} sent a ${kind} frame of ${bytes.length} bytes`);
      }
    }
    assert.ok(kinds.result >= 2 * ROUNDS && kinds.examples >= 2, `frames by kind: ${JSON.stringify(kinds)}`);
    // No stored example's bytes appear in anything sent: 24 bytes from the middle of each.
    const all = Buffer.concat(sent.map((s) => s.bytes));
    for (const [i, page] of tabs.entries()) {
      const ex = await stored(page);
      assert.equal(ex.length, before[i].stored);
      for (const e of ex) {
        const needle = Buffer.from(e.pixels.slice(392, 416));
        assert.equal(all.indexOf(needle), -1, `tab ${i}: an example's pixels went out`);
      }
    }
    assert.deepEqual(bodies, [], 'no HTTP request carried a body');

    // "Try it": the global model on the live camera (the stripes of class 0), per class.
    await tabs[0].click('#byoTry');
    const tried = await waitFor(async () => (await byo(tabs[0])).lastTry, 20_000, 'a prediction on the camera');
    assert.equal(tried.probs.length, CLASSES.length);
    assert.ok(Math.abs(tried.probs.reduce((a, b) => a + b) - 1) < 1e-3, `probabilities: ${tried.probs}`);
    assert.equal(tried.best, 0, `the camera shows stripes: ${tried.probs}`);
    assert.equal(tried.round, ROUNDS);
    assert.match(await tabs[0].textContent('#byoProbs'), /stripes/);

    // 4. A reload keeps the examples: the panel comes back with the same counts.
    await tabs[0].reload();
    await waitFor(async () => { const b = await byo(tabs[0]); return b && b.lastSync && b; }, 90_000, 'the reloaded tab\'s panel');
    const after = await byo(tabs[0]);
    assert.deepEqual([after.stored, after.counts, after.heldOut], [before[0].stored, before[0].counts, before[0].heldOut]);

    console.log(`screenshots in ${shots}`);
    console.log(`try it on the camera: ${tried.probs.map((p) => p.toFixed(3)).join('/')}`);
    console.log(`byo: ${m.rounds.length} rounds, tabs' own held-out accuracy ${acc.map((a) => a.toFixed(3)).join(' → ')}; examples per class ${totals.join('/')}; ` +
      `${sent.length} frames sent checked (${JSON.stringify(kinds)}), ${params} parameters; losses ${states.map((s) => s.results.map((x) => x.train_loss.toFixed(3)).join('→')).join(' | ')}`);
  } catch (e) {
    e.message += `\n${server.log().slice(-3000)}\n${logs.slice(-60).join('\n')}`;
    throw e;
  } finally {
    await browser.close();
    server.proc.kill();
  }
});
