// Bring your own data: in a run with `dataset = "tab"` the server names the classes and the
// model, never the data. This page labels examples from the camera or from image files, turns
// each into the model's input (centre crop, grayscale, 28×28 bytes, as the built-in datasets),
// keeps them in IndexedDB (the small preprocessed image and its label, never the photo) and
// hands them to the training worker, which trains on them and tells the server how many it has
// per class. Nothing else about them leaves the tab. Every fifth example of a class is held out
// to measure this tab's own accuracy.
const SIDE = 28;
const PIXELS = SIDE * SIDE;
const HOLD_OUT_EVERY = 5;
const CAPTURE_MS = 120;
const DB = 'canopy-byo';

// --- preprocessing ---------------------------------------------------------------------------

// The centre square of `source` (a video, image or bitmap of `w`×`h`), grayscale, 28×28 bytes.
export function toInput(source, w, h) {
  const canvas = new OffscreenCanvas(SIDE, SIDE);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  const side = Math.min(w, h);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(source, (w - side) / 2, (h - side) / 2, side, side, 0, 0, SIDE, SIDE);
  const rgba = ctx.getImageData(0, 0, SIDE, SIDE).data;
  const out = new Uint8Array(PIXELS);
  for (let i = 0; i < PIXELS; i++) {
    out[i] = Math.round(0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2]);
  }
  return out;
}

// --- storage -----------------------------------------------------------------------------------

const req = (r) => new Promise((res, rej) => { r.onsuccess = () => res(r.result); r.onerror = () => rej(r.error); });
function openDb() {
  const r = indexedDB.open(DB, 1);
  r.onupgradeneeded = () => {
    const store = r.result.createObjectStore('examples', { keyPath: 'id', autoIncrement: true });
    store.createIndex('set', 'set');
  };
  return req(r);
}

// The examples of one list of classes (another run's classes are another set).
class Store {
  constructor(db, classes) { this.db = db; this.set = classes.join('\u0001'); }
  tx(mode) { return this.db.transaction('examples', mode).objectStore('examples'); }
  all() { return req(this.tx('readonly').index('set').getAll(this.set)); }
  add(examples) {
    const store = this.tx('readwrite');
    return Promise.all(examples.map((e) => req(store.add({ set: this.set, ...e }))));
  }
  async clear(label) {
    const store = this.tx('readwrite');
    const keys = (await req(store.index('set').getAll(this.set))).filter((e) => e.label === label).map((e) => e.id);
    await Promise.all(keys.map((k) => req(store.delete(k))));
  }
}

// --- the panel ---------------------------------------------------------------------------------

