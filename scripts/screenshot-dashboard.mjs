// A screenshot of the live dashboard during a real run, for the book (docs/src/images/dashboard.png):
// the demo config (MNIST digits, 10 shards, FedAvg on the MLP) for 20 rounds, three headless tabs,
// the dashboard shot at 1280×900 (the whole page) once 6 rounds are on it, while the run goes on.
// Run: node scripts/screenshot-dashboard.mjs [out.png]
import { mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, launch, openTab, waitFor, root } from '../tests/browser/harness.mjs';

const out = process.argv[2] || join(root, 'docs/src/images/dashboard.png');
const ROUNDS = 6;

const server = await startServer(['--config', 'configs/demo.toml', '--rounds', '20'], { linger: true });
const browser = await launch({ webgpu: false });
const logs = [];
try {
  for (const name of ['Ada', 'Grace', 'Alan']) await openTab(browser, `${server.url}?name=${name}`, logs);
  const dash = await openTab(browser, `${server.url}dashboard`, logs);
  await dash.setViewportSize({ width: 1280, height: 900 });
  await waitFor(() => dash.evaluate((n) => (window.canopyCharts?.accChart?.data[0].length ?? 0) >= n, ROUNDS), 600_000, `${ROUNDS} rounds on the dashboard`);
  mkdirSync(join(out, '..'), { recursive: true });
  await dash.screenshot({ path: out, fullPage: true });
  const errors = logs.filter((l) => l.startsWith('[pageerror]'));
  if (errors.length) throw new Error(errors.join('\n'));
  console.log(`${out}: ${(statSync(out).size / 1024).toFixed(0)} KiB`);
} finally {
  await browser.close();
  server.proc.kill();
}
