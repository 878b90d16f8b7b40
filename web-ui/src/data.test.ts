import { describe, expect, it } from "vitest";
import {
  Cursor,
  LiveStates,
  type FleetDevice,
  backoffDelay,
  filterFleet,
  formatValue,
  alertPeriods,
  groupSeries,
  initialRange,
  thresholdOf,
  mergePoints,
  rangeFor,
  relTime,
  sortFleet,
  sparkPath,
  toSeriesData,
  trimWindow,
  worstByDevice,
  FiringAlerts,
} from "./data";
import { fleetDevice } from "./fixtures";

describe("mergePoints", () => {
  it("appends newer points", () => {
    expect(mergePoints([[1, 1], [2, 2]], [[3, 3]])).toEqual([[1, 1], [2, 2], [3, 3]]);
  });
  it("keeps one point per timestamp, incoming wins, order kept", () => {
    const merged = mergePoints([[1, 1], [3, 3], [5, 5]], [[3, 30], [2, 2], [6, 6]]);
    expect(merged).toEqual([[1, 1], [2, 2], [3, 30], [5, 5], [6, 6]]);
  });
  it("collapses duplicates inside the incoming batch", () => {
    expect(mergePoints([], [[1, 1], [1, 2], [2, 3]])).toEqual([[1, 2], [2, 3]]);
  });
  it("history reloaded after live points does not duplicate them", () => {
    const live: [number, number][] = [[10, 1], [11, 2]];
    const history: [number, number][] = [[8, 0], [9, 0], [10, 1]];
    expect(mergePoints(history, live)).toEqual([[8, 0], [9, 0], [10, 1], [11, 2]]);
  });
});

describe("trimWindow", () => {
  it("drops points before the window only", () => {
    expect(trimWindow([[1, 1], [5, 5], [9, 9]], 5)).toEqual([[5, 5], [9, 9]]);
    const same: [number, number][] = [[7, 1]];
    expect(trimWindow(same, 5)).toBe(same);
    expect(trimWindow([[1, 1]], 5)).toEqual([]);
  });
});

describe("Cursor", () => {
  it("accepts increasing commits and rejects replays", () => {
    const c = new Cursor();
    expect(c.accept(5)).toBe(true);
    expect(c.accept(5)).toBe(false);
    expect(c.accept(4)).toBe(false);
    expect(c.accept(6)).toBe(true);
    expect(c.value).toBe(6);
  });
  it("hello after a replay never moves the cursor back", () => {
    const c = new Cursor();
    c.accept(10);
    c.hello(8);
    expect(c.value).toBe(10);
    c.hello(12);
    expect(c.value).toBe(12);
    expect(c.accept(11)).toBe(false);
  });
  it("a lost notice resets to the server's cursor", () => {
    const c = new Cursor();
    c.accept(3);
    c.reset(100);
    expect(c.accept(50)).toBe(false);
    expect(c.accept(101)).toBe(true);
  });
});

describe("toSeriesData", () => {
  it("uses raw points when there are no buckets", () => {
    expect(toSeriesData({ points: [[1, 2]] })).toEqual({ line: [[1, 2]], band: [] });
  });
  it("draws bucket averages with a min-max band", () => {
    const d = toSeriesData({ points: [], buckets: [{ ts: 0, min: 1, avg: 2, max: 4, count: 3 }] });
    expect(d.line).toEqual([[0, 2]]);
    expect(d.band).toEqual([[0, 1, 4]]);
  });
});

