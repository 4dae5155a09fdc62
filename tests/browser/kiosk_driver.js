// Drives the kiosk page in Debian's headless Chromium for tests/test_kiosk_browser.py.
//
// usage: node kiosk_driver.js CONFIG_JSON
//   CONFIG_JSON: {"url", "userDataDir", "artifacts", "first", "second", "timeoutMs"}
// Talks to the test over stdio: prints one JSON object per line ({"step": ...}); after the
// "turns-done" step it waits for a line "restarted" on stdin (the test restarts pttd meanwhile).
// Every wait is bounded by timeoutMs; any failure prints {"step": "failed", "error": ...}.
'use strict';

const path = require('path');
const readline = require('readline');
const { chromium } = require('playwright-core');

const cfg = JSON.parse(process.argv[2]);
const T = cfg.timeoutMs || 20000;
const HOLD_MS = 1000;
const CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync',
  '--no-proxy-server', '--disable-dev-shm-usage'];

const lines = readline.createInterface({ input: process.stdin });
const pending = [];
lines.on('line', (line) => { const next = pending.shift(); if (next) next(line); });
const nextLine = () => new Promise((resolve, reject) => {
  pending.push(resolve);
  setTimeout(() => reject(new Error('no line from the test in time')), 3 * T);
});
const report = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

// Records every transcript/state/connection change in the page, so short-lived partials are seen.
function installRecorder() {
  window.__seen = [];
  const t = document.getElementById('transcript');
  const note = () => window.__seen.push({
    kind: t.className, text: t.textContent, color: getComputedStyle(t).color,
    state: document.body.dataset.state, conn: document.body.dataset.conn,
  });
  new MutationObserver(note).observe(t, { childList: true, characterData: true, subtree: true,
    attributes: true });
  new MutationObserver(note).observe(document.body, { attributes: true });
}

async function micCenter(page) {
  const box = await page.locator('#mic').boundingBox();
  return { x: box.x + box.width / 2, y: box.y + box.height / 2 };
}

const stateIs = (page, s) => page.waitForSelector(`body[data-state="${s}"]`, { timeout: T });
const finalIs = (page, text) => page.waitForFunction((want) => {
  const t = document.getElementById('transcript');
  return t.className === 'final' && t.textContent === want;
}, text, { timeout: T });
const partialShown = (page) => page.waitForFunction(() => window.__seen.some(
  (s) => s.kind === 'partial' && s.text), null, { timeout: T });

async function seen(page) {
  return page.evaluate(() => window.__seen.splice(0));
}

async function holdTurn(page) {
  const c = await micCenter(page);
  await page.mouse.move(c.x, c.y);
  await page.mouse.down();
  const downAt = Date.now();
  await stateIs(page, 'listening');
  await partialShown(page);
  await page.waitForFunction(() => window.__seen.filter((s) => s.kind === 'partial').length >= 2,
    null, { timeout: T });
  // the input under test is a hold: keep the button down well past the page's 300 ms tap limit
  // (the pre-roll can make the first words arrive sooner than that)
  await page.waitForTimeout(Math.max(0, HOLD_MS - (Date.now() - downAt)));
  await page.screenshot({ path: path.join(cfg.artifacts, 'kiosk-partial.png') });
  const pressed = await page.getAttribute('#mic', 'aria-pressed');
  await page.mouse.up();
  await finalIs(page, cfg.first);
  await page.screenshot({ path: path.join(cfg.artifacts, 'kiosk.png') });
  return { pressed, seen: await seen(page) };
}

async function tapTurn(page) {
  const c = await micCenter(page);
  await page.touchscreen.tap(c.x, c.y);           // tap: listening stays on after the finger lifts
  await stateIs(page, 'listening');
  await page.waitForFunction(() => window.__seen.some(
    (s) => s.kind === 'partial' && s.text), null, { timeout: T });
  const latched = { pressed: await page.getAttribute('#mic', 'aria-pressed'),
    state: await page.getAttribute('body', 'data-state') };
  await page.touchscreen.tap(c.x, c.y);           // second tap: stop
  await finalIs(page, cfg.second);
  return { latched, seen: await seen(page) };
}

async function errorTurn(page) {
  const c = await micCenter(page);
  await page.mouse.move(c.x, c.y);
  await page.mouse.down();
  await page.waitForSelector('#banner:not([hidden])', { timeout: T });
  await page.mouse.up();
  // the refused turn is over: the button must not stay latched, whether that was a tap or a hold
  await page.waitForSelector('#mic[aria-pressed="false"]', { timeout: T });
  await page.screenshot({ path: path.join(cfg.artifacts, 'kiosk-error.png') });
  return page.textContent('#banner-text');
}

let context = null;

// What the page showed, for the failure report.
async function pageDump() {
  try {
    const page = context.pages()[0];
    return await page.evaluate(() => ({ seen: window.__seen, body: { ...document.body.dataset },
      transcript: document.getElementById('transcript').textContent }));
  } catch (err) {
    return String(err);
  }
}

async function main() {
  context = await chromium.launchPersistentContext(cfg.userDataDir, {
    executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_FLAGS, hasTouch: true,
    viewport: { width: 800, height: 900 },
  });
  try {
    const page = context.pages()[0] || await context.newPage();
    const consoleErrors = [];
    page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
    page.on('pageerror', (e) => consoleErrors.push(String(e)));
    await page.goto(cfg.url, { timeout: T });
    await page.evaluate(installRecorder);
    await page.waitForSelector('body[data-conn="connected"]', { timeout: T });
    await stateIs(page, 'idle');
    report({ step: 'loaded' });
    const hold = await holdTurn(page);
    const tap = await tapTurn(page);
    report({ step: 'turns-done', hold, tap });
    await page.waitForSelector('body[data-conn="disconnected"]', { timeout: T });
    const line = await nextLine();
    if (line !== 'restarted') throw new Error(`unexpected line from the test: ${line}`);
    await page.waitForSelector('body[data-conn="connected"]', { timeout: T });
    const afterReconnect = await page.textContent('#transcript');
    const banner = await errorTurn(page);
    const pageErrors = consoleErrors.filter((e) => !/WebSocket/.test(e));
    report({ step: 'done', afterReconnect, banner, pageErrors });
  } catch (err) {
    err.page = await pageDump();
    throw err;
  } finally {
    await context.close();
  }
}

main().then(() => process.exit(0)).catch((err) => {
  report({ step: 'failed', error: String(err && err.stack || err), page: err.page || null });
  process.exit(1);
});
