// Browser test of `huddle web`: a real DS, two users each with their own
// `huddle web`, each in a browser context of its own (headless Chromium
// driven by Playwright). They exchange texts live; one sends a picture
// (preview, then the full picture, pixels compared) and a short video,
// which the other plays, seeks to the middle of, and watches advance.
// Requests without the token or from another origin are refused.
//
// Needs: the debug binaries in $CARGO_TARGET_DIR (or ./target), ffmpeg
// (to make the picture and the video), /usr/bin/chromium, and
// `npm ci` run here. Screenshots go to $HUDDLE_WEB_SCREENSHOTS if set.
// Usage: node client/tests/web/e2e.mjs
import { chromium } from 'playwright-core';
import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import http from 'node:http';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../../..');
const target = process.env.CARGO_TARGET_DIR || path.join(root, 'target');
const bin = (n) => path.join(target, 'debug', n);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'huddle-web-e2e-'));
const children = [];
const step = (s) => console.log(`e2e: ${s}`);

// The whole run is bounded: a hang fails it instead of holding CI.
const overall = setTimeout(() => { console.error('e2e: timed out after 240 s'); cleanup(); process.exit(1); }, 240_000);

function cleanup() {
  for (const c of children) { try { c.kill('SIGTERM'); } catch (_) { /* gone */ } }
}

function run(args) {
  return execFileSync(bin('huddle'), args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/// Starts `cmd` and returns the first stdout line matching `re`.
async function startAndRead(cmd, args, re) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let err = '';
  child.stderr.on('data', (d) => { err += d; });
  const lines = readline.createInterface({ input: child.stdout });
  const timer = setTimeout(() => child.kill('SIGTERM'), 30_000);
  for await (const line of lines) {
    const m = line.match(re);
    if (m) { clearTimeout(timer); return { child, match: m }; }
  }
  throw new Error(`${path.basename(cmd)} ${args.join(' ')} ended without printing ${re}: ${err}`);
}

function request(port, p, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: p, headers }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    });
    req.on('error', reject);
  });
}

