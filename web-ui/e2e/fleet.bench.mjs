// Benchmark: the fleet page with DEVICES real devices in Debian's chromium.
// The real `widgetry serve` (WIDGETRY_BIN, a release build) and `widgetry
// loadgen` publishing for DEVICES devices (one MQTT connection each, one
// sample per device every 10 s) on free loopback ports; once the API lists
// them all, chromium opens the fleet page and we measure the first render
// (navigation to the grid drawn with every cell and the table's first rows),
// the page's JS heap, and frame times over 15 s of live updates (the 5 s
// fleet poll, presence and status messages). A screenshot goes to
// docs/fleet-10k.png with UPDATE_DOCS_SCREENSHOT=1.
//
//   WIDGETRY_BIN=target/release/widgetry DEVICES=10000 node web-ui/e2e/fleet.bench.mjs
//   (scripts/bench-fleet.sh builds and runs it)

import { execSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

import { freePort, waitFor } from "./harness.mjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const WIDGETRY = path.resolve(root, process.env.WIDGETRY_BIN ?? "target/release/widgetry");
const DEVICES = Number(process.env.DEVICES ?? 10000);
const children = [];
const t0 = Date.now();
const log = (m) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${m}`);

async function main() {
  if (!Number.isInteger(DEVICES) || DEVICES < 1 || DEVICES > 20000) throw new Error("DEVICES must be 1 to 20000");
  if (!fs.existsSync(WIDGETRY)) throw new Error(`${WIDGETRY} is missing: cargo build --release first`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "widgetry-fleet-"));
  const [mqtt, mqtt5, http] = [await freePort(), await freePort(), await freePort()];
  const base = `http://127.0.0.1:${http}`;
  const serve = spawn(WIDGETRY, ["serve", "--auth", "off", "--mqtt-listen", `127.0.0.1:${mqtt}`, "--mqtt5-listen", `127.0.0.1:${mqtt5}`, "--http-listen", `127.0.0.1:${http}`, "--database", path.join(dir, "w.db")], { stdio: "ignore" });
  children.push(serve);
  await waitFor("serve", 30_000, async () => (await fetch(`${base}/healthz`)).ok);
  log(`serve up; starting loadgen with ${DEVICES} devices`);
  const load = spawn(WIDGETRY, ["loadgen", "--broker", `127.0.0.1:${mqtt}`, "--devices", String(DEVICES), "--rate", "0.1", "--samples-per-batch", "2", "--duration", "300s", "--grace", "5"], { stdio: "ignore" });
  children.push(load);
  await waitFor(
    `${DEVICES} devices in /api/v1/fleet`,
    240_000,
    async () => {
      const r = await (await fetch(`${base}/api/v1/fleet`)).json();
      return r.devices.length >= DEVICES;
    },
    1000,
  );
  log("every device is in the fleet");
  const apiTimes = [];
  let apiBytes = 0;
  for (let i = 0; i < 3; i++) {
    const s = performance.now();
    const body = await (await fetch(`${base}/api/v1/fleet`)).text();
    apiTimes.push(performance.now() - s);
    apiBytes = body.length;
    // The answer is cached for 1 s: wait that out so each fetch computes.
    await new Promise((r) => setTimeout(r, 1100));
  }
  apiTimes.sort((a, b) => a - b);

  const chromiumPath = execSync("command -v chromium", { shell: "/bin/bash" }).toString().trim();
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--enable-precise-memory-info"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
    await page.goto(`${base}/`, { waitUntil: "commit" });
    await page.waitForFunction((n) => document.querySelector("#grid")?.dataset.cells === String(n) && document.querySelector(".row"), DEVICES, { timeout: 60_000, polling: "raf" });
    const firstRender = await page.evaluate(() => performance.now());
    const fleetFetched = await page.evaluate(
      () => performance.getEntriesByType("resource").find((e) => e.name.includes("api/v1/fleet"))?.responseEnd ?? 0,
    );
    log(`first render: ${firstRender.toFixed(0)} ms after navigation`);
    // Frame times over 15 s of live updates.
    const frames = await page.evaluate(
      () =>
        new Promise((resolve) => {
          const deltas = [];
          let last = performance.now();
          const end = last + 15_000;
          const loop = (t) => {
            deltas.push(t - last);
            last = t;
            if (t < end) requestAnimationFrame(loop);
            else resolve(deltas);
          };
          requestAnimationFrame(loop);
        }),
    );
    frames.sort((a, b) => a - b);
    const q = (p) => frames[Math.min(frames.length - 1, Math.floor(p * frames.length))];
    const long = frames.filter((d) => d > 50).length;
    const heap = await page.evaluate(() => performance.memory?.usedJSHeapSize ?? 0);
    const cells = await page.evaluate(() => document.querySelector("#grid").dataset.cells);
    const dom = await page.evaluate(() => document.getElementsByTagName("*").length);
    if (process.env.UPDATE_DOCS_SCREENSHOT === "1") await page.screenshot({ path: path.join(root, "docs/fleet-10k.png") });
    console.log(
      `\nfleet of ${DEVICES} devices in chromium (1920x1080): first render ${firstRender.toFixed(0)} ms (target < 1000), ` +
        `(of which /api/v1/fleet answered at ${fleetFetched.toFixed(0)} ms; the API alone: median ${apiTimes[1].toFixed(0)} ms for ${(apiBytes / 1e6).toFixed(1)} MB), ` +
        `grid cells ${cells}, DOM elements ${dom}, JS heap ${(heap / 1048576).toFixed(1)} MiB; ` +
        `frames over 15 s of live updates: ${frames.length}, p50 ${q(0.5).toFixed(1)} ms, p99 ${q(0.99).toFixed(1)} ms, ` +
        `max ${frames[frames.length - 1].toFixed(1)} ms, longer than 50 ms: ${long}`,
    );
  } finally {
    await browser.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main()
  .then(() => {
    for (const c of children) c.kill("SIGKILL");
  })
  .catch((e) => {
    console.error(`fleet benchmark failed: ${e.message}`);
    for (const c of children) c.kill("SIGKILL");
    process.exit(1);
  });
