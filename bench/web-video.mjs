// How soon a large video plays in `huddle web`: the time from starting a
// 1 GiB video nobody has fetched yet to its first frame, and from a seek
// to the frame shown there, against fetching the whole file first
// (`huddle download`). Everything runs on this machine: a DS, two users,
// headless Chromium.
//
// Usage: node bench/web-video.mjs [--size-mib N] [--seeks N] [--debug]
// Needs: release binaries in $CARGO_TARGET_DIR (or ./target), ffmpeg,
// /usr/bin/chromium, and `npm ci` run in client/tests/web (for
// playwright-core). Prints one JSON object.
import { createRequire } from 'node:module';
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..');
const require = createRequire(path.join(root, 'client/tests/web/package.json'));
const { chromium } = require('playwright-core');

const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const sizeMib = arg('--size-mib', 1024);
const seeks = arg('--seeks', 5);
const target = process.env.CARGO_TARGET_DIR || path.join(root, 'target');
// `--debug`: the debug binaries (bench/smoke runs it so, at a tiny size).
const profile = process.argv.includes('--debug') ? 'debug' : 'release';
const bin = (n) => path.join(target, profile, n);
const work = fs.mkdtempSync(path.join(process.env.HUDDLE_BENCH_DIR || os.tmpdir(), 'huddle-web-video-'));
const children = [];
const log = (s) => process.stderr.write(`web-video: ${s}\n`);

function huddle(args) {
  return execFileSync(bin('huddle'), args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 1 << 26 });
}

async function startAndRead(cmd, args, re) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  const lines = readline.createInterface({ input: child.stdout });
  for await (const line of lines) {
    const m = line.match(re);
    if (m) return m;
  }
  throw new Error(`${cmd} ended without printing ${re}`);
}

function makeVideo(file) {
  // One ten-second segment at about 40 Mbit/s (noise keeps the rate up),
  // repeated by stream copy up to the size asked for: a real WebM with a
  // seek index, long enough that no player fetches it all up front.
  const seg = path.join(work, 'seg.webm');
  execFileSync('ffmpeg', ['-v', 'error', '-y', '-f', 'lavfi', '-i', 'testsrc=size=1280x720:rate=25:duration=10',
    '-vf', 'noise=alls=40:allf=t', '-c:v', 'libvpx', '-deadline', 'realtime', '-cpu-used', '8',
    '-b:v', '40M', '-minrate', '40M', '-maxrate', '40M', '-g', '25', '-an', seg]);
  const n = Math.max(1, Math.ceil((sizeMib << 20) / fs.statSync(seg).size));
  const list = path.join(work, 'list.txt');
  fs.writeFileSync(list, Array(n).fill(`file '${seg}'`).join('\n'));
  execFileSync('ffmpeg', ['-v', 'error', '-y', '-f', 'concat', '-safe', '0', '-i', list, '-c', 'copy', file]);
  fs.rmSync(seg);
}

async function main() {
  const video = path.join(work, 'film.webm');
  makeVideo(video);
  const bytes = fs.statSync(video).size;
  log(`video: ${bytes} bytes`);

  const m = await startAndRead(bin('huddle-server'), ['--listen', '127.0.0.1:0', '--data-dir', path.join(work, 'ds')], /listening on (\S+)/);
  const ds = m[1];
  const cert = path.join(work, 'ds', 'cert.pem');
  const home = (n) => path.join(work, n);
  for (const n of ['alice', 'bob']) huddle(['--home', home(n), 'register', n, '--server', ds, '--server-cert', cert]);
  huddle(['--home', home('alice'), 'group', 'create', 'films']);
  huddle(['--home', home('alice'), 'group', 'add', 'films', 'bob']);
  let t = performance.now();
  const sent = JSON.parse(huddle(['--home', home('alice'), '--json', 'send-file', 'films', video]).trim().split('\n').pop());
  const uploadS = (performance.now() - t) / 1000;
  fs.rmSync(video);
  huddle(['--home', home('bob'), 'sync']);

  // The baseline: fetch, verify and decrypt all of it before playing.
  t = performance.now();
  huddle(['--home', home('bob'), 'download', sent.media_id, '--output', path.join(work, 'copy.webm')]);
  const fullDownloadS = (performance.now() - t) / 1000;
  fs.rmSync(path.join(work, 'copy.webm'));
  log(`upload ${uploadS.toFixed(1)} s, full download ${fullDownloadS.toFixed(1)} s`);

  const url = JSON.parse((await startAndRead(bin('huddle'), ['--home', home('bob'), '--json', 'web'], /^(\{.*\})$/))[1]).url;
  const browser = await chromium.launch({
    executablePath: process.env.HUDDLE_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--autoplay-policy=no-user-gesture-required'],
  });
  let figures;
  try {
    const page = await (await browser.newContext()).newPage();
    const ranges = [];
    page.on('request', (r) => { if (r.url().includes('/api/media/')) ranges.push(r.headers().range || 'all'); });
    await page.goto(url);
    // A video element made now, as the page makes one when the message is
    // shown: nothing of it fetched before.
    figures = await page.evaluate(async ({ media, seeks }) => {
      const v = document.createElement('video');
      v.muted = true;
      v.preload = 'none';
      document.body.append(v);
      const frame = () => new Promise((resolve) => v.requestVideoFrameCallback(() => resolve(performance.now())));
      const t0 = performance.now();
      v.src = `/api/media/${media}`;
      const first = frame();
      await v.play();
      const firstFrameMs = (await first) - t0;
      const out = { first_frame_ms: firstFrameMs, duration_s: v.duration, seek_ms: [] };
      // The middle first, then spread over the rest, each where nothing
      // was fetched yet.
      const spots = [0.5, 0.8, 0.2, 0.65, 0.35, 0.9, 0.1].slice(0, seeks);
      for (const f of spots) {
        await new Promise((r) => setTimeout(r, 300));
        const s0 = performance.now();
        const shown = frame();
        v.currentTime = v.duration * f;
        out.seek_ms.push({ at: f, ms: (await shown) - s0 });
      }
      v.pause();
      return out;
    }, { media: sent.media_id, seeks });
    figures.requests = ranges;
  } finally {
    await browser.close();
  }
  const seek = figures.seek_ms.map((s) => s.ms).sort((a, b) => a - b);
  return {
    scenario: 'web-video',
    video_bytes: bytes,
    video_duration_s: figures.duration_s,
    upload_s: uploadS,
    full_download_s: fullDownloadS,
    first_frame_ms: figures.first_frame_ms,
    seek_middle_ms: figures.seek_ms[0].ms,
    seek_ms: figures.seek_ms,
    seek_median_ms: seek[Math.floor(seek.length / 2)],
    seek_max_ms: seek[seek.length - 1],
    media_requests: figures.requests.length,
  };
}

main().then((r) => {
  console.log(JSON.stringify(r));
}, (e) => {
  console.error(`web-video: FAILED: ${e.stack || e}`);
  process.exitCode = 1;
}).finally(() => {
  for (const c of children) { try { c.kill('SIGTERM'); } catch (_) { /* gone */ } }
  fs.rmSync(work, { recursive: true, force: true });
});
