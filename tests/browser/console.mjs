// The operator console in a real browser (Debian's Chromium, driven by playwright-core):
// every page at 1280x800 and 390x844 with zero Content-Security-Policy violations, zero
// console errors and no dialog (a script that got through would raise one), no serious or
// critical axe-core violation, no page-wide horizontal scroll at 390 px, the hostile special
// instructions shown as text; a waiting order's page following its saga live across a
// dropped stream; a keyboard-only sign-in and flag toggle. Screenshots of every
// page go to $ARTIFACTS. Prints a JSON report; exits 1 when anything is wrong.
//
// Environment: BASE_URL (the service), USERNAME and PASSWORD (an admin of the console),
// ORDER (an order whose special instructions are hostile), CANCELLED (a cancelled order),
// WAITING (an order waiting for its payment, which this script makes with ADMIN_TOKEN),
// ARTIFACTS (where screenshots go), CHROMIUM (default /usr/bin/chromium).

import { readFileSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { chromium } from 'playwright-core';

const require = createRequire(import.meta.url);
const env = (name) => {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return value;
};
const base = env('BASE_URL');
const artifacts = env('ARTIFACTS');
const [username, password, order, cancelled, waiting] = ['USERNAME', 'PASSWORD', 'ORDER', 'CANCELLED', 'WAITING'].map(env);
const hostile = '<img src=x onerror=alert(1)>';
const axeSource = readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
// Served to the page from its own origin (the CSP allows scripts from 'self' only); the
// service itself serves no such file.
const axePath = '/petstore-domain/console/assets/axe-for-tests.js';

mkdirSync(artifacts, { recursive: true });
const problems = [];
const screenshots = [];
const pages = [
  ['orders', '/petstore-domain/console/orders'],
  ['stuck', '/petstore-domain/console/orders?stuck=on'],
  ['order', `/petstore-domain/console/orders/${order}`],
  ['cancelled-order', `/petstore-domain/console/orders/${cancelled}`],
  ['dead-letters', '/petstore-domain/console/dead-letters'],
  ['flags', '/petstore-domain/console/flags'],
  ['audit', '/petstore-domain/console/audit'],
  ['tail', '/petstore-domain/console/tail'],
  ['projections', '/petstore-domain/console/projections'],
  ['replay', '/petstore-domain/console/replay'],
];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});

async function context(viewport, name, allowed = () => false) {
  const context = await browser.newContext({ viewport });
  await context.route(`**${axePath}`, (route) =>
    route.fulfill({ body: axeSource, contentType: 'text/javascript' }));
  await context.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (event) => {
      console.error(`CSP violation: ${event.violatedDirective} ${event.blockedURI}`);
    });
  });
  const page = await context.newPage();
  page.on('console', (message) => {
    if (message.type() === 'error' && !allowed(message.text())) {
      problems.push(`${name} ${page.url()}: console: ${message.text()}`);
    }
  });
  page.on('pageerror', (error) => problems.push(`${name} ${page.url()}: page error: ${error.message}`));
  page.on('dialog', async (dialog) => {
    problems.push(`${name} ${page.url()}: a dialog opened: ${dialog.message()}`);
    await dialog.dismiss();
  });
  return { context, page };
}

async function signIn(page) {
  await page.goto(`${base}/petstore-domain/console/`);
  await page.fill('#username', username);
  await page.fill('#password', password);
  await Promise.all([page.waitForURL('**/petstore-domain/console/**'), page.click('button[type=submit]')]);
}

async function check(page, name, viewport) {
  const response = await page.goto(`${base}${pages.find(([page]) => page === name)[1]}`);
  if (response.status() !== 200) problems.push(`${viewport.width}: ${name} answered ${response.status()}`);
  await page.addScriptTag({ url: axePath });
  const violations = await page.evaluate(async () => (await window.axe.run()).violations
    .filter((violation) => ['serious', 'critical'].includes(violation.impact))
    .map((violation) => `${violation.id} (${violation.impact}): ${violation.help} ×${violation.nodes.length}`));
  for (const violation of violations) problems.push(`${viewport.width}: ${name}: axe: ${violation}`);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 0) problems.push(`${viewport.width}: ${name}: the page scrolls sideways by ${overflow} px`);
  const path = `${artifacts}/console-${name}-${viewport.width}x${viewport.height}.png`;
  await page.screenshot({ path, fullPage: true });
  screenshots.push(path);
}

