// The classroom guide's screenshots (docs/src/images/classroom-*.png), taken from a real run:
// the server started as `just classroom` starts it (every interface, held, https with a
// self-signed certificate), the dashboard with its QR code while the class joins, a student's
// join page at phone size, then the same student's tab training once the teacher pressed Start,
// and the dashboard a few rounds in (dashboard.png, the README's picture).
// Run after `just setup` and a build: node scripts/screenshots.mjs [OUT_DIR]. The title's emoji
// needs a colour emoji font (Debian's fonts-noto-color-emoji), which the tests do not.
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { startServer, waitFor, root } from '../tests/browser/harness.mjs';

const out = process.argv[2] || join(root, 'docs', 'src', 'images');
const state = mkdtempSync(join(tmpdir(), 'canopy-shots-'));
const server = await startServer(
  ['--config', 'configs/demo.toml', '--bind', '0.0.0.0', '--hold', '--tls', 'self-signed', '--state-dir', state, '--rounds', '30'],
  { linger: true },
);
const token = server.log().match(/Admin token:\s+(\S+)/)[1];
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'],
});
try {
  // The certificate is the classroom's self-signed one: a student clicks through the warning
  // once (the guide shows that page); here the context accepts it.
  const desk = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 860 } });
  const phone = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 390, height: 760 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
  const dashboard = await desk.newPage();
  await dashboard.goto(`${server.url}dashboard#token=${token}`);
  await waitFor(() => dashboard.evaluate(() => document.getElementById('qr')?.complete && document.getElementById('qr').naturalWidth > 0), 20_000, 'the QR code');

  const student = await phone.newPage();
  await student.goto(server.url);
  await waitFor(() => student.evaluate(() => !document.getElementById('joinForm').hidden), 20_000, 'the nickname question');
  await student.fill('#nick', 'Ada');
  await student.screenshot({ path: join(out, 'classroom-join.png') });
  await student.press('#nick', 'Enter');
  // Two more students, on desktop tabs, so the dashboard lists a class.
  for (const name of ['Grace', 'Alan']) await (await desk.newPage()).goto(`${server.url}?name=${name}`);
  await waitFor(() => dashboard.evaluate(() => document.querySelectorAll('#clients tr').length >= 3), 60_000, 'three students on the dashboard');
  await dashboard.bringToFront();
  await dashboard.screenshot({ path: join(out, 'classroom-dashboard.png') });

  await dashboard.click('#btnStart');
  await waitFor(() => student.evaluate(() => Number(document.getElementById('done').textContent) >= 2), 240_000, 'two rounds in the student tab');
  await student.screenshot({ path: join(out, 'classroom-tab.png') });
  // The README's picture: the dashboard a few rounds in, charts and all.
  await waitFor(() => dashboard.evaluate(() => parseInt(document.getElementById('round').textContent, 10) >= 6), 300_000, 'six rounds on the dashboard');
  await dashboard.bringToFront();
  await dashboard.evaluate(() => window.scrollTo(0, 0));
  await dashboard.screenshot({ path: join(out, 'dashboard.png') });
  console.log(`screenshots in ${out}`);
} finally {
  await browser.close();
  server.proc.kill();
}
