// End-to-end test of watching a factory: the real `widgetry serve` with a
// threshold rule and a webhook, two real agents and 200 plain JSON clients
// (Debian's paho, plain_clients.py), the fleet page in Debian's chromium.
//  - the header's counts equal the devices' states (the API's and the
//    table's filtered rows);
//  - 10 plain clients stop: they turn stale within 3 intervals, live;
//  - one client's value crosses the rule's threshold: the alert shows on
//    the fleet and the device page, is published retained on …/alerts
//    (read with mosquitto_sub) and posted to the webhook; it resolves when
//    the value drops back.
//
//   node web-ui/e2e/fleet.e2e.mjs     (after cargo build --workspace)

import { execSync, spawn } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

import { freePort, waitFor } from "./harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../..");
const WIDGETRY = path.resolve(root, process.env.WIDGETRY_BIN ?? "target/debug/widgetry");
const AGENT = path.resolve(root, process.env.WIDGETRY_AGENT_BIN ?? "target/debug/widgetry-agent");
const ARTIFACTS = path.resolve(root, process.env.E2E_ARTIFACTS ?? "target/e2e-artifacts");
const PLAIN = 200;
const STOPPED = Array.from({ length: 10 }, (_, i) => `plain-${String(190 + i).padStart(3, "0")}`);
const HOT = "plain-007";
fs.mkdirSync(ARTIFACTS, { recursive: true });

