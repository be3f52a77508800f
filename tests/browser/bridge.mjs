// One headless Chromium page, driven line by line from pytest (tests/browser_helpers.py).
// stdin: one JSON request per line {id, op, ...}; stdout: one JSON reply per line {id, ok, value | error}.
// Everything the page reports (console messages, uncaught errors, failed or 4xx/5xx requests) is kept
// and handed back by the "events" op, so a test can assert on what our extension did to the page.
import { createRequire } from "node:module";
import readline from "node:readline";

const require = createRequire(process.env.PIPEFUSION_BROWSER_MODULES + "/");
const { chromium } = require("playwright-core");

let browser = null;
let page = null;
let events = [];

function record(kind, data) {
  events.push({ kind, t: Date.now(), ...data });
}

const ops = {
  async open({ url, width = 1500, height = 900 }) {
    browser = await chromium.launch({
      executablePath: process.env.PIPEFUSION_CHROMIUM || "/usr/bin/chromium",
      headless: true,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
    });
    page = await browser.newPage({ viewport: { width, height } });
    page.on("console", (m) => record("console", { type: m.type(), text: m.text(), url: m.location()?.url ?? "" }));
    page.on("pageerror", (e) => record("pageerror", { text: String(e?.stack ?? e) }));
    page.on("requestfailed", (r) => record("requestfailed", { url: r.url(), text: r.failure()?.errorText ?? "" }));
    page.on("response", (r) => { if (r.status() >= 400) record("http", { url: r.url(), status: r.status() }); });
    await page.goto(url, { waitUntil: "load" });
    return true;
  },
  async eval({ src, arg = null }) {
    return await page.evaluate(`(${src})(${JSON.stringify(arg)})`);
  },
  async wait({ src, arg = null, timeout = 30000 }) {
    const handle = await page.waitForFunction(`(${src})(${JSON.stringify(arg)})`, null, { timeout, polling: 100 });
    return await handle.jsonValue();
  },
  async screenshot({ path, selector = null }) {
    if (selector) await page.locator(selector).first().screenshot({ path });
    else await page.screenshot({ path });
    return path;
  },
  async click({ selector, timeout = 10000 }) {
    await page.locator(selector).first().click({ timeout });
    return true;
  },
  async key({ key }) {
    await page.keyboard.press(key);
    return true;
  },
  async texts({ selector }) {
    return await page.locator(selector).allInnerTexts();
  },
  async mouse({ x, y }) {
    await page.mouse.move(x, y);
    return true;
  },
  async events() {
    const out = events;
    events = [];
    return out;
  },
  async close() {
    if (browser) await browser.close();
    browser = null;
    return true;
  },
};

const rl = readline.createInterface({ input: process.stdin });
for await (const line of rl) {
  let req;
  try {
    req = JSON.parse(line);
    const value = await ops[req.op](req);
    process.stdout.write(JSON.stringify({ id: req.id, ok: true, value: value ?? null }) + "\n");
  } catch (err) {
    process.stdout.write(JSON.stringify({ id: req?.id ?? null, ok: false, error: String(err?.stack ?? err) }) + "\n");
  }
  if (req?.op === "close") break;
}
rl.close();
if (browser) await browser.close();
await new Promise((done) => process.stdout.write("", done));
process.exit(0);
