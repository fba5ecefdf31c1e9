// The bundle choice (web/bundle.js) over the whole table of what a tab can have: a secure or
// insecure origin, cross-origin isolation, a hardware, software or no WebGPU adapter, one or many
// cores, and what the query forces. No browser: the function is pure.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chooseBundle, MAX_THREADS } from '../../web/bundle.js';

const q = (s = '') => new URLSearchParams(s);
const HW = { software: false };
const SW = { software: true };
const lan = { secure: false, isolated: false, cores: 4, gpu: null };
const https = { secure: true, isolated: true, cores: 4, gpu: SW };

test('what the tab has picks the bundle', () => {
  const rows = [
    // [env, query, bundle, threads]
    [lan, '', 'pkg-cpu', 1], // plain-http LAN: no WebGPU, no threads
    [{ ...lan, gpu: HW }, '', 'pkg', 1], // (a browser that offers WebGPU anyway)
    [https, '', 'pkg-mt', 4], // https or localhost, SwiftShader only: threads
    [{ ...https, gpu: null }, '', 'pkg-mt', 4],
    [{ ...https, gpu: HW }, '', 'pkg', 1], // a real GPU: the WebGPU build, timed against its CPU
    [{ ...https, gpu: HW }, 'backend=cpu', 'pkg-mt', 4],
    [{ ...https, cores: 1 }, '', 'pkg-cpu', 1],
    [{ ...https, cores: 64 }, '', 'pkg-mt', MAX_THREADS],
    [{ secure: true, isolated: false, cores: 4, gpu: null }, '', 'pkg-cpu', 1], // https without COOP/COEP
  ];
  for (const [env, query, bundle, threads] of rows) {
    const got = chooseBundle(env, q(query));
    assert.deepEqual([got.bundle, got.threads], [bundle, threads], `${JSON.stringify(env)} ?${query}: ${got.note}`);
    assert.ok(got.note.length > 0);
  }
});

test('the query forces a choice, within what the page allows', () => {
  assert.equal(chooseBundle(https, q('threads=1')).bundle, 'pkg-cpu');
  assert.deepEqual(chooseBundle(https, q('threads=3')), { bundle: 'pkg-mt', threads: 3, note: '3 threads (?threads=3)' });
  assert.equal(chooseBundle(https, q('backend=webgpu')).bundle, 'pkg');
  assert.equal(chooseBundle(https, q('time=all')).bundle, 'pkg');
  for (const b of ['pkg', 'pkg-cpu']) assert.equal(chooseBundle(https, q(`bundle=${b}`)).bundle, b);
  assert.deepEqual([chooseBundle(https, q('bundle=pkg-mt&threads=1')).bundle, chooseBundle(https, q('bundle=pkg-mt&threads=1')).threads], ['pkg-mt', 1]);
  // Threads cannot be had without isolation, whatever is asked.
  assert.equal(chooseBundle(lan, q('threads=4')).bundle, 'pkg-cpu');
  assert.equal(chooseBundle(lan, q('bundle=pkg-mt')).bundle, 'pkg-cpu');
});

test('the note says why a tab is on the slow path', () => {
  assert.match(chooseBundle(lan, q()).note, /insecure origin.*no WebGPU, no threads/);
  assert.match(chooseBundle({ secure: true, isolated: false, cores: 4, gpu: null }, q()).note, /not cross-origin isolated/);
  assert.match(chooseBundle({ ...https, cores: 1 }, q()).note, /one core/);
  assert.match(chooseBundle({ ...https, gpu: HW }, q()).note, /hardware WebGPU adapter/);
});