describe("ranges and formatting", () => {
  it("computes last-X ranges", () => {
    expect(rangeFor("5m", 1_000_000)).toEqual([700_000, 1_000_000]);
    expect(rangeFor("7d", 7 * 86_400_000)).toEqual([0, 7 * 86_400_000]);
  });
  it("formats relative times", () => {
    expect(relTime(0, 3_000)).toBe("3 s ago");
    expect(relTime(0, 5 * 60_000)).toBe("5 min ago");
    expect(relTime(0, 3 * 3_600_000)).toBe("3 h ago");
    expect(relTime(0, 4 * 86_400_000)).toBe("4 d ago");
    expect(relTime(10_000, 0)).toBe("0 s ago");
  });
  it("formats bytes and plain values", () => {
    expect(formatValue("mem.used_bytes", 1536)).toBe("1.5 KiB");
    expect(formatValue("mem.used_bytes", 3 * 1024 ** 3)).toBe("3.0 GiB");
    expect(formatValue("cpu.usage_pct", 12.345)).toBe("12.35 %");
    expect(formatValue("ingest_lag_ms", 7)).toBe("7 ms");
    expect(formatValue("system.uptime_s", 12.5)).toBe("12.50 s");
    expect(formatValue("temp.celsius{zone=cpu}", 41)).toBe("41 °C");
    expect(formatValue("x", 12000.5)).toBe("12001");
  });
  it("a device page opens on the range that holds its data", () => {
    expect(initialRange(1_000_000 - 60_000, 1_000_000)).toBe("5m");
    expect(initialRange(1_000_000 - 3_600_000 * 5, 1_000_000)).toBe("1h");
  });
  it("backoff grows to 10 s with bounded jitter", () => {
    expect(backoffDelay(0, () => 0)).toBe(375);
    expect(backoffDelay(0, () => 1)).toBe(625);
    expect(backoffDelay(3, () => 0.5)).toBe(4000);
    for (let a = 0; a < 30; a++) {
      const d = backoffDelay(a);
      expect(d).toBeGreaterThanOrEqual(375);
      expect(d).toBeLessThanOrEqual(12_500);
    }
  });
  it("orders charts cpu, mem, proc, then by name", () => {
    expect(groupSeries(["z.x", "proc.cpu_pct{process=a}", "mem.used_bytes", "app.req", "cpu.usage_pct"])).toEqual([
      "cpu.usage_pct",
      "mem.used_bytes",
      "proc.cpu_pct{process=a}",
      "app.req",
      "z.x",
    ]);
  });
  it("scales sparklines into the box", () => {
    expect(sparkPath([[0, 0], [10, 10]], 80, 24)).toBe("0.0,23.0 80.0,1.0");
    expect(sparkPath([], 80, 24)).toBe("");
  });
});

const dev = (device: string, state: string, cpu: number | null, host = ""): FleetDevice =>
  fleetDevice(device, { state, cpu, host });

describe("fleet sorting and filtering", () => {
  const list = [dev("b-10", "active", 50), dev("b-2", "offline", null, "rack-7"), dev("a", "active", 10)];
  it("sorts names naturally and numbers by value, missing last", () => {
    expect(sortFleet(list, "device", true).map((d) => d.device)).toEqual(["a", "b-2", "b-10"]);
    expect(sortFleet(list, "cpu", false).map((d) => d.device)).toEqual(["b-10", "a", "b-2"]);
    expect(sortFleet(list, "cpu", true).map((d) => d.device)).toEqual(["a", "b-10", "b-2"]);
  });
  it("filters by text across device and host, and by state", () => {
    expect(filterFleet(list, "RACK", "all").map((d) => d.device)).toEqual(["b-2"]);
    expect(filterFleet(list, "", "active").map((d) => d.device)).toEqual(["b-10", "a"]);
    expect(filterFleet([...list, dev("c", "stale", 5)], "", "stale").map((d) => d.device)).toEqual(["c"]);
    expect(filterFleet(list, "b-", "offline").map((d) => d.device)).toEqual(["b-2"]);
  });
});

describe("needs attention first", () => {
  it("firing alerts by severity, then stopped devices, then rejects, then names", () => {
    const list = [dev("ok-1", "active", 1), dev("stale-1", "stale", 1), dev("warn-1", "active", 1), dev("crit-1", "active", 1)];
    const worst = worstByDevice([
      { id: 1, rule: "r", device: "warn-1", series: "s", severity: "warning", state: "firing", value: 1, pending_ms: 0, firing_ms: 0, resolved_ms: null },
      { id: 2, rule: "r", device: "crit-1", series: "s", severity: "info", state: "firing", value: 1, pending_ms: 0, firing_ms: 0, resolved_ms: null },
      { id: 3, rule: "q", device: "crit-1", series: "s", severity: "critical", state: "firing", value: 1, pending_ms: 0, firing_ms: 0, resolved_ms: null },
      { id: 4, rule: "r", device: "ok-1", series: "s", severity: "critical", state: "resolved", value: 1, pending_ms: 0, firing_ms: 0, resolved_ms: 1 },
    ]);
    expect(worst.get("crit-1")).toEqual({ severity: "critical", count: 2 });
    expect(worst.has("ok-1")).toBe(false);
    for (const d of list) d.alert = worst.get(d.device)?.severity;
    expect(sortFleet(list, "attention", true).map((d) => d.device)).toEqual(["crit-1", "warn-1", "stale-1", "ok-1"]);
  });
});

