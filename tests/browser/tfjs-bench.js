// TF.js 4.22 training the same models as Canopy's `bench` (core/src/model/arch.rs presets), for
// `bench.mjs` to compare against the tab in the same browser. A classic script on a page that
// has loaded TF.js's UMD bundles (tf-core, tf-backend-cpu, tf-backend-wasm); bench.mjs serves
// them from node_modules. It defines `window.tfjsBench(backend, model, batch, budgetMs)`.
//
// Layouts are TF.js's own (NHWC, filters [k, k, in, out]); the shapes match Canopy's models:
//   mlp:       784 → dense 200, ReLU → dense 200, ReLU → dense 10
//   cnn:       conv 5×5 1→32 same, ReLU, maxpool 2 → conv 5×5 32→64 same, ReLU, maxpool 2
//              → flatten 7·7·64 → dense 512, ReLU → dense 10
//   cnn-small: the same two convs and pools → global average pool → dense 64 → 10
// Softmax cross-entropy (mean over the batch), plain SGD (lr 0.01), random inputs in [0, 1).
// Layers use tf.fused ops with bias and ReLU, as tf.layers does.
(() => {
  const tf = window.tf;

  // The wasm backend: its .wasm files from this server, SIMD, one thread (no SharedArrayBuffer:
  // the page is not cross-origin isolated, and the flag says so explicitly).
  tf.wasm.setWasmPaths('/tfjs/tfjs-backend-wasm/dist/');
  tf.env().set('WASM_HAS_MULTITHREAD_SUPPORT', false);
  tf.wasm.setThreadsCount(1);

  // TF.js 4.22's wasm backend has no Conv2DBackpropFilter kernel, so training any conv net on it
  // fails ("Kernel 'Conv2DBackpropFilter' not registered for backend 'wasm'"). This one uses the
  // backend's own Conv2D (XNNPACK) for it, stride 1: dW[kh, kw, ci, co] = Σ_b,y,x x[b, y+kh, x+kw, ci]
  // · dy[b, y, x, co] is a convolution of x as [ci, H, W, b] with dy as [H', W', b, co].
  const conv = tf.getKernel('Conv2D', 'wasm').kernelFunc;
  const transpose = tf.getKernel('Transpose', 'wasm').kernelFunc;
  tf.registerKernel({
    kernelName: 'Conv2DBackpropFilter',
    backendName: 'wasm',
    kernelFunc: ({ inputs: { x, dy }, backend, attrs }) => {
      const { strides, pad, dataFormat, dimRoundingMode, filterShape } = attrs;
      const info = tf.backend_util.computeConv2DInfo(x.shape, filterShape, strides, 1, pad, dimRoundingMode, false, 'channelsLast');
      if (info.strideHeight !== 1 || info.strideWidth !== 1 || (dataFormat ?? 'NHWC') !== 'NHWC') throw new Error('only stride 1, NHWC');
      const { top, bottom, left, right } = info.padInfo;
      const xt = transpose({ inputs: { x }, backend, attrs: { perm: [3, 1, 2, 0] } });
      const dyt = transpose({ inputs: { x: dy }, backend, attrs: { perm: [1, 2, 0, 3] } });
      const g = conv({ inputs: { x: xt, filter: dyt }, backend, attrs: { strides: 1, dilations: 1, dataFormat: 'NHWC', pad: [[0, 0], [top, bottom], [left, right], [0, 0]] } });
      const out = transpose({ inputs: { x: g }, backend, attrs: { perm: [1, 2, 0, 3] } });
      for (const t of [xt, dyt, g]) backend.disposeData(t.dataId);
      return out;
    },
  });

  const he = (shape, fanIn) => tf.variable(tf.randomNormal(shape, 0, Math.sqrt(2 / fanIn)));
  const zeros = (n) => tf.variable(tf.zeros([n]));
  function dense(inputs, units) {
    return { w: he([inputs, units], inputs), b: zeros(units) };
  }
  function convLayer(inChannels, filters, kernel) {
    return { w: he([kernel, kernel, inChannels, filters], inChannels * kernel * kernel), b: zeros(filters) };
  }
  const fc = (x, l, relu) => tf.fused.matMul({ a: x, b: l.w, bias: l.b, activation: relu ? 'relu' : 'linear' });
  const convStack = (x, [c1, c2]) => {
    x = tf.maxPool(tf.fused.conv2d({ x, filter: c1.w, bias: c1.b, strides: 1, pad: 'same', activation: 'relu' }), 2, 2, 'valid');
    return tf.maxPool(tf.fused.conv2d({ x, filter: c2.w, bias: c2.b, strides: 1, pad: 'same', activation: 'relu' }), 2, 2, 'valid');
  };

  // Returns the layers and the forward pass from a [B, 28, 28, 1] batch to [B, 10] logits.
  function build(model) {
    if (model === 'mlp') {
      const l = [dense(784, 200), dense(200, 200), dense(200, 10)];
      return { layers: l, forward: (x) => fc(fc(fc(tf.reshape(x, [-1, 784]), l[0], true), l[1], true), l[2], false) };
    }
    const convs = [convLayer(1, 32, 5), convLayer(32, 64, 5)];
    if (model === 'cnn') {
      const head = [dense(7 * 7 * 64, 512), dense(512, 10)];
      return { layers: [...convs, ...head], forward: (x) => fc(fc(tf.reshape(convStack(x, convs), [-1, 7 * 7 * 64]), head[0], true), head[1], false) };
    }
    if (model === 'cnn-small') {
      const head = dense(64, 10);
      return { layers: [...convs, head], forward: (x) => fc(tf.mean(convStack(x, convs), [1, 2]), head, false) };
    }
    throw new Error(`unknown model ${model}`);
  }

  // Trains `model` with batches of `batch` on `backend`: one warm-up step, then steps until
  // `budgetMs` has passed (at least `minSteps`). Returns the figures `client.bench` returns.
  window.tfjsBench = async (backend, model, batch, budgetMs, minSteps = 3) => {
    if (!(await tf.setBackend(backend))) throw new Error(`TF.js backend ${backend} did not start`);
    await tf.ready();
    const { layers, forward } = build(model);
    const vars = layers.flatMap((l) => [l.w, l.b]);
    const params = vars.reduce((n, v) => n + v.size, 0);
    const opt = tf.train.sgd(0.01);
    const batches = [0, 1, 2, 3].map(() => tf.tidy(() => [
      tf.randomUniform([batch, 28, 28, 1]),
      tf.oneHot(tf.tensor1d(Array.from({ length: batch }, (_, i) => i % 10), 'int32'), 10),
    ]));
    const step = (i) => {
      const [x, y] = batches[i % batches.length];
      const loss = opt.minimize(() => tf.losses.softmaxCrossEntropy(y, forward(x)), true, vars);
      loss.dataSync();
      loss.dispose();
    };
    step(0);
    const t0 = performance.now();
    let steps = 0;
    while (steps < minSteps || performance.now() - t0 < budgetMs) step(++steps);
    const ms = performance.now() - t0;
    const info = {
      samples_per_sec: (steps * batch * 1000) / ms, step_ms: ms / steps, steps, params,
      backend: tf.getBackend(), tensors: tf.memory().numTensors,
      simd: backend === 'wasm' ? await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT') : undefined,
      threads: backend === 'wasm' ? tf.wasm.getThreadsCount() : undefined,
    };
    opt.dispose();
    tf.dispose([vars, batches]);
    return info;
  };
})();
