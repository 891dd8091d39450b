/**
 * End-to-end: the built PWA in headless Chromium (Debian's /usr/bin/chromium via playwright-core, no browser
 * download) against a real sessiond process (./server.mjs). Two browser contexts are two devices of one user:
 * "laptop" and "phone". Steps run in order and share the session; each saves a screenshot in e2e/artifacts/.
 *
 *   node --test e2e/     (after building sdk-ts and web; tests/web/test_browser.py does all of it)
 *
 * E2E_REDIS_URL / E2E_REDIS_PREFIX: the server kill is a SIGKILL with a Redis journal (else a clean stop);
 * E2E_DEBUG=1 prints the pages' console.
 */
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { chromium } from "playwright-core";
import { Sessiond, waitFor } from "./server.mjs";

const ARTIFACTS = join(import.meta.dirname, "artifacts");
const CHROMIUM = process.env.E2E_CHROMIUM ?? "/usr/bin/chromium";
const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const T = 15000; // per wait

let server;
let browser;
let laptop; // { context, page }
let phone;
let phoneNet; // the phone's network switch: cuts its WebSocket and refuses new ones while off
let sessionId;

async function shot(page, name) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

const status = (page) => page.getByTestId("status").getAttribute("data-status");
const pending = async (page) => Number(await page.getByTestId("pending").getAttribute("data-count"));

async function waitStatus(page, want, timeout = T) {
  await page.waitForFunction(
    (w) => w.includes(document.querySelector("[data-testid=status]")?.getAttribute("data-status")),
    Array.isArray(want) ? want : [want],
    { timeout },
  );
}

async function waitSynced(page, timeout = T) {
  await waitStatus(page, "open", timeout);
  await page.waitForFunction(
    () => document.querySelector("[data-testid=pending]")?.getAttribute("data-count") === "0",
    null,
    { timeout },
  );
}

/** The task list as the page shows it. */
function tasks(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll("[data-testid=task]")].map((li) => ({
      text: li.getAttribute("data-text"),
      done: li.querySelector("[data-testid=toggle]").checked,
      count: Number(li.querySelector("[data-testid=count]").textContent),
    })),
  );
}

async function waitTasks(page, predicate, what, timeout = T) {
  await waitFor(`${what} (${await page.getByTestId("device").textContent()})`, async () => predicate(await tasks(page)), timeout);
}

const row = (page, text) => page.locator(`[data-testid=task][data-text="${text}"]`);

async function addTask(page, text) {
  await page.getByTestId("task-input").fill(text);
  await page.getByTestId("add").click();
  await row(page, text).waitFor({ timeout: T }); // optimistic: shows at once, also offline
}

async function signIn(page, device) {
  await page.getByTestId("device-input").fill(device);
  await page.getByTestId("user-input").fill("alice");
  await page.getByTestId("dev-login").click();
}

/** The session's state as the server has it (REST with a dev token): what was acked is here. */
async function serverState() {
  const { token } = await (
    await fetch(`${server.url}/v1/dev/token`, { method: "POST", body: JSON.stringify({ user: "alice" }) })
  ).json();
  const r = await fetch(`${server.url}/v1/sessions/${sessionId}`, { headers: { Authorization: `Bearer ${token}` } });
  assert.equal(r.status, 200, await r.clone().text());
  return (await r.json()).state;
}

const texts = (state) =>
  Object.values(state.tasks)
    .map((t) => t.text)
    .sort();

