// Device view: one chart per series, history from the API and live samples
// appended to the same chart, a range picker, zoom/pan, and the device's
// events on the timeline.
import { LineChart } from "echarts/charts";
import { DataZoomComponent, GridComponent, MarkAreaComponent, MarkLineComponent, TooltipComponent } from "echarts/components";
import * as echarts from "echarts/core";
import { CanvasRenderer } from "echarts/renderers";

import * as api from "./api";
import {
  type Alert,
  type Point,
  alertPeriods,
  thresholdOf,
  type RangeKey,
  RANGES,
  formatValue,
  groupSeries,
  initialRange,
  mergePoints,
  rangeFor,
  relTime,
  toSeriesData,
  trimWindow,
} from "./data";
import { esc } from "./fleet";
import type { Live } from "./live";

echarts.use([LineChart, GridComponent, TooltipComponent, DataZoomComponent, MarkLineComponent, MarkAreaComponent, CanvasRenderer]);

interface ChartState {
  key: string;
  el: HTMLElement;
  chart: echarts.ECharts;
  line: Point[];
  band: [number, number, number][];
  dirty: boolean;
}

type Range = { live: true; key: RangeKey } | { live: false; from: number; to: number };

export function mountDevice(root: HTMLElement, live: Live, id: string): () => void {
  root.innerHTML = `
    <section class="device">
      <div class="dev-head">
        <h1>${esc(id)}</h1>
        <span class="badge" id="dev-state" data-state="unknown">unknown</span>
        <dl id="dev-meta"></dl>
      </div>
      <div class="toolbar">
        <div class="ranges">
          ${(Object.keys(RANGES) as RangeKey[]).map((k) => `<button data-range="${k}">${k}</button>`).join("")}
        </div>
        <form class="custom" id="custom">
          <input type="datetime-local" id="from" aria-label="From" />
          <input type="datetime-local" id="to" aria-label="To" />
          <button type="submit">Apply</button>
        </form>
      </div>
      <div class="charts" id="charts"></div>
      <h2>Events</h2>
      <ul class="events" id="events"><li class="muted">No events in this range.</li></ul>
    </section>`;
  const chartsEl = root.querySelector<HTMLElement>("#charts")!;
  const stateEl = root.querySelector<HTMLElement>("#dev-state")!;
  const metaEl = root.querySelector<HTMLElement>("#dev-meta")!;
  const eventsEl = root.querySelector<HTMLUListElement>("#events")!;
  const charts = new Map<string, ChartState>();
  let range: Range = { live: true, key: "1h" };
  let rangeChosen = false;
  let events: api.AppEvent[] = [];
  let info: api.DeviceInfo | undefined;
  let firing: Alert[] = [];
  // Every alert of the device (for shading) and the thresholds by rule.
  let history: Alert[] = [];
  let thresholds = new Map<string, number>();
  let loadGen = 0;

  const window_ = (): [number, number] => (range.live ? rangeFor(range.key, Date.now()) : [range.from, range.to]);

  const setState = (s: string) => {
    stateEl.dataset.state = s;
    stateEl.textContent = s;
  };

  const showMeta = () => {
    if (!info) return;
    const now = Date.now();
    metaEl.innerHTML = `
      <dt>agent</dt><dd>${esc(info.agent ?? "–")}</dd>
      <dt>host</dt><dd>${esc(info.host ?? "–")}</dd>
      <dt>last seen</dt><dd>${relTime(info.last_seen, now)}</dd>
      <dt>rejects</dt><dd class="${info.rejects ? "warn" : ""}">${info.rejects}</dd>
      <dt>gaps / lost</dt><dd class="${info.gaps ? "warn" : ""}">${info.gaps} / ${info.lost_samples}</dd>
      <dt>alerts</dt><dd id="dev-alerts">${
        firing.length === 0
          ? "none firing"
          : firing
              .map(
                (a) =>
                  `<span class="alert" data-severity="${esc(a.severity)}" data-rule="${esc(a.rule)}">${esc(a.rule)}${
                    a.series ? ` · ${esc(a.series)}` : ""
                  }${a.value === null ? "" : ` = ${formatValue(a.series, a.value)}`}</span>`,
              )
              .join(" ")
      }</dd>`;
  };

  const chartFor = (key: string): ChartState => {
    let c = charts.get(key);
    if (c) return c;
    const el = document.createElement("div");
    el.className = "chart-card";
    el.innerHTML = `<h3>${esc(key)}<span class="last"></span></h3><div class="chart" data-series="${esc(key)}" data-points="0"></div>`;
    // Keep the grouped order when a series appears later.
    const order = groupSeries([...charts.keys(), key]);
    const next = order[order.indexOf(key) + 1];
    const before = next ? charts.get(next)?.el : undefined;
    chartsEl.insertBefore(el, before ?? null);
    const plot = el.querySelector<HTMLElement>(".chart")!;
    const chart = echarts.init(plot, "dark", { renderer: "canvas" });
    c = { key, el, chart, line: [], band: [], dirty: true };
    charts.set(key, c);
    chart.setOption(baseOption(key));
    return c;
  };

  const draw = (c: ChartState) => {
    const [from, to] = window_();
    if (range.live) {
      c.line = trimWindow(c.line, from);
      c.band = c.band.filter((b) => b[0] >= from);
    }
    const plot = c.el.querySelector<HTMLElement>(".chart")!;
    plot.dataset.points = String(c.line.length);
    // A constant series (a total, a limit) gets a compact chart.
    const flat = c.line.length > 1 && c.line.every((p) => p[1] === c.line[0][1]) && c.band.length === 0;
    if (c.el.classList.contains("flat") !== flat) {
      c.el.classList.toggle("flat", flat);
      c.chart.resize();
    }
    const last = c.line[c.line.length - 1];
    c.el.querySelector(".last")!.textContent = last ? formatValue(c.key, last[1]) : "";
    const ruleLines = [...new Set(history.filter((a) => a.series === c.key).map((a) => a.rule))]
      .filter((r) => thresholds.has(r))
      .map((r) => ({ yAxis: thresholds.get(r), name: r, lineStyle: { color: "#ff4d4f", type: "solid" } }));
    const periods = alertPeriods(history, c.key, from, to);
    plot.dataset.thresholds = String(ruleLines.length);
    plot.dataset.alertPeriods = String(periods.length);
    c.chart.setOption({
      xAxis: { min: from, max: range.live ? Math.max(to, last?.[0] ?? to) : to },
      series: [
        { id: "lo", data: c.band.map((b) => [b[0], b[1]]) },
        { id: "span", data: c.band.map((b) => [b[0], b[2] - b[1]]) },
        {
          id: "line",
          data: c.line,
          markLine: {
            silent: true,
            symbol: "none",
            label: { show: false },
            lineStyle: { color: "#f5a524", type: "dashed" },
            data: [
              ...events.filter((e) => e.ts >= from && e.ts <= to).slice(-50).map((e) => ({ xAxis: e.ts, name: e.event })),
              // The thresholds of the rules that alerted on this series.
              ...ruleLines,
            ],
          },
          // Shaded while an alert on this series fired.
          markArea: {
            silent: true,
            itemStyle: { color: "rgba(255, 77, 79, 0.15)" },
            data: periods.map(([s, e]) => [{ xAxis: s }, { xAxis: e }]),
          },
        },
      ],
    });
    c.dirty = false;
  };

  let frame = 0;
  const schedule = () => {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      for (const c of charts.values()) if (c.dirty) draw(c);
    });
  };

  const loadSeries = async (key: string, gen: number) => {
    const c = chartFor(key);
    const [from, to] = window_();
    const width = Math.max(200, c.el.clientWidth || 800);
    try {
      const r = await api.series(id, key, from, to, width);
      if (gen !== loadGen) return;
      const d = toSeriesData(r);
      // Live points that arrived while loading stay (merge, no duplicates).
      c.line = mergePoints(d.line, c.line.filter((p) => p[0] > (d.line.at(-1)?.[0] ?? -Infinity)));
      c.band = d.band;
      c.dirty = true;
      schedule();
    } catch (e) {
      console.warn(e);
    }
  };

  const renderEvents = () => {
    const [from, to] = window_();
    const shown = events.filter((e) => e.ts >= from && e.ts <= to).slice(-30).reverse();
    eventsEl.innerHTML = shown.length
      ? shown
          .map((e) => `<li><time>${new Date(e.ts).toLocaleString()}</time> <b>${esc(e.event)}</b> <code>${esc(JSON.stringify(e.body))}</code></li>`)
          .join("")
      : `<li class="muted">No events in this range.</li>`;
  };

  const loadAll = async () => {
    const gen = ++loadGen;
    for (const c of charts.values()) {
      c.line = [];
      c.band = [];
    }
    const mark = live.states.mark();
    info = await api.device(id).catch(() => undefined);
    if (gen !== loadGen) return;
    if (!info) {
      chartsEl.innerHTML = `<p class="empty">Device ${esc(id)} is not known (yet). <a href="#/">Back to the fleet</a></p>`;
      return;
    }
    // A status that arrived live while this request was in flight is newer.
    info.state = live.states.resolve(id, info.presence ?? info.state, mark);
    if (!rangeChosen && range.live) {
      // Fit the first view to the device's data; the user's choice wins after.
      rangeChosen = true;
      const fit = initialRange(info.first_seen, Date.now());
      if (fit !== range.key) {
        range = { live: true, key: fit };
        for (const b of root.querySelectorAll<HTMLButtonElement>("[data-range]")) {
          b.classList.toggle("active", b.dataset.range === fit);
        }
      }
    }
    [history, thresholds] = await Promise.all([
      api.alerts("", id).catch(() => []),
      api
        .rules()
        .then((rs) => new Map(rs.flatMap((r) => (thresholdOf(r.when) === null ? [] : [[r.name, thresholdOf(r.when) as number]]))))
        .catch(() => new Map<string, number>()),
    ]);
    firing = history.filter((a) => a.state === "firing");
    if (gen !== loadGen) return;
    setState(info.state);
    showMeta();
    const [from, to] = window_();
    events = await api.events(id, from, to).catch(() => []);
    renderEvents();
    await Promise.all(groupSeries(info.series).map((k) => loadSeries(k, gen)));
  };

  const setRange = (r: Range) => {
    range = r;
    for (const b of root.querySelectorAll<HTMLButtonElement>("[data-range]")) {
      b.classList.toggle("active", r.live && b.dataset.range === r.key);
    }
    void loadAll();
  };

  for (const b of root.querySelectorAll<HTMLButtonElement>("[data-range]")) {
    b.addEventListener("click", () => {
      rangeChosen = true;
      setRange({ live: true, key: b.dataset.range as RangeKey });
    });
  }
  root.querySelector<HTMLFormElement>("#custom")!.addEventListener("submit", (e) => {
    e.preventDefault();
    const from = Date.parse(root.querySelector<HTMLInputElement>("#from")!.value);
    const to = Date.parse(root.querySelector<HTMLInputElement>("#to")!.value);
    if (Number.isFinite(from) && Number.isFinite(to) && from < to) {
      rangeChosen = true;
      setRange({ live: false, from, to });
    }
  });

  live.subscribe(
    { devices: [id], series: null, status: true, events: true },
    {
      samples: (m) => {
        if (!range.live) return;
        for (const [key, pts] of Object.entries(m.series)) {
          const isNew = !charts.has(key);
          const c = chartFor(key);
          c.line = mergePoints(c.line, pts);
          c.dirty = true;
          if (isNew) void loadSeries(key, loadGen);
        }
        if (info) info.last_seen = Date.now();
        schedule();
      },
      status: (m) => {
        if (m.state !== "offline") return; // activity decides the rest
        setState("offline");
        if (info) info.state = "offline";
      },
      presence: (m) => {
        setState(m.presence);
        if (info) info.state = m.presence;
      },
      event: (m) => {
        events.push({ ts: m.ts, event: m.event, body: m.body });
        renderEvents();
        for (const c of charts.values()) c.dirty = true;
        schedule();
      },
      lost: () => void loadAll(),
    },
  );

  const onResize = () => charts.forEach((c) => c.chart.resize());
  window.addEventListener("resize", onResize);
  const tick = setInterval(() => {
    showMeta();
    if (range.live) {
      for (const c of charts.values()) c.dirty = true;
      schedule();
    }
  }, 1000);
  setRange({ live: true, key: "1h" });
  return () => {
    clearInterval(tick);
    window.removeEventListener("resize", onResize);
    charts.forEach((c) => c.chart.dispose());
  };
}

