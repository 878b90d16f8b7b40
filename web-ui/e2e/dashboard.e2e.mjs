// End-to-end test of the dashboard: the real `widgetry serve` and two real
// agents on free loopback ports, Debian's chromium driven by playwright-core.
// Every step waits on a condition with a deadline; screenshots go to
// $E2E_ARTIFACTS (default target/e2e-artifacts). UPDATE_DOCS_SCREENSHOT=1
// also writes docs/dashboard.png for the README.
//
//   node web-ui/e2e/dashboard.e2e.mjs     (after cargo build --workspace)

import { execSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

import { freePort, waitFor } from "./harness.mjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const bin = (env, def) => path.resolve(root, process.env[env] ?? def);
const WIDGETRY = bin("WIDGETRY_BIN", "target/debug/widgetry");
const AGENT = bin("WIDGETRY_AGENT_BIN", "target/debug/widgetry-agent");
const ARTIFACTS = path.resolve(root, process.env.E2E_ARTIFACTS ?? "target/e2e-artifacts");
fs.mkdirSync(ARTIFACTS, { recursive: true });

const t0 = Date.now();
const children = [];
const serverLog = [];
let browser;
let page;
let stepName = "start";
let base = "";
// The last websocket frames of the page, for the failure report.
const frames = [];
const frame = (line) => {
  frames.push(line);
  if (frames.length > 400) frames.splice(0, frames.length - 400);
};

const log = (msg) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${msg}`);

function start(cmd, args, name) {
  const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
  child.stderr.on("data", (d) => {
    for (const line of String(d).split("\n")) if (line) serverLog.push(`${name}: ${line}`);
    if (serverLog.length > 500) serverLog.splice(0, serverLog.length - 500);
  });
  children.push(child);
  return child;
}

async function step(name, fn) {
  stepName = name;
  const s = Date.now();
  await fn();
  log(`ok  ${name} (${Date.now() - s} ms)`);
}

async function shot(name) {
  const file = path.join(ARTIFACTS, name);
  await page.screenshot({ path: file, fullPage: false });
  return file;
}

function cleanup() {
  for (const c of children) if (c.exitCode === null) c.kill("SIGKILL");
}

async function main() {
  for (const b of [WIDGETRY, AGENT]) {
    if (!fs.existsSync(b)) throw new Error(`${b} is missing: run cargo build --workspace first`);
  }
  const chromiumPath = execSync("command -v chromium", { shell: "/bin/bash" }).toString().trim();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "widgetry-e2e-"));
  const mqtt = await freePort();
  const mqtt5 = await freePort();
  const http = await freePort();
  base = `http://127.0.0.1:${http}`;

  await step("serve starts and answers /healthz", async () => {
    start(WIDGETRY, ["serve", "--mqtt-listen", `127.0.0.1:${mqtt}`, "--mqtt5-listen", `127.0.0.1:${mqtt5}`, "--http-listen", `127.0.0.1:${http}`, "--database", path.join(dir, "w.db")], "serve");
    await waitFor("healthz", 30_000, async () => (await fetch(`${base}/healthz`)).ok);
  });

  const agents = {};
  await step("two agents start", async () => {
    for (const id of ["e2e-1", "e2e-2"]) {
      // A 1 s batch window: the live step below measures the dashboard's
      // live path, and the agent's default 4 s window (sealed on its 1 s
      // tick) took 4.7 s of that step's 5 s on a quiet machine, and more
      // under load.
      agents[id] = start(AGENT, ["--broker", `127.0.0.1:${mqtt}`, "--device", id, "--spool-dir", path.join(dir, `spool-${id}`), "--batch-max-wait", "1s"], id);
    }
  });

  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"],
  });
  page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on("pageerror", (e) => serverLog.push(`browser: page error: ${e.message}`));
  page.on("console", (m) => serverLog.push(`browser: console.${m.type()}: ${m.text()}`));
  page.on("websocket", (ws) => {
    const at = () => ((Date.now() - t0) / 1000).toFixed(1);
    frame(`${at()} s open ${ws.url()}`);
    ws.on("framesent", (f) => frame(`${at()} s sent ${String(f.payload).slice(0, 200)}`));
    ws.on("framereceived", (f) => frame(`${at()} s recv ${String(f.payload).slice(0, 200)}`));
    ws.on("close", () => frame(`${at()} s closed`));
  });

  await step("fleet lists both devices active", async () => {
    await page.goto(`${base}/`);
    for (const id of ["e2e-1", "e2e-2"]) {
      await page.locator(`.row[data-device="${id}"] .badge[data-state="active"]`).waitFor({ timeout: 20_000 });
    }
    await page.locator('#grid[data-cells="2"]').waitFor({ state: "attached", timeout: 10_000 });
    await shot("fleet.png");
  });

  const cpuChart = page.locator('.chart[data-series="cpu.usage_pct"]');
  const drawn = async () => Number((await cpuChart.getAttribute("data-points")) ?? "0");

  await step("device page shows cpu history", async () => {
    await page.locator('.row[data-device="e2e-1"]').click();
    await page.locator("#dev-state").waitFor({ timeout: 10_000 });
    await waitFor("cpu.usage_pct points drawn", 15_000, async () => (await drawn()) > 0);
  });

  await step("a live point is appended within 5 s without reload", async () => {
    const before = await drawn();
    const url = page.url();
    await waitFor(`more than ${before} cpu points (live)`, 5_000, async () => (await drawn()) > before);
    if (page.url() !== url) throw new Error("the page navigated; the point must arrive live");
    await shot("device.png");
  });

  if (process.env.UPDATE_DOCS_SCREENSHOT === "1") {
    // For the README: a minute of live data on the 5-minute range.
    await step("docs screenshot with a minute of live data", async () => {
      await page.locator('button[data-range="5m"]').click();
      await waitFor("60 cpu points", 90_000, async () => (await drawn()) >= 60);
      await page.screenshot({ path: path.join(root, "docs/dashboard.png") });
      await page.goto(`${base}/#/`);
      await page.locator('.row[data-device="e2e-2"]').waitFor({ timeout: 10_000 });
      await page.screenshot({ path: path.join(root, "docs/dashboard-fleet.png") });
      await page.goto(`${base}/#/device/e2e-1`);
      await waitFor("cpu points after returning", 10_000, async () => (await drawn()) > 0);
    });
  }

  for (const r of ["24h", "5m"]) {
    await step(`range ${r} re-renders with points`, async () => {
      await page.locator(`button[data-range="${r}"]`).click();
      await waitFor(`range ${r} active`, 5_000, async () => (await page.locator(`button[data-range="${r}"].active`).count()) === 1);
      await waitFor(`points in range ${r}`, 10_000, async () => (await drawn()) > 0);
    });
  }

  await step("stopping agent e2e-1 shows it offline", async () => {
    agents["e2e-1"].kill("SIGTERM");
    await page.locator('#dev-state[data-state="offline"]').waitFor({ timeout: 15_000 });
  });

  await step("fleet shows e2e-1 offline and e2e-2 active", async () => {
    await page.goto(`${base}/#/`);
    await page.locator('.row[data-device="e2e-1"] .badge[data-state="offline"]').waitFor({ timeout: 15_000 });
    await page.locator('.row[data-device="e2e-2"] .badge[data-state="active"]').waitFor({ timeout: 15_000 });
    await shot("fleet-after.png");
  });

  await step("a rule created over the API fires: fleet count, row and device page show it", async () => {
    const r = await fetch(`${base}/api/v1/rules`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: "e2e-mem", devices: "e2e-2", series: "mem.used_bytes", when: "> 0", severity: "critical" }),
    });
    if (r.status !== 201) throw new Error(`POST /api/v1/rules: ${r.status} ${await r.text()}`);
    // The fleet polls alerts every 5 s; the next e2e-2 batch fires the rule.
    await page.locator('.row[data-device="e2e-2"] .alert[data-severity="critical"]').waitFor({ timeout: 20_000 });
    await waitFor("header counts one critical alert", 10_000, async () => (await page.locator('[data-alerts="critical"]').textContent()) === "1");
    const first = await page.locator(".row").first().getAttribute("data-device");
    if (first !== "e2e-2") throw new Error(`the device with a firing alert is listed first, not ${first}`);
    await page.locator('.row[data-device="e2e-2"]').click();
    await page.locator('#dev-alerts [data-rule="e2e-mem"]').waitFor({ timeout: 10_000 });
    await shot("alert.png");
  });
  fs.rmSync(dir, { recursive: true, force: true });
}

main()
  .then(async () => {
    await browser?.close();
    cleanup();
    log(`dashboard e2e passed; screenshots in ${ARTIFACTS}`);
    process.exit(0);
  })
  .catch(async (e) => {
    console.error(`\nFAILED at step "${stepName}": ${e.message}`);
    if (page) await page.screenshot({ path: path.join(ARTIFACTS, "failure.png") }).catch(() => {});
    const devices = await fetch(`${base}/api/v1/devices`).then((r) => r.text()).catch((e) => String(e));
    console.error(`--- GET /api/v1/devices: ${devices.slice(0, 600)}`);
    console.error("--- last 40 websocket frames of the page ---");
    console.error(frames.slice(-40).join("\n"));
    console.error("--- last 50 lines of server/agent stderr ---");
    console.error(serverLog.slice(-50).join("\n"));
    await browser?.close().catch(() => {});
    cleanup();
    process.exit(1);
  });
