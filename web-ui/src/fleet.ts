// Fleet view: every device in one virtualised table (only visible rows are
// in the DOM), polled from one `api/v1/fleet` request and updated from live
// status messages.
import * as api from "./api";
import {
  type FleetDevice,
  PRESENCES,
  type PresenceFilter,
  type SortKey,
  filterFleet,
  FiringAlerts,
  relTime,
  sortFleet,
  sparkPath,
} from "./data";
import { type ColourBy, type GroupBy, type Layout, draw as drawGrid, hit } from "./grid";
import type { Live } from "./live";

const ROW = 44;
const POLL_MS = 5000;

const COLUMNS: { key: SortKey | null; label: string; cls: string }[] = [
  { key: "attention", label: "State", cls: "c-state" },
  { key: "device", label: "Device", cls: "c-device" },
  { key: "last_seen", label: "Last seen", cls: "c-seen" },
  { key: "cpu", label: "CPU", cls: "c-cpu" },
  { key: "mem_pct", label: "Memory", cls: "c-mem" },
  { key: "rejects", label: "Rejects", cls: "c-rej" },
  { key: null, label: "Gaps / lost", cls: "c-gaps" },
];

export function mountFleet(root: HTMLElement, live: Live): () => void {
  root.innerHTML = `
    <section class="fleet">
      <div class="toolbar">
        <div class="summary" id="summary"></div>
        <input id="filter" type="search" placeholder="Filter devices, hosts…" aria-label="Filter devices" />
        <select id="state" aria-label="State filter">
          <option value="all">All</option><option value="active">Active</option><option value="stale">Stale</option>
          <option value="silent">Silent</option><option value="offline">Offline</option>
        </select>
      </div>
      <div class="gridbar">
        <label>Colour by <select id="colour" aria-label="Colour the grid by">
          <option value="health">Health</option><option value="cpu">CPU</option><option value="mem_pct">Memory</option>
        </select></label>
        <label>Group by <select id="group" aria-label="Group the grid by">
          <option value="none">—</option><option value="prefix">Id prefix</option><option value="host">Host</option>
        </select></label>
      </div>
      <div class="gridwrap"><canvas id="grid" aria-label="Fleet grid: one cell per device"></canvas>
        <div class="tip" id="tip" hidden></div></div>
      <div class="thead">${COLUMNS.map(
        (c) => `<div class="${c.cls}" ${c.key ? `data-sort="${c.key}" role="button" tabindex="0"` : ""}>${c.label}</div>`,
      ).join("")}</div>
      <div class="tbody" id="tbody"><div class="spacer" id="spacer"></div></div>
      <p class="empty" id="empty" hidden>No devices yet. Point an agent at the broker:
        <code>widgetry-agent --broker HOST:1883 --device my-box</code></p>
    </section>`;
  const tbody = root.querySelector<HTMLElement>("#tbody")!;
  const spacer = root.querySelector<HTMLElement>("#spacer")!;
  const filter = root.querySelector<HTMLInputElement>("#filter")!;
  const stateSel = root.querySelector<HTMLSelectElement>("#state")!;
  const summary = root.querySelector<HTMLElement>("#summary")!;
  const empty = root.querySelector<HTMLElement>("#empty")!;
  const canvas = root.querySelector<HTMLCanvasElement>("#grid")!;
  const tip = root.querySelector<HTMLElement>("#tip")!;
  const colourSel = root.querySelector<HTMLSelectElement>("#colour")!;
  const groupSel = root.querySelector<HTMLSelectElement>("#group")!;
  let grid: Layout | undefined;
  let gridFrame = 0;
  // At most one grid redraw per animation frame, however many updates.
  const scheduleGrid = () => {
    if (gridFrame) return;
    gridFrame = requestAnimationFrame(() => {
      gridFrame = 0;
      grid = drawGrid(canvas, view, colourSel.value as ColourBy, groupSel.value as GroupBy);
    });
  };
  const cellAt = (e: MouseEvent) => {
    if (!grid) return undefined;
    const r = canvas.getBoundingClientRect();
    const c = hit(grid, e.clientX - r.left, e.clientY - r.top);
    return c ? view[c.index] : undefined;
  };
  canvas.addEventListener("mousemove", (e) => {
    const d = cellAt(e);
    if (!d) {
      tip.hidden = true;
      return;
    }
    const pct = (v: number | null) => (v === null ? "–" : `${v.toFixed(1)} %`);
    tip.innerHTML = `<b>${esc(d.device)}</b> ${esc(d.state)}${d.alert ? ` · ${d.alerts} ${esc(d.alert)} alert(s)` : ""}<br>CPU ${pct(d.cpu)} · memory ${pct(d.mem_pct)}${d.host ? `<br>${esc(d.host)}` : ""}`;
    const r = canvas.getBoundingClientRect();
    tip.style.left = `${e.clientX - r.left + 14}px`;
    tip.style.top = `${e.clientY - r.top + 14}px`;
    tip.hidden = false;
  });
  canvas.addEventListener("mouseleave", () => (tip.hidden = true));
  canvas.addEventListener("click", (e) => {
    const d = cellAt(e);
    if (d) location.hash = `#/device/${encodeURIComponent(d.device)}`;
  });
  colourSel.addEventListener("change", scheduleGrid);
  groupSel.addEventListener("change", scheduleGrid);

  let all: FleetDevice[] = [];
  let view: FleetDevice[] = [];
  // Needs attention first: firing alerts, stopped devices, rejects/gaps.
  let sortKey: SortKey = "attention";
  let asc = true;
  let serverSkew = 0; // server now - local now
  const rows = new Map<number, HTMLElement>();

  const recompute = () => {
    view = sortFleet(filterFleet(all, filter.value, stateSel.value as PresenceFilter), sortKey, asc);
    spacer.style.height = `${view.length * ROW}px`;
    const count = (p: string) => all.filter((d) => d.state === p).length;
    const cls: Record<string, string> = { active: "ok", stale: "warn", silent: "bad", offline: "bad" };
    const firing = (sev: string) => all.filter((d) => d.alert === sev).length;
    summary.innerHTML =
      PRESENCES.map((p) => `<b class="${cls[p]}" data-count="${p}">${count(p)}</b> ${p}`).join(" · ") +
      ` · <span data-count="all">${all.length}</span> devices · alerts: ` +
      ["critical", "warning", "info"]
        .map((s) => `<b class="${s === "info" ? "" : cls.silent}" data-alerts="${s}">${firing(s)}</b> ${s}`)
        .join(" · ");
    empty.hidden = all.length > 0;
    for (const el of root.querySelectorAll<HTMLElement>("[data-sort]")) {
      el.classList.toggle("sorted", el.dataset.sort === sortKey);
      el.dataset.dir = asc ? "asc" : "desc";
    }
    rows.forEach((el) => el.remove());
    rows.clear();
    render();
    scheduleGrid();
  };

  const render = () => {
    const first = Math.max(0, Math.floor(tbody.scrollTop / ROW) - 5);
    const last = Math.min(view.length, Math.ceil((tbody.scrollTop + tbody.clientHeight) / ROW) + 5);
    for (const [i, el] of rows) {
      if (i < first || i >= last) {
        el.remove();
        rows.delete(i);
      }
    }
    const now = Date.now() + serverSkew;
    for (let i = first; i < last; i++) {
      const d = view[i];
      let el = rows.get(i);
      if (!el) {
        el = document.createElement("a");
        el.className = "row";
        el.style.top = `${i * ROW}px`;
        tbody.appendChild(el);
        rows.set(i, el);
      }
      fillRow(el, d, now);
    }
  };

  // Live messages arrive by the thousand when a fleet comes online: each
  // one is an O(1) update by id, and the view is recomputed at most once
  // per animation frame; unknown devices trigger at most one reload a
  // second.
  let byId = new Map<string, FleetDevice>();
  const firing = new FiringAlerts();
  let recomputeFrame = 0;
  const scheduleRecompute = () => {
    if (recomputeFrame) return;
    recomputeFrame = requestAnimationFrame(() => {
      recomputeFrame = 0;
      recompute();
    });
  };
  let reloadTimer: ReturnType<typeof setTimeout> | null = null;
  const scheduleLoad = () => {
    if (reloadTimer) return;
    reloadTimer = setTimeout(() => {
      reloadTimer = null;
      void load();
    }, 1000);
  };

  const load = async () => {
    try {
      const mark = live.states.mark();
      const alertMark = firing.mark();
      const [r, snapshot] = await Promise.all([api.fleet(), api.alerts("firing").catch(() => [])]);
      firing.load(snapshot, alertMark);
      const worst = firing.byDevice();
      for (const d of r.devices) {
        const w = worst.get(d.device);
        d.alert = w?.severity;
        d.alerts = w?.count ?? 0;
      }
      serverSkew = r.now - Date.now();
      // Presences that arrived live while the request was in flight are newer.
      for (const d of r.devices) d.state = live.states.resolve(d.device, d.presence ?? d.state, mark);
      all = r.devices;
      byId = new Map(all.map((d) => [d.device, d]));
      recompute();
    } catch (e) {
      summary.textContent = `Cannot load the fleet: ${(e as Error).message}`;
    }
  };

  tbody.addEventListener("scroll", () => requestAnimationFrame(render));
  window.addEventListener("resize", render);
  window.addEventListener("resize", scheduleGrid);
  filter.addEventListener("input", recompute);
  stateSel.addEventListener("change", recompute);
  for (const el of root.querySelectorAll<HTMLElement>("[data-sort]")) {
    const go = () => {
      const k = el.dataset.sort as SortKey;
      asc = k === sortKey ? !asc : k === "device" || k === "attention";
      sortKey = k;
      recompute();
    };
    el.addEventListener("click", go);
    el.addEventListener("keydown", (e) => e.key === "Enter" && go());
  }

  live.subscribe(
    { devices: null, series: [], status: true, events: false },
    {
      status: (m) => {
        const d = byId.get(m.device);
        if (d) {
          if (m.state === "offline") d.state = "offline";
          d.last_seen = Math.max(d.last_seen, m.ts);
          scheduleRecompute();
        } else scheduleLoad();
      },
      presence: (m) => {
        const d = byId.get(m.device);
        if (d) {
          d.state = m.presence;
          scheduleRecompute();
        } else scheduleLoad();
      },
      // Alert chips and counts change at once, not at the next poll.
      alert: (m) => {
        firing.apply(m);
        const d = byId.get(m.device);
        if (d) {
          const w = firing.of(m.device);
          d.alert = w?.severity;
          d.alerts = w?.count ?? 0;
          scheduleRecompute();
        } else scheduleLoad();
      },
    },
  );
  void load();
  const poll = setInterval(load, POLL_MS);
  const tick = setInterval(render, 1000);
  return () => {
    clearInterval(poll);
    clearInterval(tick);
    window.removeEventListener("resize", render);
    window.removeEventListener("resize", scheduleGrid);
    if (gridFrame) cancelAnimationFrame(gridFrame);
    if (recomputeFrame) cancelAnimationFrame(recomputeFrame);
    if (reloadTimer) clearTimeout(reloadTimer);
  };
}

