// Classroom tabs on a LAN-like origin, each the way a student opens it. Over plain http (an
// insecure origin): no WebGPU, no isolation, so the CPU-only bundle, which says why, trains, and
// downloads ≤ 2 MB with gzip alone. Over https with the self-signed certificate:
// on a LAN-like name (classroom.test, resolved to 127.0.0.1 by Chromium's --host-resolver-rules,
// so the page is not on localhost and nothing leaves this machine), through the certificate
// warning by clicking "Advanced" and "Proceed". The page must then be a secure context, cross-
// origin isolated, run the threaded bundle on ≥ 2 threads (on a ≥ 2-core machine), and its
// result must be aggregated; with --enable-unsafe-webgpu it sees navigator.gpu. The plain-http
// port redirects to https.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir, cpus } from 'node:os';
import { join } from 'node:path';
import { get } from 'node:http';
import { startServer, state, waitFor, artifactsDir, launch, transferred, LAN_HOST } from './harness.mjs';

const plainGet = (url) => new Promise((res, rej) => {
  get(url, (r) => { r.resume(); r.on('end', () => res({ status: r.statusCode, location: r.headers.location })); }).on('error', rej);
});

test('an https classroom tab, past the certificate warning, is isolated, threaded and aggregated', { timeout: 300_000 }, async () => {
  const state_dir = mkdtempSync(join(tmpdir(), 'canopy-tls-'));
  const server = await startServer([
    '--rounds', '1', '--shards', '1', '--min-clients', '1', '--partition', 'iid', '--max-train', '600',
    '--epochs', '1', '--batch-size', '32', '--lr', '0.05', '--name', 'browser-https',
    '--tls', 'self-signed', '--state-dir', state_dir, '--http-port', '0',
  ], { linger: true });
  const port = new URL(server.url).port;
  const fingerprint = server.log().match(/SHA-256:\s+(\S+)/)[1];
  const httpPort = server.log().match(/Plain http on port (\d+) redirects/)[1];
  const browser = await launch({ webgpu: true, lan: true });
  const logs = [];
  try {
    // The plain-http port sends a student who typed http:// to the https page.
    const r = await plainGet(`http://127.0.0.1:${httpPort}/?name=x`);
    assert.equal(r.status, 307);
    assert.equal(r.location, `https://127.0.0.1:${port}/?name=x`);

    const page = await browser.newPage();
    page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()}`));
    const url = `https://${LAN_HOST}:${port}/?name=student`;
    // What a student sees first: Chromium's warning page for a certificate it does not trust.
    await page.goto(url).catch(() => {});
    const shots = artifactsDir(server.runDir);
    // The warning page replaces the aborted navigation: until it has, the page has no context.
    await waitFor(() => page.$('#details-button').catch(() => null), 15_000, 'the certificate warning');
    await page.screenshot({ path: join(shots, 'https-warning.png') });
    await page.click('#details-button');
    await page.screenshot({ path: join(shots, 'https-warning-advanced.png') });
    await page.click('#proceed-link');
    await waitFor(async () => (await state(page).catch(() => null))?.roundsDone >= 1, 240_000, 'the round in the https tab')
      .catch(async (e) => { throw new Error(`${e.message}: ${JSON.stringify(await state(page).catch(() => null))}\n${logs.join('\n')}\n${server.log().slice(-2000)}`); });
    const s = await state(page);
    assert.deepEqual(s.errors, []);
    const env = await page.evaluate(() => ({ secure: self.isSecureContext, isolated: self.crossOriginIsolated, gpu: 'gpu' in navigator, origin: document.getElementById('origin').textContent }));
    console.log(`https tab after proceeding past the warning: ${JSON.stringify(env)}; ${s.bundle}, ${s.threads} threads (${s.threadsNote}); backend ${s.backend}`);
    assert.equal(env.secure, true, 'a page whose certificate error was bypassed is a secure context');
    assert.equal(env.isolated, true, 'and cross-origin isolated');
    assert.equal(env.gpu, true, 'and sees navigator.gpu');
    assert.match(env.origin, new RegExp(fingerprint.replaceAll(':', '.')), 'the join page shows the certificate fingerprint');
    assert.equal(s.bundle, 'pkg-mt', s.threadsNote);
    if (cpus().length >= 2) assert.ok(s.threads >= 2, `threads: ${s.threads} (${s.threadsNote})`);
    const run = await waitFor(async () => {
      const j = await page.evaluate(async () => (await fetch('/api/metrics')).json());
      return j.rounds?.length ? j : null;
    }, 30_000, 'the round on the server');
    assert.equal(run.rounds[0].results, 1, `the https tab's result was aggregated: ${JSON.stringify(run.rounds)}`);
    await page.screenshot({ path: join(shots, 'https-tab.png') });
    const bytes = await transferred(page, s);
    console.log(`https LAN tab: transferred ${(bytes.total / 1e6).toFixed(3)} MB in all (${bytes.wasm.name.split('/').slice(-2).join('/')} ${(bytes.wasm.transferSize / 1e6).toFixed(3)} MB as sent)`);
    assert.ok(bytes.total <= 2_000_000, `transferred ${bytes.total} bytes`);
  } finally {
    await browser.close();
    server.proc.kill();
  }
});

