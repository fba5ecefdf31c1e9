// Which of the three builds of the client a tab loads, from what the tab really has; the worker
// (web/worker.js) downloads only the one chosen. Pure, so tests/web/bundle.test.mjs can check the
// whole table.
//   pkg      single-threaded, with WebGPU (burn's wgpu backend) and the CPU backend: for a tab
//            with a hardware WebGPU adapter, which then times WebGPU against the CPU backend.
//   pkg-mt   threaded, CPU only (wasm threads: burn's CPU backend on a pool of workers sharing
//            the module's memory): needs SharedArrayBuffer, so a cross-origin isolated page
//            (COOP/COEP, honoured on https and localhost only).
//   pkg-cpu  single-threaded, CPU only: everything else, a plain-http LAN page above all. Without
//            wgpu compiled in it is smaller (the download) and faster on the CPU backend.
// The query can force a choice: `?bundle=pkg|pkg-mt|pkg-cpu`, `?threads=N` (N ≥ 2: the threaded
// bundle with N threads; 1: one thread), `?backend=webgpu|cpu`, `?time=all` (time every backend
// there is: the WebGPU build).

// Most threads the pool gets unasked: beyond this a tab starves the rest of the machine (other
// tabs, the page itself) for little gain on models this size.
export const MAX_THREADS = 8;
export const BUNDLES = ['pkg', 'pkg-mt', 'pkg-cpu'];

// `env`: { secure (isSecureContext), isolated (crossOriginIsolated and SharedArrayBuffer), cores
// (navigator.hardwareConcurrency), gpu (null, or { software } for the adapter WebGPU offers) }.
// `query`: a URLSearchParams. Returns { bundle, threads, note }: the note says why, for the tab's
// state, the Hello and the dashboard.
export function chooseBundle(env, query) {
  const asked = Number.parseInt(query.get('threads') ?? '', 10);
  const forced = query.get('bundle');
  const backend = query.get('backend');
  const cores = Math.max(1, env.cores || 1);
  const why = () => {
    if (!env.secure) return 'insecure origin (plain http off localhost): no WebGPU, no threads';
    if (!env.isolated) return 'not cross-origin isolated: no threads';
    return null;
  };
  const threaded = (n, note) => (env.isolated
    ? { bundle: 'pkg-mt', threads: n, note }
    : { bundle: 'pkg-cpu', threads: 1, note: `one thread: ${why()}` });
  if (BUNDLES.includes(forced)) {
    if (forced === 'pkg-mt') {
      const n = asked >= 1 ? asked : Math.min(cores, MAX_THREADS);
      return threaded(n, `${n} thread${n > 1 ? 's' : ''} (?bundle=pkg-mt${asked >= 1 ? `&threads=${asked}` : ''})`);
    }
    return { bundle: forced, threads: 1, note: `one thread (?bundle=${forced})` };
  }
  if (backend === 'webgpu' || query.get('time') === 'all') {
    return { bundle: 'pkg', threads: 1, note: `the WebGPU build (${backend === 'webgpu' ? '?backend=webgpu' : '?time=all'}), one CPU thread` };
  }
  if (env.gpu && !env.gpu.software && backend !== 'cpu') {
    return { bundle: 'pkg', threads: 1, note: 'a hardware WebGPU adapter: the WebGPU build, timed against its CPU backend' };
  }
  if (asked === 1) return { bundle: 'pkg-cpu', threads: 1, note: 'one thread (?threads=1)' };
  if (asked >= 2) return threaded(asked, `${asked} threads (?threads=${asked})`);
  if (!env.isolated) return { bundle: 'pkg-cpu', threads: 1, note: `one thread: ${why()}` };
  const threads = Math.min(cores, MAX_THREADS);
  if (threads < 2) return { bundle: 'pkg-cpu', threads: 1, note: 'one thread: the browser reports one core' };
  return { bundle: 'pkg-mt', threads, note: `${threads} threads (navigator.hardwareConcurrency ${cores}${cores > MAX_THREADS ? `, capped at ${MAX_THREADS}` : ''})` };
}
