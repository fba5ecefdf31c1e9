// Shared helpers for the headless-browser tests: start the real server, open Chromium tabs.
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

export const root = resolve(import.meta.dirname, '..', '..');
const targetDir = process.env.CARGO_TARGET_DIR || join(process.env.HOME, '.cache/canopy/target');
export const canopyBin = join(targetDir, 'debug', 'canopy');

// Starts `canopy serve` on a free port (or `port`); resolves once it prints its URL. With
// `linger` the server keeps serving after the last round (the test kills it). `outDir` reuses a
// run folder (to restart a server with --resume).
export async function startServer(args, { linger = false, port = 0, outDir = mkdtempSync(join(tmpdir(), 'canopy-browser-')) } = {}) {
  const base = ['serve', '--port', String(port), ...(linger ? [] : ['--exit-when-done']), '--out-dir', outDir, '--web-dir', join(root, 'web')];
  const proc = spawn(canopyBin, [...base, ...args], {
    cwd: root, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'info,tower_http=warn', NO_COLOR: '1' },
  });
  let log = '';
  const exited = new Promise((res) => proc.on('exit', (code) => res(code)));
  const url = await new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`server did not start:\n${log}`)), 60_000);
    const onData = (d) => {
      log += d;
      const m = log.match(/Join as a client:\s+(https?:\/\/\S+)[\s\S]*Metrics:\s+\S+\n/);
      if (m) { clearTimeout(timer); res(m[1]); }
    };
    proc.stdout.on('data', onData);
    proc.stderr.on('data', (d) => { log += d; });
    proc.on('exit', (code) => rej(new Error(`server exited with ${code}:\n${log}`)));
  });
  const runDir = log.match(/Metrics:\s+(\S+)/)[1];
  return { proc, url, runDir, outDir, exited, log: () => log, metrics: () => JSON.parse(readFileSync(join(runDir, 'metrics.json'), 'utf8')) };
}

const BASE_ARGS = ['--headless', '--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'];

// WebGPU in headless Chromium without a GPU runs on SwiftShader and needs this flag.
// `lan`: classroom.test resolves to 127.0.0.1, a LAN-like name (not localhost, so not a secure
// context over plain http) whose traffic never leaves this machine.
export const LAN_HOST = 'classroom.test';
export async function launch({ webgpu, lan = false }) {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: [...BASE_ARGS, ...(webgpu ? ['--enable-unsafe-webgpu'] : []), ...(lan ? [`--host-resolver-rules=MAP ${LAN_HOST} 127.0.0.1`] : [])],
  });
}

// Bytes over the wire for a tab's page and its worker (headers included), from the browser's
// own resource timing; `s` is the tab's state (the worker's resources). Also the wasm entry.
export async function transferred(page, s) {
  const own = await page.evaluate(() => performance.getEntriesByType('resource').concat(performance.getEntriesByType('navigation')).map((r) => ({ name: r.name, transferSize: r.transferSize })));
  const all = [...own, ...s.resources];
  return { total: all.reduce((n, r) => n + r.transferSize, 0), wasm: s.resources.find((r) => r.name.endsWith('.wasm')), all };
}

export async function openTab(browser, url, log) {
  const page = await browser.newPage();
  page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  await page.goto(url);
  return page;
}

export const state = (page) => page.evaluate(() => window.canopy && JSON.parse(JSON.stringify(window.canopy.state)));

export function artifactsDir(runDir) {
  const dir = join(runDir, 'screenshots');
  mkdirSync(dir, { recursive: true });
  return dir;
}

export async function waitFor(fn, timeoutMs, what) {
  const t0 = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

// Starts a server with `serverArgs`, opens one tab per entry of `tabs` ({ name, webgpu, query? }), waits
// for the run to end, screenshots every tab into the run folder, and checks the server exited 0.
// Returns the pages (still open: call `close()` when done), their states and the run's metrics.
export async function runWithTabs(serverArgs, tabs, shotPrefix) {
  const server = await startServer(serverArgs);
  const browsers = {};
  const logs = [];
  const close = async () => {
    await Promise.all(Object.values(browsers).map((b) => b.close()));
    server.proc.kill();
  };
  try {
    const pages = [];
    for (const t of tabs) {
      browsers[t.webgpu] ??= await launch({ webgpu: t.webgpu });
      // A WebGPU tab is forced onto WebGPU: left to choose, it would time SwiftShader against
      // its CPU backend and train on the CPU (tab.test.mjs checks that choice).
      // `query` adds to the page's query (`threads=1`: the CPU-only single-threaded bundle).
      pages.push(await openTab(browsers[t.webgpu], `${server.url}?name=${t.name}${t.webgpu ? '&backend=webgpu' : ''}${t.query ? `&${t.query}` : ''}`, logs));
    }
    let timer;
    const code = await Promise.race([server.exited, new Promise((r) => { timer = setTimeout(() => r('timeout'), 540_000); })]);
    clearTimeout(timer);
    // A tab's page mirrors its worker's state by message, so the Bye the server sent before
    // exiting may show a moment after the exit: give each tab a few seconds to report it (a tab
    // that never sees it still fails the test's own check).
    if (code === 0) await Promise.all(pages.map((p) => waitFor(async () => (await state(p))?.finished, 5000, 'the tab to see the Bye').catch(() => {})));
    const states = await Promise.all(pages.map(state));
    const shots = artifactsDir(server.runDir);
    await Promise.all(pages.map((p, i) => p.screenshot({ path: join(shots, `${shotPrefix}-tab-${i}.png`) })));
    if (code !== 0) throw new Error(`server did not finish the run (${code})\n${server.log().slice(-3000)}\n${logs.join('\n')}`);
    return { server, pages, states, metrics: server.metrics(), close };
  } catch (e) {
    await close();
    throw e;
  }
}