const t0 = Date.now();
const children = [];
const logs = [];
const log = (m) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${m}`);
let page;

function start(cmd, args, name, stdin = "ignore") {
  const c = spawn(cmd, args, { stdio: [stdin, "ignore", "pipe"] });
  c.stderr.on("data", (d) => {
    for (const l of String(d).split("\n")) if (l) logs.push(`${name}: ${l}`);
    if (logs.length > 400) logs.splice(0, logs.length - 400);
  });
  children.push(c);
  return c;
}

async function step(name, fn) {
  const s = Date.now();
  await fn();
  log(`ok  ${name} (${Date.now() - s} ms)`);
}

const count = async (sel) => Number((await page.locator(sel).textContent()) ?? "NaN");

async function main() {
  for (const b of [WIDGETRY, AGENT]) if (!fs.existsSync(b)) throw new Error(`${b} is missing: run cargo build --workspace first`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "widgetry-fleet-e2e-"));
  const [mqtt, mqtt5, web, hookPort] = [await freePort(), await freePort(), await freePort(), await freePort()];
  const base = `http://127.0.0.1:${web}`;

  // The webhook receiver.
  const hooks = [];
  const receiver = http.createServer((req, res) => {
    let body = "";
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      try {
        hooks.push(JSON.parse(body));
      } catch {
        hooks.push({ unparsable: body });
      }
      res.writeHead(200).end();
    });
  });
  await new Promise((r) => receiver.listen(hookPort, "127.0.0.1", r));

  fs.writeFileSync(
    path.join(dir, "widgetry.toml"),
    `[[rules]]\nname = "too-hot"\ndevices = "plain-*"\nseries = "temp"\nwhen = "> 80"\nclear = "< 70"\nseverity = "critical"\n\n[alerts]\nwebhook = "http://127.0.0.1:${hookPort}/hook"\n`,
  );
  await step("serve starts with a rule and a webhook", async () => {
    start(WIDGETRY, ["serve", "--config", path.join(dir, "widgetry.toml"), "--auth", "off", "--mqtt-listen", `127.0.0.1:${mqtt}`, "--mqtt5-listen", `127.0.0.1:${mqtt5}`, "--http-listen", `127.0.0.1:${web}`, "--database", path.join(dir, "w.db")], "serve");
    await waitFor("healthz", 30_000, async () => (await fetch(`${base}/healthz`)).ok);
  });
  let plain;
  await step(`two agents and ${PLAIN} plain clients start`, async () => {
    for (const id of ["agent-1", "agent-2"]) start(AGENT, ["--broker", `127.0.0.1:${mqtt}`, "--device", id, "--spool-dir", path.join(dir, `spool-${id}`)], id);
    plain = start("/usr/bin/python3", [path.join(here, "plain_clients.py"), "--port", String(mqtt), "--count", String(PLAIN), "--max-seconds", "240"], "plain", "pipe");
  });

  const chromiumPath = execSync("command -v chromium", { shell: "/bin/bash" }).toString().trim();
  const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"] });
  try {
    page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.on("pageerror", (e) => logs.push(`browser: ${e.message}`));

    await step("the header counts every device active and equals the API", async () => {
      await page.goto(`${base}/`);
      await waitFor("202 active in the header", 40_000, async () => (await count('[data-count="active"]')) === PLAIN + 2);
      const api = await (await fetch(`${base}/api/v1/devices`)).json();
      const byState = {};
      for (const d of api) byState[d.presence] = (byState[d.presence] ?? 0) + 1;
      for (const s of ["active", "stale", "silent", "offline"]) {
        const shown = await count(`[data-count="${s}"]`);
        if (shown !== (byState[s] ?? 0)) throw new Error(`header ${s} ${shown}, API ${byState[s] ?? 0}`);
      }
      if ((await page.locator("#grid").getAttribute("data-cells")) !== String(PLAIN + 2)) throw new Error("one grid cell per device");
    });

    await step("the plain clients' 1 s cadence is learned", async () => {
      await waitFor("interval_ms near 1000 for every plain client", 30_000, async () => {
        const api = await (await fetch(`${base}/api/v1/devices`)).json();
        const plainOnes = api.filter((d) => d.device.startsWith("plain-"));
        return plainOnes.length === PLAIN && plainOnes.every((d) => d.interval_ms >= 500 && d.interval_ms <= 1500);
      }, 500);
    });

    await step("10 plain clients stop: stale within 3 intervals, counts update live", async () => {
      plain.stdin.write(`stop ${STOPPED.join(" ")}\n`);
      const stoppedAt = Date.now();
      await waitFor("10 stale in the header", 15_000, async () => (await count('[data-count="stale"]')) === STOPPED.length, 50);
      const took = Date.now() - stoppedAt;
      // 3 intervals of 1 s (the learned cadence) + the 1 s evaluation tick
      // + commit and push; the page did not reload.
      if (took > 6_000) throw new Error(`stale after ${took} ms`);
      log(`    stale in the header ${took} ms after the clients stopped`);
      await page.selectOption("#state", "stale");
      await waitFor("the stale filter lists exactly the stopped clients", 5_000, async () => {
        const rows = await page.locator(".row").evaluateAll((els) => els.map((e) => e.dataset.device).sort());
        return JSON.stringify(rows) === JSON.stringify([...STOPPED].sort());
      });
      if ((await count('[data-count="active"]')) !== PLAIN + 2 - STOPPED.length) throw new Error("active count");
      await page.selectOption("#state", "all");
    });

    await step(`${HOT} crosses the threshold: fleet, device page, MQTT and webhook`, async () => {
      const sub = spawn("mosquitto_sub", ["-V", "5", "-h", "127.0.0.1", "-p", String(mqtt5), "-t", `widgetry/v1/${HOT}/alerts`], { stdio: ["ignore", "pipe", "ignore"] });
      children.push(sub);
      const received = [];
      sub.stdout.on("data", (d) => received.push(...String(d).split("\n").filter(Boolean)));
      plain.stdin.write(`set ${HOT} 95\n`);
      await page.locator(`.row[data-device="${HOT}"] .alert[data-severity="critical"]`).waitFor({ timeout: 20_000 });
      await waitFor("1 critical alert in the header", 10_000, async () => (await count('[data-alerts="critical"]')) === 1);
      await waitFor("…/alerts published", 10_000, async () => received.some((l) => JSON.parse(l).firing?.some((f) => f.rule === "too-hot")));
      await waitFor("the webhook got the firing", 10_000, async () => hooks.some((h) => h.state === "firing" && h.device === HOT));
      await page.screenshot({ path: path.join(ARTIFACTS, "fleet-alert.png") });
      await page.goto(`${base}/#/device/${HOT}`);
      await page.locator('#dev-alerts [data-rule="too-hot"]').waitFor({ timeout: 10_000 });
      // The temp chart draws the rule's threshold and shades the firing period.
      await page.locator('.chart[data-series="temp"][data-thresholds="1"][data-alert-periods="1"]').waitFor({ state: "attached", timeout: 10_000 });
      await page.screenshot({ path: path.join(ARTIFACTS, "device-alert.png") });
      // Back below the clear level: resolved everywhere.
      plain.stdin.write(`set ${HOT} 20\n`);
      await waitFor("the webhook got the resolution", 20_000, async () => hooks.some((h) => h.state === "resolved" && h.device === HOT));
      await waitFor("…/alerts empty again", 10_000, async () => received.some((l) => (JSON.parse(l).firing ?? [1]).length === 0));
      await page.goto(`${base}/`);
      await waitFor("no critical alert in the header", 15_000, async () => (await count('[data-alerts="critical"]')) === 0);
      const firings = hooks.filter((h) => h.state === "firing").length;
      if (firings !== 1) throw new Error(`${firings} firings posted`);
      sub.kill();
    });
  } finally {
    await browser.close();
    receiver.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main()
  .then(() => {
    for (const c of children) if (c.exitCode === null) c.kill("SIGKILL");
    log("fleet e2e passed");
  })
  .catch(async (e) => {
    console.error(`fleet e2e failed: ${e.stack ?? e}`);
    if (page) await page.screenshot({ path: path.join(ARTIFACTS, "fleet-failure.png") }).catch(() => {});
    console.error(logs.slice(-60).join("\n"));
    for (const c of children) if (c.exitCode === null) c.kill("SIGKILL");
    process.exit(1);
  });
