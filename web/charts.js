// The dashboard's time series (one point per finished round) drawn with uPlot, which
// scripts/setup.sh copies from node_modules into web/vendor and dashboard.html loads as a classic
// script (window.uPlot). Each chart is made once and fed with setData; it is made again only when
// its set of lines changes (a strategy figure showing up). Drag on the plot zooms the rounds,
// a double click shows them all again; the legend shows the values under the cursor, and the
// latest round's when the cursor is elsewhere.

// Plain values for uPlot: a missing figure (undefined, NaN) is a gap (null), and so is a value a
// log scale cannot place (zero or below).
export function column(values, log = false) {
  return values.map((v) => (v == null || !Number.isFinite(v) || (log && v <= 0) ? null : v));
}

// The last value of a column that is not a gap.
export function lastValue(col) {
  for (let i = col.length - 1; i >= 0; i--) if (col[i] != null) return col[i];
  return null;
}

// Whether the x scale shows less than all of the rounds (the user dragged to zoom in).
export function zoomedIn(scale, xs) {
  if (!xs.length || scale?.min == null || scale?.max == null) return false;
  return scale.min > xs[0] + 1e-9 || scale.max < xs[xs.length - 1] - 1e-9;
}

// What identifies a chart's lines: a different set means making the chart again.
export const signature = (series) => series.map((s) => `${s.label}|${s.scale}`).join(',');

const INK = '#1d2a1f', MUTED = '#6b7a6d', GRID = '#e5ebe4';
const FONT = '11px system-ui, sans-serif';
const HEIGHT = 220;

// The x axis (rounds), and one axis per scale that some line uses: `y` on the left with the
// grid, `r` on the right.
function axesFor(scales, used) {
  const x = {
    stroke: MUTED, font: FONT, grid: { stroke: GRID, width: 1 }, ticks: { stroke: GRID, width: 1 },
    // Whole rounds only.
    incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
    values: (u, splits) => splits.map((v) => (Number.isInteger(v) ? String(v) : '')),
  };
  return [x, ...Object.entries(scales).filter(([key]) => used.has(key)).map(([key, s]) => ({
    scale: key, side: key === 'y' ? 3 : 1, stroke: MUTED, font: FONT, size: 56,
    grid: { show: key === 'y', stroke: GRID, width: 1 }, ticks: { stroke: GRID, width: 1 },
    values: (u, splits) => splits.map((v) => (v == null ? '' : s.axis(v))),
  }))];
}

function scaleOpts(scales) {
  const out = { x: { time: false } };
  for (const [key, s] of Object.entries(scales)) {
    // Base 2 for bytes: ticks at 256 KiB, 512 KiB, 1 MiB…
    out[key] = s.log ? { distr: 3, log: 2 } : { auto: true, ...(s.range ? { range: s.range } : {}) };
  }
  return out;
}

// A line chart in `el` (an empty div): spec = { id, scales: {y|r: {log, range, axis(v), fmt(v)}} };
// update(xs, series) with series = [{label, color, values, scale, dash, fmt?}] (fmt: the legend's
// number format when not the scale's).
export function timeChart(el, spec) {
  const uPlot = window.uPlot;
  // zoomed: the user dragged to fewer rounds than there are; the x scale then keeps its range
  // when rounds arrive (uPlot asks its `auto`), and setData still redraws and moves the legend.
  let plot = null, sig = '', last = '', width = 0, zoomed = false;
  const widthNow = () => Math.max(200, Math.floor(el.clientWidth || 600));

  function make(xs, series) {
    plot?.destroy();
    width = widthNow();
    const opts = {
      width, height: HEIGHT,
      legend: { live: true },
      cursor: { drag: { x: true, y: false, setScale: true }, points: { size: 7 } },
      scales: { ...scaleOpts(spec.scales), x: { time: false, auto: () => !zoomed } },
      axes: axesFor(spec.scales, new Set(series.map((s) => s.scale))),
      series: [
        { label: 'round', value: (u, v, si, di) => (di == null ? (u.data[0].length ? `${lastValue(u.data[0])} (latest)` : '–') : v) },
        ...series.map((s) => {
          const sc = spec.scales[s.scale];
          return {
            label: s.label, scale: s.scale, stroke: s.color, width: 2, dash: s.dash, spanGaps: false,
            points: { size: 5, fill: s.color, stroke: s.color },
            // The latest round's value when the cursor is not on the plot.
            value: (u, v, si, di) => { const x = di == null ? lastValue(u.data[si]) : v; return x == null ? '–' : (s.fmt || sc.fmt)(x); },
          };
        }),
      ],
    };
    zoomed = false;
    plot = new uPlot(opts, dataOf(xs, series), el);
    sig = signature(series);
  }

  function dataOf(xs, series) {
    return [xs, ...series.map((s) => column(s.values, spec.scales[s.scale].log))];
  }

  function update(xs, series) {
    const data = dataOf(xs, series);
    const key = JSON.stringify(data);
    el.classList.toggle('empty', !xs.length);
    if (plot && signature(series) === sig) {
      if (key === last) return;
      // Keep the user's zoom while new rounds arrive; otherwise fit every round.
      zoomed = zoomedIn(plot.scales.x, plot.data[0]);
      plot.setData(data);
    } else {
      make(xs, series);
    }
    last = key;
  }

  // The chart follows its card's width.
  new ResizeObserver(() => {
    const w = widthNow();
    if (plot && w !== width) { width = w; plot.setSize({ width: w, height: HEIGHT }); }
  }).observe(el);

  return { update, get plot() { return plot; } };
}

// In the chart's place when web/vendor holds no uPlot (setup did not run).
export function missingLibrary(el) {
  el.classList.add('chartmissing');
  el.innerHTML = 'Chart library missing (web/vendor/uPlot.iife.min.js): run <code>just setup</code>.';
}