// `client`: the worker's methods (set_examples, try_model, model_round); `classes`: the run's
// class names; `log`: the page's log line; `mount`: the element to fill.
export async function startByo({ client, classes, log, mount }) {
  const store = new Store(await openDb(), classes);
  let examples = await store.all();
  const pub = { classes, counts: [], heldOut: [], stored: 0, lastSync: null, errors: [] };
  window.canopy.byo = pub;

  mount.hidden = false;
  mount.querySelector('#byoClasses').innerHTML = classes.map((c, i) => `
    <div class="byo-class">
      <b>${escapeHtml(c)}</b> <span id="byoCount-${i}">0</span>
      <button type="button" id="byoCam-${i}" class="byo-cam" disabled title="hold to capture several">hold: add from camera</button>
      <label class="byo-files">add files <input type="file" id="byoFiles-${i}" accept="image/*" multiple></label>
      <button type="button" id="byoClear-${i}">clear</button>
    </div>`).join('');

  // What the worker trains on, and the counts it sends the server, from what is stored.
  async function sync() {
    const train = examples.filter((e) => !e.heldOut), test = examples.filter((e) => e.heldOut);
    const pack = (list) => {
      const px = new Uint8Array(list.length * PIXELS);
      list.forEach((e, i) => px.set(e.pixels, i * PIXELS));
      return [px, Uint8Array.from(list, (e) => e.label)];
    };
    pub.counts = classes.map((_, c) => train.filter((e) => e.label === c).length);
    pub.heldOut = classes.map((_, c) => test.filter((e) => e.label === c).length);
    pub.stored = examples.length;
    classes.forEach((_, c) => { mount.querySelector(`#byoCount-${c}`).textContent = `${pub.counts[c] + pub.heldOut[c]} (${pub.heldOut[c]} held out)`; });
    mount.querySelector('#byoTotal').textContent = examples.length
      ? `${examples.length} examples in this tab, stored in this browser only`
      : 'No examples yet: this tab has nothing to train on, so the server does not pick it.';
    try {
      await client.set_examples(...pack(train), ...pack(test));
      pub.lastSync = Date.now();
    } catch (e) {
      pub.errors.push(String(e));
      log(`could not hand the examples to the trainer: ${e.message ?? e}`);
    }
  }

  async function add(label, pixelsList) {
    const have = examples.filter((e) => e.label === label).length;
    const fresh = pixelsList.map((pixels, k) => ({ label, pixels, heldOut: (have + k) % HOLD_OUT_EVERY === HOLD_OUT_EVERY - 1, added: Date.now() }));
    const ids = await store.add(fresh);
    fresh.forEach((e, k) => { e.id = ids[k]; });
    examples = examples.concat(fresh);
    await sync();
  }

  // Files: each image decoded here, reduced to its 28×28 input; the file itself is not kept.
  classes.forEach((c, i) => {
    const input = mount.querySelector(`#byoFiles-${i}`);
    input.onchange = async () => {
      const list = [];
      for (const f of input.files) {
        try {
          const bmp = await createImageBitmap(f);
          list.push(toInput(bmp, bmp.width, bmp.height));
          bmp.close();
        } catch (e) {
          log(`${f.name}: not an image this browser can read (${e.message})`);
        }
      }
      input.value = '';
      if (list.length) { await add(i, list); log(`added ${list.length} file${list.length > 1 ? 's' : ''} as "${c}"`); }
    };
    mount.querySelector(`#byoClear-${i}`).onclick = async () => {
      await store.clear(i);
      examples = examples.filter((e) => e.label !== i);
      await sync();
      log(`cleared the examples of "${c}"`);
    };
  });

  // The camera: holding a class's button captures a frame every CAPTURE_MS.
  const video = mount.querySelector('#byoVideo');
  const frame = () => (video.videoWidth ? toInput(video, video.videoWidth, video.videoHeight) : null);
  mount.querySelector('#byoCamera').onclick = async () => {
    try {
      video.srcObject = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 }, audio: false });
      await video.play();
      pub.camera = true;
      classes.forEach((_, i) => { mount.querySelector(`#byoCam-${i}`).disabled = false; });
      mount.querySelector('#byoTry').disabled = false;
      log('camera on: its pictures stay in this tab');
    } catch (e) {
      pub.errors.push(String(e));
      log(`no camera: ${e.message} (add image files instead)`);
    }
  };
  classes.forEach((c, i) => {
    const b = mount.querySelector(`#byoCam-${i}`);
    let timer = null, held = [];
    const stop = async () => {
      if (timer === null) return;
      clearInterval(timer); timer = null;
      const got = held; held = [];
      if (got.length) { await add(i, got); log(`captured ${got.length} frame${got.length > 1 ? 's' : ''} as "${c}"`); }
    };
    b.onpointerdown = () => {
      if (timer !== null) return;
      const grab = () => { const px = frame(); if (px) held.push(px); };
      grab();
      timer = setInterval(grab, CAPTURE_MS);
    };
    b.onpointerup = stop;
    b.onpointerleave = stop;
  });

  // "Try it": the global model this tab last received, on the live camera, per class.
  let trying = null;
  const probsEl = mount.querySelector('#byoProbs');
  mount.querySelector('#byoTry').onclick = (ev) => {
    if (trying) { clearInterval(trying); trying = null; ev.target.textContent = 'try it on the camera'; return; }
    ev.target.textContent = 'stop';
    let busy = false;
    trying = setInterval(async () => {
      const px = frame();
      if (!px || busy) return;
      busy = true;
      try {
        const probs = Array.from(await client.try_model(Float32Array.from(px, (v) => v / 255)));
        const best = probs.indexOf(Math.max(...probs));
        probsEl.innerHTML = probs.map((p, k) => `<div class="prob${k === best ? ' best' : ''}"><span>${escapeHtml(classes[k])}</span><i style="width:${(100 * p).toFixed(1)}%"></i><b>${(100 * p).toFixed(1)} %</b></div>`).join('');
        pub.lastTry = { probs, best, round: await client.model_round() };
      } catch (e) {
        probsEl.textContent = e.message ?? String(e);
      } finally {
        busy = false;
      }
    }, 300);
  };

  await sync();
  if (examples.length) log(`${examples.length} examples kept in this browser from before`);
  return pub;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}
