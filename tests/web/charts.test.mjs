// The dashboard's chart helpers (web/charts.js) that need no browser: gaps, the latest value,
// and when the user has zoomed in (new rounds then keep the zoom).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { column, lastValue, zoomedIn, signature } from '../../web/charts.js';

test('missing figures are gaps, and so are values a log scale cannot place', () => {
  assert.deepEqual(column([1, undefined, NaN, null, 0, -2, 3]), [1, null, null, null, 0, -2, 3]);
  assert.deepEqual(column([1, undefined, NaN, 0, -2, 3], true), [1, null, null, null, null, 3]);
});

test('the latest value skips gaps', () => {
  assert.equal(lastValue([1, 2, null]), 2);
  assert.equal(lastValue([null, null]), null);
  assert.equal(lastValue([]), null);
});

test('zoomed in means fewer rounds shown than there are', () => {
  const xs = [1, 2, 3, 4, 5];
  assert.equal(zoomedIn({ min: 1, max: 5 }, xs), false);
  assert.equal(zoomedIn({ min: 2, max: 5 }, xs), true);
  assert.equal(zoomedIn({ min: 1, max: 4.5 }, xs), true);
  assert.equal(zoomedIn({ min: null, max: null }, xs), false);
  assert.equal(zoomedIn({ min: 1, max: 1 }, []), false);
});

test('a chart is made again only when its lines change', () => {
  const a = [{ label: 'up', scale: 'y' }, { label: 'in all', scale: 'r' }];
  assert.equal(signature(a), signature(a.map((s) => ({ ...s, values: [1] }))));
  assert.notEqual(signature(a), signature([...a, { label: 'activations up', scale: 'y' }]));
});
