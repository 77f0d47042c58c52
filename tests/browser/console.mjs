// The operator console in a real browser (Debian's Chromium, driven by playwright-core):
// every page at 1280x800 and 390x844 with zero Content-Security-Policy violations, zero
// console errors and no dialog (a script that got through would raise one), no serious or
// critical axe-core violation, no page-wide horizontal scroll at 390 px, the hostile special
// instructions shown as text; a keyboard-only sign-in and flag toggle. Screenshots of every
// page go to $ARTIFACTS. Prints a JSON report; exits 1 when anything is wrong.
//
// Environment: BASE_URL (the service), USERNAME and PASSWORD (an admin of the console),
// ORDER (an order whose special instructions are hostile), CANCELLED (a cancelled order),
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
const [username, password, order, cancelled] = ['USERNAME', 'PASSWORD', 'ORDER', 'CANCELLED'].map(env);
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
];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});

async function context(viewport, name) {
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
    if (message.type() === 'error') problems.push(`${name} ${page.url()}: console: ${message.text()}`);
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
  await opened.close();
}

await browser.close();
console.log(JSON.stringify({ problems, screenshots }));
process.exit(problems.length === 0 ? 0 : 1);
