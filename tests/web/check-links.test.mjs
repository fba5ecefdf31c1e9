// The book's link check (scripts/check-links.mjs) on a small site made here: it passes good
// links and names each broken file, anchor and Markdown heading link.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const script = resolve(import.meta.dirname, '..', '..', 'scripts', 'check-links.mjs');
const run = (...args) => spawnSync(process.execPath, [script, ...args], { encoding: 'utf8' });

function site(pages) {
  const dir = mkdtempSync(join(tmpdir(), 'canopy-links-'));
  for (const [path, text] of Object.entries(pages)) {
    mkdirSync(join(dir, path, '..'), { recursive: true });
    writeFileSync(join(dir, path), text);
  }
  return dir;
}

test('good links pass', () => {
  const dir = site({
    'book/index.html': '<a href="a/b.html#x">b</a> <a href="a/">a</a> <a href="https://example.org/">out</a> <img src="i.png"> <a href="#top">top</a><h1 id="top">t</h1>',
    'book/a/b.html': '<h2 id="x">x</h2>',
    'book/a/index.html': '',
    'book/i.png': '',
    'README.md': '# Title\n\n[book](book/index.html) and [here](#a-heading-with-code)\n\n## A heading, with `code`\n\n```\n[not a link](nowhere.md)\n```\n',
  });
  const r = run(join(dir, 'book'), join(dir, 'README.md'));
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /none broken/);
});

test('a missing file, a missing anchor and a missing heading fail, each named', () => {
  const dir = site({
    'book/index.html': '<a href="gone.html">x</a> <a href="b.html#nope">y</a> <img src="images/shot.png">',
    'book/b.html': '<h2 id="yes">y</h2>',
    'README.md': '[x](#no-such-heading) [y](docs/missing.md)\n\n# Only heading\n',
  });
  const r = run(join(dir, 'book'), join(dir, 'README.md'));
  assert.equal(r.status, 1);
  assert.match(r.stderr, /5 broken link/);
  assert.match(r.stderr, /index\.html: gone\.html \(no such file\)/);
  assert.match(r.stderr, /index\.html: b\.html#nope \(no #nope on /);
  assert.match(r.stderr, /images\/shot\.png \(no such file\)/);
  assert.match(r.stderr, /README\.md: #no-such-heading \(no #no-such-heading on /);
  assert.match(r.stderr, /README\.md: docs\/missing\.md \(no such file\)/);
});

test('a book that was not built is an error that says so', () => {
  const r = run(join(tmpdir(), 'canopy-no-such-book'));
  assert.equal(r.status, 1);
  assert.match(r.stderr, /does not exist \(run `mdbook build docs` first\)/);
});
