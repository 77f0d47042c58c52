// The console's sign-in at an OpenID Provider in a real browser (Debian's Chromium, driven by
// playwright-core): a console page sends the browser to the login page, its provider link to
// the provider's login and consent pages, and the provider back to the console, which must
// then show the page first asked for, signed in (the SameSite=Strict session cookie is sent
// after the callback's same-site refresh). A customer account gets the login page with a
// 403. On the console's own pages: zero Content-Security-Policy violations, console errors
// or dialogs, no serious or critical axe-core violation. Screenshots go to $ARTIFACTS.
// Prints a JSON report; exits 1 when anything is wrong.
//
// Environment: BASE_URL (the service, with console.oidc), PROVIDER (the provider's issuer
// URL), ARTIFACTS, CHROMIUM (default /usr/bin/chromium).

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
const provider = env('PROVIDER');
const artifacts = env('ARTIFACTS');
const axeSource = readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
const axePath = '/petstore-domain/console/assets/axe-for-tests.js';
const label = 'Sign in with the test provider';

mkdirSync(artifacts, { recursive: true });
const problems = [];
const screenshots = [];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});

async function context(name, allowed = () => false) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.route(`**${axePath}`, (route) =>
    route.fulfill({ body: axeSource, contentType: 'text/javascript' }));
  await context.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (event) => {
      console.error(`CSP violation: ${event.violatedDirective} ${event.blockedURI}`);
    });
  });
  const page = await context.newPage();
  // The provider's development pages are not ours to judge: only the console's count.
  const ours = () => page.url().startsWith(base);
  page.on('console', (message) => {
    if (message.type() === 'error' && ours() && !allowed(message.text())) problems.push(`${name} ${page.url()}: console: ${message.text()}`);
  });
  page.on('pageerror', (error) => {
    if (ours()) problems.push(`${name} ${page.url()}: page error: ${error.message}`);
  });
  page.on('dialog', async (dialog) => {
    problems.push(`${name} ${page.url()}: a dialog opened: ${dialog.message()}`);
    await dialog.dismiss();
  });
  return { context, page };
}

async function axe(page, name) {
  await page.addScriptTag({ url: axePath });
  const violations = await page.evaluate(async () => (await window.axe.run()).violations
    .filter((violation) => ['serious', 'critical'].includes(violation.impact))
    .map((violation) => `${violation.id} (${violation.impact}): ${violation.help}`));
  for (const violation of violations) problems.push(`${name}: axe: ${violation}`);
}

async function shot(page, name) {
  const path = `${artifacts}/sign-in-${name}-1280x800.png`;
  await page.screenshot({ path, fullPage: true });
  screenshots.push(path);
}

// Through the provider's development pages as `account`: any password; consent when asked.
async function atProvider(page, account) {
  await page.waitForURL(`${provider}/**`);
  await page.fill('input[name=login]', account);
  await page.fill('input[name=password]', 'any password');
  await Promise.all([page.waitForLoadState(), page.click('button[type=submit]')]);
  if (page.url().startsWith(provider) && (await page.locator('input[name=prompt][value=consent]').count()) > 0) {
    await page.click('button[type=submit]');
  }
}

// An admin: from the flags page, through the provider, back on the flags page, signed in.
{
  const { context: opened, page } = await context('admin');
  await page.goto(`${base}/petstore-domain/console/flags`);
  if (!page.url().includes('/petstore-domain/console/login')) problems.push(`admin: not sent to the login page: ${page.url()}`);
  await axe(page, 'login with a provider');
  await shot(page, 'login');
  await page.click(`text=${label}`);
  await atProvider(page, 'console-admin');
  await page.waitForURL(`${base}/petstore-domain/console/flags`, { timeout: 20000 })
    .catch(() => problems.push(`admin: not back on the flags page: ${page.url()}`));
  const who = await page.textContent('.who').catch(() => '');
  if (!who.includes('console-admin')) problems.push(`admin: the page is not signed in as console-admin: ${who}`);
  await axe(page, 'flags after signing in');
  await shot(page, 'signed-in');
  const cookies = await opened.cookies(`${base}/petstore-domain/console/login/oidc/callback`);
  const session = cookies.find((cookie) => cookie.name === 'petstore_console');
  if (!session || !session.httpOnly || session.sameSite !== 'Strict') {
    problems.push(`admin: the session cookie is not HttpOnly and Strict: ${JSON.stringify(session)}`);
  }
  if (cookies.some((cookie) => cookie.name === 'petstore_console_oidc')) problems.push('admin: the flow cookie outlived the sign-in');
  await opened.close();
}

// A customer: the provider signs them in, the console refuses them.
{
  // Chromium logs the 403 of the page it navigated to: expected here, and nothing else.
  const { context: opened, page } = await context('customer', (text) =>
    text === 'Failed to load resource: the server responded with a status of 403 (Forbidden)');
  await page.goto(`${base}/petstore-domain/console/login`);
  await page.click(`text=${label}`);
  await atProvider(page, 'console-customer');
  await page.waitForURL(`${base}/petstore-domain/console/login/oidc/callback**`, { timeout: 20000 })
    .catch(() => problems.push(`customer: not back at the callback: ${page.url()}`));
  const error = await page.textContent('.error').catch(() => '');
  if (!error.includes('not an admin')) problems.push(`customer: the login page does not say why: ${error}`);
  await axe(page, 'refused sign-in');
  await shot(page, 'refused');
  const cookies = await opened.cookies(`${base}/petstore-domain/console/login/oidc/callback`);
  if (cookies.some((cookie) => cookie.name === 'petstore_console')) problems.push('customer: a session was set');
  if (await page.locator('meta[http-equiv=refresh]').count() > 0) problems.push('customer: the refusal page moves on');
  await opened.close();
}

await browser.close();
process.stdout.write(`${JSON.stringify({ problems, screenshots })}\n`);
process.exit(problems.length === 0 ? 0 : 1);