function baseOption(key: string): echarts.EChartsCoreOption {
  const fmt = (v: number) => formatValue(key, v);
  return {
    backgroundColor: "transparent",
    animation: false,
    grid: { left: 64, right: 16, top: 12, bottom: 56 },
    tooltip: {
      trigger: "axis",
      valueFormatter: (v: unknown) => (typeof v === "number" ? fmt(v) : String(v)),
    },
    xAxis: { type: "time", axisLine: { lineStyle: { color: "#556" } }, splitLine: { show: false } },
    yAxis: {
      type: "value",
      scale: true,
      axisLabel: { formatter: fmt },
      splitLine: { lineStyle: { color: "#2a2f3a" } },
    },
    dataZoom: [
      { type: "inside", filterMode: "none" },
      { type: "slider", height: 18, bottom: 8, filterMode: "none", borderColor: "#334" },
    ],
    series: [
      { id: "lo", type: "line", stack: "band", symbol: "none", lineStyle: { opacity: 0 }, tooltip: { show: false }, data: [] },
      {
        id: "span",
        type: "line",
        stack: "band",
        symbol: "none",
        lineStyle: { opacity: 0 },
        areaStyle: { color: "rgba(77, 171, 247, 0.18)" },
        tooltip: { show: false },
        data: [],
      },
      {
        id: "line",
        name: key,
        type: "line",
        symbol: "none",
        sampling: "lttb",
        lineStyle: { width: 2, color: "#4dabf7" },
        data: [],
      },
    ],
  };
}