for (const viewport of [{ width: 1280, height: 800 }, { width: 390, height: 844 }]) {
  const { context: opened, page } = await context(viewport, `${viewport.width}`);
  const login = await page.goto(`${base}/petstore-domain/console/login`);
  if (login.status() !== 200) problems.push(`${viewport.width}: the login page answered ${login.status()}`);
  await page.addScriptTag({ url: axePath });
  const loginViolations = await page.evaluate(async () => (await window.axe.run()).violations
    .filter((violation) => ['serious', 'critical'].includes(violation.impact)).map((violation) => violation.id));
  for (const violation of loginViolations) problems.push(`${viewport.width}: login: axe: ${violation}`);
  await page.screenshot({ path: `${artifacts}/console-login-${viewport.width}x${viewport.height}.png` });
  await signIn(page);
  for (const [name] of pages) await check(page, name, viewport);
  await page.goto(`${base}/petstore-domain/console/orders/${order}`);
  const shown = await page.getByText(hostile, { exact: true }).count();
  if (shown !== 1) problems.push(`${viewport.width}: the hostile instructions are not shown as text (${shown} matches)`);
  await opened.close();
}

// Live: the page of an order waiting for its payment follows the saga without a reload, across
// the server ending the stream (console.live_max_seconds): every entry once, in order.
{
  const viewport = { width: 1280, height: 800 };
  // htmx logs each stream the server ends (its sseError event) as a console error: allowed
  // here, where the server ends them on purpose, and counted against the sseError events.
  let ended = 0;
  const { context: opened, page } = await context(viewport, 'live', (text) => {
    if (text !== '[object Event]') return false;
    ended += 1;
    return true;
  });
  await page.addInitScript(() => {
    window.sseOpened = 0;
    window.sseErrors = 0;
    document.addEventListener('htmx:sseOpen', () => { window.sseOpened += 1; });
    document.addEventListener('htmx:sseError', () => { window.sseErrors += 1; });
  });
  let navigations = 0;
  page.on('framenavigated', (frame) => { if (frame === page.mainFrame()) navigations += 1; });
  await signIn(page);
  await page.goto(`${base}/petstore-domain/console/orders/${waiting}`);
  const before = navigations;
  const said = async () => (await page.textContent('#live')).replace(/\s+/g, ' ');
  if (!(await said()).includes('reserved')) problems.push('live: the waiting order is not reserved');
  // Connected, then dropped by the server and connected again.
  await page.waitForFunction(() => window.sseOpened >= 2, null, { timeout: 20000 })
    .catch(() => problems.push('live: the stream never reconnected after the server ended it'));
  const paid = await fetch(`${base}/petstore-domain/payments`, {
    method: 'POST',
    headers: { authorization: `Bearer ${env('ADMIN_TOKEN')}`, 'content-type': 'application/json' },
    body: JSON.stringify({ order_id: waiting }),
  });
  if (!paid.ok) problems.push(`live: paying answered ${paid.status}`);
  await page.waitForFunction(() => document.querySelector('#live')?.textContent.includes('completed'), null, { timeout: 20000 })
    .catch(() => problems.push('live: the page never showed the order completed'));
  if (navigations !== before) problems.push('live: the page reloaded');
  const shown = await page.evaluate(() => [...document.querySelectorAll('#live tr[id^="entry-"]')]
    .map((row) => Number(row.id.slice('entry-'.length))));
  if (shown.length < 10 || shown.some((index, at) => index !== at)) {
    problems.push(`live: the entries are not each shown once, in order: ${shown.join(',')}`);
  }
  const sseErrors = await page.evaluate(() => window.sseErrors);
  if (ended > sseErrors) problems.push(`live: ${ended - sseErrors} console errors besides the ended streams`);
  await page.screenshot({ path: `${artifacts}/console-live-order-1280x800.png`, fullPage: true });
  screenshots.push(`${artifacts}/console-live-order-1280x800.png`);
  await opened.close();
}

// The live tail: a committed event appears without a reload; pausing keeps it; an event
// committed while paused shows once resumed.
{
  const viewport = { width: 1280, height: 800 };
  const { context: opened, page } = await context(viewport, 'tail');
  await signIn(page);
  await page.goto(`${base}/petstore-domain/console/tail?type=LiveSettingsChanged`);
  const change = async (on) => {
    const response = await fetch(`${base}/petstore-domain/admin/config`, {
      method: 'PUT',
      headers: { authorization: `Bearer ${env('ADMIN_TOKEN')}`, 'content-type': 'application/json' },
      body: JSON.stringify({ feature_flags: { pet_personalization: on } }),
    });
    if (!response.ok) problems.push(`tail: changing a flag answered ${response.status}`);
  };
  const rows = async () => page.evaluate(() => [...document.querySelectorAll('tbody tr[id^="tail-"]')]
    .map((row) => Number(row.id.slice('tail-'.length))));
  const before = (await rows()).length;
  await page.waitForTimeout(300);
  await change(true);
  await page.waitForFunction((count) => document.querySelectorAll('tbody tr[id^="tail-"]').length > count, before, { timeout: 20000 })
    .catch(() => problems.push('tail: the committed event never appeared'));
  const seen = await rows();
  const newest = seen[seen.length - 1];
  const pause = await page.getAttribute('#pause', 'href');
  if (!pause?.includes(`until=${newest}`)) problems.push(`tail: the pause link does not keep the place: ${pause} (newest ${newest})`);
  await Promise.all([page.waitForNavigation(), page.click('#pause')]);
  if (!(await rows()).includes(newest)) problems.push('tail: the paused page lost the newest event');
  await change(false);
  await Promise.all([page.waitForNavigation(), page.click('text=Resume from here')]);
  await page.waitForFunction((newest) => [...document.querySelectorAll('tbody tr[id^="tail-"]')]
    .some((row) => Number(row.id.slice('tail-'.length)) > newest), newest, { timeout: 20000 })
    .catch(() => problems.push('tail: the event committed while paused never appeared'));
  const resumed = await rows();
  if (new Set(resumed).size !== resumed.length || resumed.some((position, at) => at > 0 && position <= resumed[at - 1])) {
    problems.push(`tail: rows twice or out of order: ${resumed.join(',')}`);
  }
  await opened.close();
}

