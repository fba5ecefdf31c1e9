// Checks every relative link of the built book (docs/book, by `mdbook build docs`) and of the
// README: the file it names exists, and its #anchor is an id on that page (a heading, for
// Markdown files). Links out of the repository (http:, https:, mailto:) are not followed: CI has
// no network. Usage: node scripts/check-links.mjs docs/book README.md; exits 1 listing each
// broken link with the page it is on.
import { readFileSync, readdirSync, statSync, existsSync } from 'node:fs';
import { join, dirname, resolve, relative, extname } from 'node:path';

const repo = resolve(dirname(new URL(import.meta.url).pathname), '..');
const broken = [];
const idCache = new Map();

function walk(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? walk(path) : [path];
  });
}

// GitHub's and mdBook's heading anchors: lower case, punctuation dropped, spaces to hyphens.
function slug(heading) {
  return heading
    .trim()
    .toLowerCase()
    .replace(/<[^>]+>/g, '')
    .replace(/[`*_[\]()]/g, '')
    .replace(/[^\p{L}\p{N}\s-]/gu, '')
    .replace(/\s/g, '-');
}

// The anchors a file offers.
function ids(path) {
  if (!idCache.has(path)) {
    const text = readFileSync(path, 'utf8');
    const found = new Set();
    if (extname(path) === '.html') {
      for (const m of text.matchAll(/\sid="([^"]+)"/g)) found.add(m[1]);
    } else if (extname(path) === '.md') {
      let inCode = false;
      for (const line of text.split('\n')) {
        if (line.startsWith('```')) inCode = !inCode;
        const h = !inCode && line.match(/^#{1,6}\s+(.*)$/);
        if (h) found.add(slug(h[1]));
      }
    }
    idCache.set(path, found);
  }
  return idCache.get(path);
}

function check(page, link) {
  link = link.replace(/&amp;/g, '&');
  if (/^(https?:|mailto:|data:|javascript:)/.test(link) || link.startsWith('//')) return;
  const [rawPath, anchor] = link.split('#');
  const path = decodeURIComponent(rawPath.split('?')[0]);
  let target = path === '' ? page : path.startsWith('/') ? join(repo, path) : resolve(dirname(page), path);
  // A folder of the book is its index page; a folder of the repository (a source tree) is
  // fine as it is.
  if (existsSync(target) && statSync(target).isDirectory() && existsSync(join(target, 'index.html'))) target = join(target, 'index.html');
  const where = relative(repo, page);
  if (!existsSync(target)) {
    broken.push(`${where}: ${link} (no such file)`);
    return;
  }
  if (anchor && ['.html', '.md'].includes(extname(target)) && !ids(target).has(anchor)) {
    broken.push(`${where}: ${link} (no #${anchor} on ${relative(repo, target)})`);
  }
}

let checked = 0;
for (const arg of process.argv.slice(2)) {
  const root = resolve(arg);
  if (!existsSync(root)) {
    console.error(`check-links: ${arg} does not exist (run \`mdbook build docs\` first)`);
    process.exit(1);
  }
  const pages = statSync(root).isDirectory() ? walk(root).filter((p) => p.endsWith('.html')) : [root];
  for (const page of pages) {
    // mdBook's print page repeats every page with its links rewritten, and its 404 page links
    // to the site's root; the pages themselves are checked.
    if (page.endsWith('print.html') || page.endsWith('404.html')) continue;
    const text = readFileSync(page, 'utf8');
    const links =
      extname(page) === '.md'
        ? [...text.replace(/```[\s\S]*?```/g, '').matchAll(/\]\(([^)\s]+)(?:\s+"[^"]*")?\)|\ssrc="([^"]+)"/g)]
        : [...text.matchAll(/\s(?:href|src)="([^"]+)"/g)];
    for (const m of links) {
      check(page, m[1] ?? m[2]);
      checked += 1;
    }
  }
}

if (broken.length) {
  console.error(`${broken.length} broken link(s):\n  ${broken.join('\n  ')}`);
  process.exit(1);
}
console.log(`check-links: ${checked} links, none broken`);