describe("alerts on charts", () => {
  it("reads thresholds and clips alert periods to the range", () => {
    expect(thresholdOf("> 90")).toBe(90);
    expect(thresholdOf("<= -2.5")).toBe(-2.5);
    expect(thresholdOf("stale")).toBeNull();
    const a = (series: string, state: string, firing: number | null, resolved: number | null) => ({
      id: 1, rule: "r", device: "d", series, severity: "warning", state, value: 1, pending_ms: 0, firing_ms: firing, resolved_ms: resolved,
    });
    expect(
      alertPeriods([a("t", "resolved", 50, 150), a("t", "firing", 300, null), a("t", "pending", null, null), a("u", "firing", 10, null)], "t", 100, 400),
    ).toEqual([
      [100, 150],
      [300, 400],
    ]);
  });
});

describe("LiveStates", () => {
  it("a status received while a snapshot was in flight wins over the snapshot", () => {
    const b = new LiveStates();
    const mark = b.mark();
    b.note("d1", "offline");
    expect(b.resolve("d1", "online", mark)).toBe("offline");
  });
  it("a snapshot requested after the status is newer and wins", () => {
    const b = new LiveStates();
    b.note("d1", "offline");
    const mark = b.mark();
    expect(b.resolve("d1", "online", mark)).toBe("online");
  });
  it("devices without live statuses keep the snapshot state", () => {
    const b = new LiveStates();
    const mark = b.mark();
    b.note("d1", "offline");
    expect(b.resolve("d2", "online", mark)).toBe("online");
  });
  it("the latest live status counts", () => {
    const b = new LiveStates();
    const mark = b.mark();
    b.note("d1", "offline");
    b.note("d1", "online");
    expect(b.resolve("d1", "offline", mark)).toBe("online");
  });
});

describe("FiringAlerts", () => {
  const stored = (rule: string, device: string, severity: string) => ({
    id: 1,
    rule,
    device,
    series: "temp",
    severity,
    state: "firing",
    value: null,
    pending_ms: 0,
    firing_ms: 0,
    resolved_ms: null,
  });
  const push = (rule: string, device: string, severity: string, state: string) => ({
    rule,
    device,
    series: "temp",
    severity,
    state,
    at: 0,
    value: null,
  });

  it("a pushed firing counts at once and a pushed resolution removes it", () => {
    const f = new FiringAlerts();
    f.load([stored("hot", "a", "warning")], f.mark());
    expect(f.of("a")).toEqual({ severity: "warning", count: 1 });
    f.apply(push("cold", "a", "critical", "firing"));
    expect(f.of("a")).toEqual({ severity: "critical", count: 2 });
    f.apply(push("hot", "a", "warning", "resolved"));
    f.apply(push("cold", "a", "critical", "resolved"));
    expect(f.of("a")).toBeUndefined();
    expect(f.byDevice().size).toBe(0);
  });

  it("a push during a snapshot request wins over the older snapshot", () => {
    const f = new FiringAlerts();
    const mark = f.mark();
    // Resolved live while the request was in flight: the snapshot still lists it.
    f.apply(push("hot", "a", "warning", "resolved"));
    f.apply(push("hot", "b", "info", "firing"));
    f.load([stored("hot", "a", "warning")], mark);
    expect(f.of("a")).toBeUndefined();
    expect(f.of("b")).toEqual({ severity: "info", count: 1 });
    // A later snapshot (taken after those pushes) is the truth again.
    f.load([stored("hot", "a", "warning")], f.mark());
    expect(f.of("a")).toEqual({ severity: "warning", count: 1 });
    expect(f.of("b")).toBeUndefined();
  });
});