// Keyboard only: sign in, reach the flags page, turn premium_filters off.
{
  const viewport = { width: 1280, height: 800 };
  const { context: opened, page } = await context(viewport, 'keyboard');
  await page.goto(`${base}/petstore-domain/console/login`);
  // The username field takes the focus on arrival (autofocus): wait for it, then type.
  await page.waitForFunction(() => document.activeElement?.id === 'username');
  await page.keyboard.type(username);
  await page.keyboard.press('Tab');
  await page.keyboard.type(password);
  await Promise.all([page.waitForNavigation(), page.keyboard.press('Enter')]);
  if (!page.url().endsWith('/petstore-domain/console/')) {
    const said = (await page.textContent('main'))?.replace(/\s+/g, ' ').trim();
    problems.push(`keyboard: signing in ended at ${page.url()}: ${said}`);
    console.log(JSON.stringify({ problems, screenshots }));
    process.exit(1);
  }
  const reach = async (wanted) => {
    for (let presses = 0; presses < 80; presses += 1) {
      await page.keyboard.press('Tab');
      const focused = await page.evaluate(() => document.activeElement?.textContent?.trim() ?? '');
      if (focused === wanted) return true;
    }
    return false;
  };
  if (!(await reach('Flags and breakers'))) problems.push('keyboard: the flags link was never focused');
  await Promise.all([page.waitForURL('**/console/flags'), page.keyboard.press('Enter')]);
  if (!(await reach('Turn premium_filters off'))) problems.push('keyboard: the toggle was never focused');
  await Promise.all([page.waitForURL('**/console/flags?done=flag'), page.keyboard.press('Enter')]);
  const text = await page.textContent('main');
  if (!text.includes('The flag was changed in every process.')) problems.push('keyboard: the toggle did not say it was done');
  // A replay: from the projections page to a dry run, its progress live, then the replay
  // confirmed by typing the projection's name.
  if (!(await reach('Projections and runners'))) problems.push('keyboard: the projections link was never focused');
  await Promise.all([page.waitForURL('**/console/projections'), page.keyboard.press('Enter')]);
  if (!(await reach('Replay a projection'))) problems.push('keyboard: the replay link was never focused');
  await Promise.all([page.waitForURL('**/console/replay'), page.keyboard.press('Enter')]);
  if (!(await reach('Dry run of read_models'))) problems.push('keyboard: the dry run was never focused');
  await Promise.all([page.waitForNavigation(), page.keyboard.press('Enter')]);
  await page.waitForFunction(() => document.querySelector('#progress')?.textContent.includes('finished'), null, { timeout: 30000 })
    .catch(() => problems.push('keyboard: the dry run never finished on the page'));
  await page.reload();
  await page.focus('body');
  let typed = false;
  for (let presses = 0; presses < 80 && !typed; presses += 1) {
    await page.keyboard.press('Tab');
    typed = await page.evaluate(() => document.activeElement?.id === 'confirm-read_models');
  }
  if (!typed) problems.push('keyboard: the confirmation field was never focused');
  await page.keyboard.type('read_models');
  await page.keyboard.press('Tab');
  const focused = await page.evaluate(() => document.activeElement?.textContent?.trim());
  if (focused !== 'Replay read_models') problems.push(`keyboard: after the confirmation came ${focused}`);
  await Promise.all([page.waitForNavigation(), page.keyboard.press('Enter')]);
  await page.waitForFunction(() => document.querySelector('#progress')?.textContent.includes('the rebuilt views are in place'), null, { timeout: 30000 })
    .catch(async () => problems.push(`keyboard: the replay never finished: ${(await page.textContent('#progress'))?.replace(/\s+/g, ' ')}`));
  await page.screenshot({ path: `${artifacts}/console-replay-1280x800.png`, fullPage: true });
  screenshots.push(`${artifacts}/console-replay-1280x800.png`);
  await opened.close();
}

await browser.close();
console.log(JSON.stringify({ problems, screenshots }));
process.exit(problems.length === 0 ? 0 : 1);