test('a plain-http LAN tab loads the CPU-only bundle, says why, trains and is aggregated', { timeout: 300_000 }, async () => {
  const server = await startServer([
    '--rounds', '1', '--shards', '1', '--min-clients', '1', '--partition', 'iid', '--max-train', '600',
    '--epochs', '1', '--batch-size', '32', '--lr', '0.05', '--name', 'browser-insecure',
  ], { linger: true });
  const port = new URL(server.url).port;
  const browser = await launch({ webgpu: true, lan: true });
  const logs = [];
  try {
    const page = await browser.newPage();
    page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()}`));
    await page.goto(`http://${LAN_HOST}:${port}/?name=student`);
    await waitFor(async () => (await state(page))?.roundsDone >= 1, 240_000, 'the round in the plain-http tab')
      .catch(async (e) => { throw new Error(`${e.message}: ${JSON.stringify(await state(page))}\n${logs.join('\n')}`); });
    const s = await state(page);
    assert.deepEqual(s.errors, []);
    const env = await page.evaluate(() => ({ secure: self.isSecureContext, isolated: self.crossOriginIsolated, gpu: 'gpu' in navigator }));
    assert.deepEqual(env, { secure: false, isolated: false, gpu: false }, 'plain http off localhost: none of the three');
    assert.equal(s.bundle, 'pkg-cpu', s.threadsNote);
    assert.equal(s.threads, 1);
    assert.match(s.threadsNote, /insecure origin.*no WebGPU, no threads/);
    // The server and its dashboard are told which bundle and why (the Hello's adapter line).
    const m = await waitFor(async () => { const j = await (await fetch(`${server.url}api/metrics`)).json(); return j.rounds?.length ? j : null; }, 30_000, 'the round on the server');
    assert.match(m.clients[0].device.adapter, /bundle pkg-cpu: one thread: insecure origin/);
    assert.equal(m.rounds[0]?.results, 1, `the plain-http tab's result was aggregated: ${JSON.stringify(m.rounds)}`);
    // Only the chosen bundle was downloaded.
    const wasms = s.resources.filter((r) => r.name.endsWith('.wasm')).map((r) => r.name.split('/').slice(-2).join('/'));
    assert.deepEqual(wasms, ['pkg-cpu/canopy_client_bg.wasm']);
    const bytes = await transferred(page, s);
    console.log(`plain-http LAN tab: transferred ${(bytes.total / 1e6).toFixed(3)} MB in all (${wasms[0]} ${(bytes.wasm.transferSize / 1e6).toFixed(3)} MB as sent, gzip); ${s.bundle}: ${s.threadsNote}`);
    assert.ok(bytes.total <= 2_000_000, `transferred ${bytes.total} bytes`);
  } finally {
    await browser.close();
    server.proc.kill();
  }
});