async function main() {
  // What is sent: a picture and an eight-second video with a seek index.
  const picture = path.join(work, 'picture.png');
  const video = path.join(work, 'clock.webm');
  execFileSync('ffmpeg', ['-v', 'error', '-y', '-f', 'lavfi', '-i', 'testsrc2=size=640x400:rate=1', '-frames:v', '1', picture]);
  // Noise keeps the bit rate up: about 4 MB, some fifteen chunks.
  execFileSync('ffmpeg', ['-v', 'error', '-y', '-f', 'lavfi', '-i', 'testsrc=size=640x360:rate=25:duration=8',
    '-vf', 'noise=alls=30:allf=t', '-c:v', 'libvpx', '-deadline', 'realtime', '-cpu-used', '8',
    '-b:v', '4M', '-minrate', '4M', '-maxrate', '4M', '-g', '25', '-an', video]);
  step(`video of ${fs.statSync(video).size} bytes`);

  const { match } = await startAndRead(bin('huddle-server'),
    ['--listen', '127.0.0.1:0', '--data-dir', path.join(work, 'ds')], /listening on (\S+)/);
  const ds = match[1];
  const cert = path.join(work, 'ds', 'cert.pem');
  const home = (n) => path.join(work, n);
  for (const n of ['alice', 'bob']) run(['--home', home(n), 'register', n, '--server', ds, '--server-cert', cert]);
  const group = run(['--home', home('alice'), 'group', 'create', 'friends']).trim().split('\n').pop();
  run(['--home', home('alice'), 'group', 'add', 'friends', 'bob']);
  step(`group ${group}`);

  const web = {};
  for (const n of ['alice', 'bob']) {
    const { match: m } = await startAndRead(bin('huddle'), ['--home', home(n), '--json', 'web'], /^(\{.*\})$/);
    web[n] = new URL(JSON.parse(m[1]).url);
  }

  // Refused: no token, another origin, another host name.
  const port = web.bob.port;
  const token = web.bob.searchParams.get('token');
  assert.equal(await request(port, '/api/groups'), 401, 'no token');
  assert.equal(await request(port, '/'), 401, 'no token for the page');
  assert.equal(await request(port, '/api/groups', { Authorization: `Bearer ${token}` }), 200);
  assert.equal(await request(port, '/api/groups', { Authorization: `Bearer ${token}`, Origin: 'http://evil.example' }), 403, 'foreign origin');
  assert.equal(await request(port, '/api/groups', { Authorization: `Bearer ${token}`, Host: `rebound.example:${port}` }), 421, 'foreign host');
  step('requests without the token or from elsewhere are refused');

  const browser = await chromium.launch({
    executablePath: process.env.HUDDLE_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--autoplay-policy=no-user-gesture-required'],
  });
  try {
    const ctx = {};
    const page = {};
    for (const n of ['alice', 'bob']) {
      ctx[n] = await browser.newContext({ viewport: { width: 1100, height: 900 } });
      page[n] = await ctx[n].newPage();
      page[n].on('pageerror', (e) => { throw new Error(`${n}'s page: ${e.message}`); });
      await page[n].goto(web[n].href);
      // The token left the address bar for a cookie.
      assert.ok(!page[n].url().includes('token='), page[n].url());
      await page[n].locator('#link.connected').waitFor({ timeout: 15_000 });
      await page[n].locator(`#groups li[data-group="${group}"]`).click();
    }

    // A page of another origin (alice's server) cannot read bob's API.
    const cross = await page.alice.evaluate(async (url) => {
      try { const r = await fetch(url); return `read ${r.status}`; } catch (e) { return 'blocked'; }
    }, `http://127.0.0.1:${port}/api/groups`);
    assert.equal(cross, 'blocked');

    // Texts, live, both ways.
    await page.alice.locator('#text').fill('hello bob, this is alice');
    await page.alice.locator('#text').press('Enter');
    await page.bob.locator('#messages .msg .body', { hasText: 'hello bob, this is alice' }).waitFor({ timeout: 10_000 });
    await page.bob.locator('#text').fill('hi alice!\nsecond line');
    await page.bob.locator('#send').click();
    await page.alice.locator('#messages .msg .body', { hasText: 'second line' }).waitFor({ timeout: 10_000 });
    assert.equal(await page.alice.locator('#messages .msg.own').count(), 1);
    step('texts exchanged live');

    // A picture: the preview at once, then the full picture.
    const previews = [];
    page.bob.on('response', (r) => {
      if (r.url().endsWith('/preview')) previews.push({ status: r.status(), type: r.headers()['content-type'] });
    });
    await page.alice.locator('#file-input').setInputFiles(picture);
    const img = page.bob.locator('#messages .msg img');
    await img.waitFor({ timeout: 20_000 });
    await page.bob.locator('#messages .msg img.full').waitFor({ timeout: 20_000 });
    const original = fs.readFileSync(picture).toString('base64');
    const same = await page.bob.evaluate(async (b64) => {
      const pixels = async (src) => {
        const im = new Image();
        im.src = src;
        await im.decode();
        const c = document.createElement('canvas');
        c.width = im.naturalWidth; c.height = im.naturalHeight;
        const g = c.getContext('2d');
        g.drawImage(im, 0, 0);
        return { w: c.width, h: c.height, d: g.getImageData(0, 0, c.width, c.height).data };
      };
      const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
      const url = URL.createObjectURL(new Blob([bytes], { type: 'image/png' }));
      const a = await pixels(url);
      const b = await pixels(document.querySelector('#messages .msg img.full').src);
      if (a.w !== b.w || a.h !== b.h) return `size ${a.w}x${a.h} vs ${b.w}x${b.h}`;
      for (let i = 0; i < a.d.length; i++) if (a.d[i] !== b.d[i]) return `pixel byte ${i} differs`;
      return `same ${a.w}x${a.h}`;
    }, original);
    assert.equal(same, 'same 640x400');
    assert.deepEqual(previews, [{ status: 200, type: 'image/jpeg' }], 'the preview was not shown first');
    step(`the picture arrived: ${same}`);

    // A video: plays, seeks to the middle, goes on playing there.
    const ranges = [];
    page.bob.on('response', (r) => {
      if (r.url().includes('/api/media/') && r.status() === 206) ranges.push(r.headers()['content-range']);
    });
    await page.alice.locator('#file-input').setInputFiles(video);
    const v = page.bob.locator('#messages .msg video');
    await v.waitFor({ timeout: 20_000 });
    const played = await page.bob.evaluate(async () => {
      const v = document.querySelector('#messages .msg video');
      v.muted = true;
      const until = (f, what, ms = 15_000) => new Promise((resolve, reject) => {
        const t0 = performance.now();
        const tick = () => {
          if (f()) return resolve();
          if (performance.now() - t0 > ms) return reject(new Error(`timed out: ${what} (t=${v.currentTime}, state ${v.readyState}, error ${v.error && v.error.message})`));
          setTimeout(tick, 50);
        };
        tick();
      });
      await v.play();
      await until(() => v.currentTime > 0.3, 'playing from the start');
      const duration = v.duration;
      const mid = duration / 2;
      v.currentTime = mid;
      await until(() => !v.seeking && v.currentTime >= mid, 'seeking to the middle');
      const after = v.currentTime;
      await until(() => v.currentTime > after + 0.5, 'playing on from the middle');
      return { duration, mid, now: v.currentTime };
    });
    assert.ok(played.duration > 7 && played.duration < 9, JSON.stringify(played));
    assert.ok(played.now > played.mid + 0.5, JSON.stringify(played));
    assert.ok(ranges.length > 0, 'the player made no range request');
    step(`the video played and seeked: ${JSON.stringify(played)}; ranges ${ranges.join(', ')}`);

    // A group made in the page; bob added, then removed (after the
    // confirmation), and he sees both.
    page.alice.on('dialog', (d) => d.accept());
    await page.alice.locator('#new-group-name').fill('book club');
    await page.alice.locator('#new-group button').click();
    await page.alice.locator('#chat-name', { hasText: 'book club' }).waitFor();
    await page.alice.locator('#show-members').click();
    await page.alice.locator('#add-name').fill('bob');
    await page.alice.locator('#add-member button').click();
    await page.alice.locator('#member-list li[data-user="bob"]').waitFor({ timeout: 15_000 });
    const club = page.bob.locator('#groups li', { hasText: 'book club' });
    await club.waitFor({ timeout: 15_000 });
    await page.alice.locator('#member-list li[data-user="bob"] button', { hasText: 'Remove' }).click();
    await page.alice.locator('#member-list li[data-user="bob"]').waitFor({ state: 'detached', timeout: 15_000 });
    await page.bob.locator('#groups li.gone', { hasText: 'book club' }).waitFor({ timeout: 15_000 });
    await page.alice.locator('#close-members').click();
    await page.alice.locator(`#groups li[data-group="${group}"]`).click();
    step('a group created in the page; bob added, then removed');


    const shots = process.env.HUDDLE_WEB_SCREENSHOTS;
    if (shots) {
      fs.mkdirSync(shots, { recursive: true });
      await page.bob.locator('#messages').evaluate((m) => { m.scrollTop = m.scrollHeight; });
      // The video playing (it may have ended meanwhile).
      await page.bob.evaluate(async () => {
        const v = document.querySelector('#messages .msg video');
        v.currentTime = 2;
        await v.play();
        await new Promise((r) => setTimeout(r, 700));
      });
      await page.bob.screenshot({ path: path.join(shots, 'web-chat.png') });
      await page.bob.locator('#show-members').click();
      await page.bob.locator('#member-list li[data-user="alice"] code').waitFor();
      await page.bob.screenshot({ path: path.join(shots, 'web-members.png') });
      await page.bob.locator('#close-members').click();
      step(`screenshots in ${shots}`);
    }

    // A narrow window: the chat alone, still usable.
    await page.bob.setViewportSize({ width: 390, height: 800 });
    assert.ok(await page.bob.locator('#text').isVisible());
    assert.ok(!(await page.bob.locator('#sidebar').isVisible()));
    await page.bob.locator('#back').click();
    assert.ok(await page.bob.locator('#groups').isVisible());
    await page.bob.locator(`#groups li[data-group="${group}"]`).click();
    await page.bob.setViewportSize({ width: 1100, height: 900 });
    step('usable on a narrow window');
  } finally {
    await browser.close();
  }
}

main().then(() => {
  clearTimeout(overall);
  cleanup();
  fs.rmSync(work, { recursive: true, force: true });
  step('all passed');
}, (e) => {
  clearTimeout(overall);
  console.error(`e2e: FAILED: ${e.stack || e}`);
  cleanup();
  process.exit(1);
});
