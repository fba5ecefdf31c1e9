// "Try the model": a pad to draw a digit on, the conversion to the model's 28×28 input, and the
// class probabilities as bars. Shared by the client page and the dashboard.

// A black canvas to draw on in white with a mouse, pen or finger. `onStroke` runs after each
// stroke, so a prediction can follow every change.
export function drawPad(canvas, onStroke) {
  const g = canvas.getContext('2d', { willReadFrequently: true });
  let drawing = false, last = null, ink = false;
  const clear = () => { g.fillStyle = '#000'; g.fillRect(0, 0, canvas.width, canvas.height); ink = false; };
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  const line = (a, b) => {
    // A stroke about as thick, relative to the digit, as MNIST's pen.
    g.strokeStyle = '#fff'; g.lineWidth = canvas.width / 13; g.lineCap = 'round'; g.lineJoin = 'round';
    g.beginPath(); g.moveTo(...a); g.lineTo(...b); g.stroke();
    ink = true;
  };
  canvas.style.touchAction = 'none'; // a finger draws instead of scrolling the page
  canvas.addEventListener('pointerdown', (e) => {
    drawing = true; last = at(e); line(last, last);
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener('pointermove', (e) => {
    if (!drawing) return;
    const p = at(e); line(last, p); last = p;
  });
  const end = () => { if (drawing) { drawing = false; onStroke?.(); } };
  canvas.addEventListener('pointerup', end);
  canvas.addEventListener('pointercancel', end);
  clear();
  return { clear, hasInk: () => ink };
}

// The drawing as the model sees it: 784 values in [0, 1], white digit on black, scaled so its
// longer side is 20 pixels and shifted so its centre of mass sits at the centre of the 28×28
// frame (how MNIST was prepared). Null when nothing is drawn.
export function toMnist(canvas) {
  const { width: w, height: h } = canvas;
  const px = canvas.getContext('2d', { willReadFrequently: true }).getImageData(0, 0, w, h).data;
  let x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    if (px[4 * (y * w + x)] > 25) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  }
  if (x1 < 0) return null;
  const bw = x1 - x0 + 1, bh = y1 - y0 + 1;
  const s = 20 / Math.max(bw, bh);
  // Area average: each source pixel adds its share to the target pixel it falls in.
  const box = new Float32Array(28 * 28);
  const ox = (28 - bw * s) / 2, oy = (28 - bh * s) / 2;
  for (let y = y0; y <= y1; y++) for (let x = x0; x <= x1; x++) {
    const v = px[4 * (y * w + x)] / 255;
    if (!v) continue;
    const tx = Math.min(27, Math.floor((x - x0) * s + ox)), ty = Math.min(27, Math.floor((y - y0) * s + oy));
    box[ty * 28 + tx] += v * s * s;
  }
  let m = 0, cx = 0, cy = 0;
  for (let i = 0; i < 784; i++) { const v = Math.min(1, box[i]); box[i] = v; m += v; cx += v * (i % 28); cy += v * Math.floor(i / 28); }
  const dx = Math.round(13.5 - cx / m), dy = Math.round(13.5 - cy / m);
  const out = new Float32Array(784);
  for (let y = 0; y < 28; y++) for (let x = 0; x < 28; x++) {
    const sx = x - dx, sy = y - dy;
    if (sx >= 0 && sx < 28 && sy >= 0 && sy < 28) out[y * 28 + x] = box[sy * 28 + sx];
  }
  return out;
}

// Shows a 28×28 input on a small canvas (what the model sees).
export function showInput(canvas, pixels) {
  const g = canvas.getContext('2d');
  const img = g.createImageData(28, 28);
  pixels.forEach((v, i) => { const c = Math.round(v * 255); img.data.set([c, c, c, 255], 4 * i); });
  g.putImageData(img, 0, 0);
}

// Ten bars, one per class; the most likely one highlighted. Returns the predicted class.
export function showProbs(el, probs) {
  const best = probs.indexOf(Math.max(...probs));
  el.innerHTML = Array.from(probs, (p, d) =>
    `<div class="prob${d === best ? ' best' : ''}"><span>${d}</span><i style="width:${(100 * p).toFixed(1)}%"></i><b>${(100 * p).toFixed(1)} %</b></div>`,
  ).join('');
  return best;
}