function fillRow(el: HTMLElement, d: FleetDevice, now: number) {
  const key = `${d.device}|${d.state}|${d.alert}|${d.alerts}|${d.last_seen}|${d.cpu}|${d.mem_pct}|${d.rejects}|${d.gaps}|${Math.floor(now / 1000)}`;
  if (el.dataset.key === key) return;
  el.dataset.key = key;
  el.dataset.device = d.device;
  el.setAttribute("href", `#/device/${encodeURIComponent(d.device)}`);
  const pct = (v: number | null) => (v === null ? "–" : `${v.toFixed(1)} %`);
  const spark = (p: [number, number][], cls: string) =>
    `<svg class="spark ${cls}" viewBox="0 0 80 24" preserveAspectRatio="none"><polyline points="${sparkPath(p, 80, 24)}"/></svg>`;
  el.innerHTML = `
    <div class="c-state"><span class="badge" data-state="${esc(d.state)}">${esc(d.state)}</span>${
      d.alert ? `<span class="alert" data-severity="${esc(d.alert)}" title="firing alerts">${d.alerts}</span>` : ""
    }</div>
    <div class="c-device"><b>${esc(d.device)}</b><small>${esc(d.host ?? "")}</small></div>
    <div class="c-seen">${relTime(d.last_seen, now)}</div>
    <div class="c-cpu"><span class="num">${pct(d.cpu)}</span>${spark(d.cpu_spark, "cpu")}</div>
    <div class="c-mem"><span class="num">${pct(d.mem_pct)}</span>${spark(d.mem_spark, "mem")}</div>
    <div class="c-rej ${d.rejects > 0 ? "warn" : ""}">${d.rejects}</div>
    <div class="c-gaps ${d.gaps > 0 ? "warn" : ""}">${d.gaps} / ${d.lost_samples}</div>`;
}

export function esc(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