describe("sessiond web app", { timeout: 120000 }, () => {
  before(async () => {
    mkdirSync(ARTIFACTS, { recursive: true });
    server = new Sessiond({});
    await server.start();
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true, timeout: 30000 });
    const open = async (viewport) => {
      const context = await browser.newContext({ viewport, serviceWorkers: "allow" });
      return { context, page: null };
    };
    laptop = await open({ width: 900, height: 760 });
    phone = await open({ width: 390, height: 760 });
    // The phone's WebSocket goes through a switch. Playwright's offline emulation does not cut WebSockets (a known
    // limitation, microsoft/playwright#4910), so "offline" also closes the live socket and refuses new ones.
    phoneNet = { on: true, live: new Set() };
    await phone.context.routeWebSocket(/\/v1\/ws$/, (ws) => {
      if (!phoneNet.on) {
        ws.close({ code: 1001, reason: "offline" });
        return;
      }
      const upstream = ws.connectToServer();
      const pair = { ws, upstream };
      phoneNet.live.add(pair);
      ws.onClose(() => (phoneNet.live.delete(pair), upstream.close()));
      upstream.onClose((code, reason) => (phoneNet.live.delete(pair), ws.close({ code, reason })));
    });
    for (const device of [laptop, phone]) {
      device.page = await device.context.newPage();
      device.page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));
      if (process.env.E2E_DEBUG) device.page.on("console", (m) => console.error(`[console ${m.type()}] ${m.text()}`));
    }
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it("signs in with dev login, creates a session; the service worker registers", async () => {
    const page = laptop.page;
    await page.goto(`${server.url}/app/`);
    await signIn(page, "laptop");
    await page.getByTestId("new-name").fill("Groceries");
    await page.getByTestId("create").click();
    await page.waitForURL(/\/app\/s\/[A-Za-z0-9_-]+$/, { timeout: T });
    sessionId = page.url().split("/s/")[1];
    await waitSynced(page);
    const registered = await page.evaluate(async () => {
      const reg = await navigator.serviceWorker.ready;
      return reg.active?.scriptURL ?? null;
    });
    assert.equal(registered, `${server.url}/app/sw.js`);
    const manifest = await page.evaluate(() => document.querySelector("link[rel=manifest]").href);
    assert.equal((await fetch(manifest)).headers.get("content-type"), "application/manifest+json");
    // Chromium's own installability check (manifest fields, icons, service worker with a fetch handler). A test
    // browser context is incognito-like, which alone forbids installing: that one reason is expected.
    const cdp = await laptop.context.newCDPSession(page);
    const { installabilityErrors } = await cdp.send("Page.getInstallabilityErrors");
    const problems = installabilityErrors.filter((e) => e.errorId !== "in-incognito");
    assert.deepEqual(problems, [], JSON.stringify(installabilityErrors));
    await cdp.detach();
    await shot(page, "01-laptop-new-session");
  });

  it("two devices edit the same session live and converge", async () => {
    const a = laptop.page;
    const b = phone.page;
    await b.goto(`${server.url}/app/s/${sessionId}`); // a shared link: sign in, then straight into the session
    await signIn(b, "phone");
    await waitSynced(b);
    for (const page of [a, b]) {
      await page.waitForFunction(() => document.querySelectorAll("[data-testid=device-chip]").length === 2, null, {
        timeout: T,
      });
    }
    await addTask(a, "Milk");
    await addTask(a, "Bread");
    await addTask(b, "Eggs");
    await row(b, "Milk").waitFor({ timeout: T });
    await row(a, "Eggs").waitFor({ timeout: T });
    // Concurrent counter clicks from both devices all count (inc), the toggle is seen everywhere.
    for (let i = 0; i < 3; i++) await row(b, "Milk").getByTestId("inc").click();
    for (let i = 0; i < 2; i++) await row(a, "Milk").getByTestId("inc").click();
    await row(a, "Bread").getByTestId("dec").click();
    await row(b, "Eggs").getByTestId("toggle").click();
    const want = [
      { text: "Milk", done: false, count: 5 },
      { text: "Bread", done: false, count: -1 },
      { text: "Eggs", done: true, count: 0 },
    ];
    for (const page of [a, b]) {
      await waitTasks(page, (t) => JSON.stringify(t) === JSON.stringify(want), "both devices to converge");
      await waitSynced(page);
    }
    assert.equal(await a.getByTestId("version").getAttribute("data-version"), await b.getByTestId("version").getAttribute("data-version"));
    await shot(a, "02-converged-laptop");
    await shot(b, "02-converged-phone");
  });

  it("hands the session over: the laptop pauses, the phone claims", async () => {
    const a = laptop.page;
    const b = phone.page;
    await a.getByTestId("claim").click();
    for (const page of [a, b]) {
      await page.waitForFunction(() => document.querySelector("[data-testid=active]")?.dataset.active === "laptop", null, {
        timeout: T,
      });
    }
    assert.match(await a.getByTestId("active").textContent(), /Active on this device/);
    await shot(a, "03-active-on-laptop");
    await a.getByTestId("pause").click(); // "Continue on another device"
    await b.waitForFunction(() => document.querySelector("[data-testid=active]")?.dataset.active === "", null, {
      timeout: T,
    });
    await b.getByTestId("claim").click(); // "Continue here"
    for (const page of [a, b]) {
      await page.waitForFunction(() => document.querySelector("[data-testid=active]")?.dataset.active === "phone", null, {
        timeout: T,
      });
    }
    assert.match(await b.getByTestId("active").textContent(), /Active on this device/);
    assert.match(await a.getByTestId("active").textContent(), /Active on phone/);
    await shot(b, "03-handoff-phone-active");
    await shot(a, "03-handoff-laptop-sees-phone");
  });

  it("survives a server kill: acked edits are kept, queued ones are sent after the restart; the shell loads offline", async () => {
    const a = laptop.page;
    const b = phone.page;
    await addTask(a, "Coffee");
    await waitSynced(a); // acked: durable from here on
    const signal = await server.kill();
    console.log(`# server stopped with ${signal}${server.durable ? " (Redis journal)" : " (embedded mode: clean stop)"}`);
    for (const page of [a, b]) await waitStatus(page, ["reconnecting", "offline", "connecting"]);
    await addTask(a, "Tea"); // queued while the server is down
    assert.ok((await pending(a)) >= 1, "the edit made while the server is down is pending");
    await a.getByTestId("reconnecting").waitFor({ timeout: T });
    await shot(a, "04-server-down-pending");

    // The app shell comes from the service worker cache when the server cannot answer.
    const shell = await laptop.context.newPage();
    await shell.goto(`${server.url}/app/`);
    await shell.getByText("Your sessions").waitFor({ timeout: T });
    assert.ok(await shell.evaluate(() => navigator.serviceWorker.controller !== null), "served by the service worker");
    await shell.getByTestId("sessions-error").getByText("Cannot reach the server").waitFor({ timeout: T });
    await shell.getByTestId("sessions").getByText("Groceries").waitFor({ timeout: T }); // remembered on this device
    await shot(shell, "05-offline-shell");
    await shell.close();

    await server.start(); // same ports, same data dir
    for (const page of [a, b]) {
      await waitSynced(page, 30000);
      await waitTasks(page, (t) => ["Coffee", "Tea"].every((x) => t.some((y) => y.text === x)), "the resumed state");
    }
    const state = await serverState();
    assert.deepEqual(texts(state), ["Bread", "Coffee", "Eggs", "Milk", "Tea"]);
    assert.equal(Object.values(state.tasks).find((t) => t.text === "Milk").count, 5);
    await shot(a, "06-resumed-laptop");
  });

  it("a device offline for a while queues its edits and catches up when back", async () => {
    const a = laptop.page;
    const b = phone.page;
    await phone.context.setOffline(true);
    phoneNet.on = false;
    for (const { ws, upstream } of [...phoneNet.live]) {
      upstream.close();
      ws.close({ code: 1001, reason: "offline" });
    }
    await waitStatus(b, ["offline", "reconnecting"]);
    await b.getByTestId("offline-banner").waitFor({ timeout: T });
    await addTask(b, "Jam");
    await row(b, "Milk").getByTestId("inc").click();
    assert.ok((await pending(b)) >= 2, "edits made offline are queued");
    // The app is closed and opened again while still offline: the shell comes from the service worker, the last
    // copy of the document from this device, and the queued edits from the persisted offline queue.
    await b.reload();
    await b.getByTestId("saved-copy").waitFor({ timeout: T });
    await row(b, "Jam").waitFor({ timeout: T });
    await b.waitForFunction(() => Number(document.querySelector("[data-testid=pending]")?.dataset.count) >= 2, null, {
      timeout: T,
    });
    await shot(b, "07-phone-offline-reopened");
    // Meanwhile the laptop keeps working; the phone must not see it yet.
    await addTask(a, "Butter");
    await row(a, "Eggs").getByTestId("toggle").click();
    await waitSynced(a);
    assert.equal(await row(b, "Butter").count(), 0, "an offline device gets nothing");
    assert.equal(await row(a, "Jam").count(), 0);
    await shot(b, "07-phone-offline-queued");

    phoneNet.on = true;
    await phone.context.setOffline(false);
    await waitSynced(b, 30000);
    const want = (t) =>
      JSON.stringify(t.map((x) => [x.text, x.done, x.count]).sort()) ===
      JSON.stringify(
        [
          ["Bread", false, -1],
          ["Butter", false, 0],
          ["Coffee", false, 0],
          ["Eggs", false, 0],
          ["Jam", false, 0],
          ["Milk", false, 6],
          ["Tea", false, 0],
        ].sort(),
      );
    await waitTasks(b, want, "the phone to catch up");
    await waitTasks(a, want, "the laptop to get the phone's offline edits");
    await shot(b, "08-phone-caught-up");
    await shot(a, "08-laptop-after-catch-up");
  });
});
