// Pure data handling for the dashboard (no DOM): merging history with live
// points, sliding windows, the live cursor, ranges, fleet sorting and
// filtering, formatting, reconnect backoff. Unit-tested in data.test.ts.

export type Point = [number, number];

export interface Bucket {
  ts: number;
  min: number;
  avg: number;
  max: number;
  count: number;
}

/** Chart data of one series: the line plus an optional min–max band. */
export interface SeriesData {
  line: Point[];
  /** [ts, min, max] per bucket when the history was downsampled. */
  band: [number, number, number][];
}

/**
 * Merges `incoming` points into `existing` (both ascending by time): one
 * point per timestamp (the incoming value wins), ascending order kept.
 */
export function mergePoints(existing: Point[], incoming: Point[]): Point[] {
  if (incoming.length === 0) return existing;
  const last = existing.length ? existing[existing.length - 1][0] : -Infinity;
  const sorted = isSorted(incoming) ? incoming : [...incoming].sort((a, b) => a[0] - b[0]);
  // Fast path: everything new is after what we have (live appends).
  if (sorted[0][0] > last) {
    const out = existing.concat(dedupe(sorted));
    return out;
  }
  const map = new Map<number, number>();
  for (const [t, v] of existing) map.set(t, v);
  for (const [t, v] of sorted) map.set(t, v);
  return [...map.entries()].sort((a, b) => a[0] - b[0]);
}

function isSorted(p: Point[]): boolean {
  for (let i = 1; i < p.length; i++) if (p[i][0] < p[i - 1][0]) return false;
  return true;
}

function dedupe(p: Point[]): Point[] {
  const out: Point[] = [];
  for (const pt of p) {
    if (out.length && out[out.length - 1][0] === pt[0]) out[out.length - 1] = pt;
    else out.push(pt);
  }
  return out;
}

/** Drops points older than `from` (a sliding "last X" window). */
export function trimWindow(points: Point[], from: number): Point[] {
  let i = 0;
  while (i < points.length && points[i][0] < from) i++;
  return i === 0 ? points : points.slice(i);
}

/** Turns an API answer (`points` or `buckets`) into chart data. */
export function toSeriesData(resp: { points?: Point[]; buckets?: Bucket[] }): SeriesData {
  if (resp.buckets && resp.buckets.length) {
    return {
      line: resp.buckets.map((b) => [b.ts, b.avg] as Point),
      band: resp.buckets.map((b) => [b.ts, b.min, b.max] as [number, number, number]),
    };
  }
  return { line: resp.points ?? [], band: [] };
}

/**
 * The live cursor: the highest commit id received (or announced by
 * `hello`). Commits at or below it are duplicates and are ignored.
 */
export class Cursor {
  value: number | null = null;

  /** Records a `hello` cursor. */
  hello(c: number): void {
    this.value = this.value === null ? c : Math.max(this.value, c);
  }

  /** Returns true when `commit` is new (and advances the cursor). */
  accept(commit: number): boolean {
    if (this.value !== null && commit <= this.value) return false;
    this.value = commit;
    return true;
  }

  /** After a `lost` message the server continues from its cursor. */
  reset(c: number): void {
    this.value = c;
  }
}

/**
 * Presences (and offline statuses) received live, kept so that a snapshot fetched from
 * the API (which can be up to a second old: the server shares fleet-wide
 * answers) never overwrites a newer live status. Take a `mark()` before
 * sending the request; `resolve` keeps the live state of every device whose
 * status arrived after that mark.
 */
export class LiveStates {
  private clock = 0;
  private latest = new Map<string, { state: string; at: number }>();

  /** Records a live status message. */
  note(device: string, state: string): void {
    this.latest.set(device, { state, at: ++this.clock });
  }

  /** A point in the sequence of live messages, taken before a request. */
  mark(): number {
    return this.clock;
  }

  /** The state to show for a snapshot state requested at `mark`. */
  resolve(device: string, snapshotState: string, mark: number): string {
    const l = this.latest.get(device);
    return l && l.at > mark ? l.state : snapshotState;
  }
}

export type RangeKey = "5m" | "1h" | "24h" | "7d";

export const RANGES: Record<RangeKey, number> = {
  "5m": 5 * 60_000,
  "1h": 3_600_000,
  "24h": 86_400_000,
  "7d": 7 * 86_400_000,
};

/** The range a device page opens on: the shortest that holds the
 * device's data since `firstSeen` (up to 1 h, so a new device's few
 * minutes fill the chart instead of its last pixels). */
export function initialRange(firstSeen: number, now: number): RangeKey {
  return now - firstSeen <= RANGES["5m"] ? "5m" : "1h";
}

/** [from, to] for a "last X" range ending at `now`. */
export function rangeFor(key: RangeKey, now: number): [number, number] {
  return [now - RANGES[key], now];
}

/** Exponential backoff with jitter: 0.5 s doubling to 10 s, ±25 %. */
export function backoffDelay(attempt: number, random: () => number = Math.random): number {
  const base = Math.min(10_000, 500 * 2 ** Math.max(0, attempt));
  return Math.round(base * (0.75 + 0.5 * random()));
}

/** "3 s ago", "5 min ago", "2 h ago", "4 d ago". */
export function relTime(ts: number, now: number): string {
  const s = Math.max(0, Math.round((now - ts) / 1000));
  if (s < 60) return `${s} s ago`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ago`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ago`;
  return `${Math.floor(h / 24)} d ago`;
}

export interface FleetDevice {
  device: string;
  /** The retained status (online/offline/unknown); views replace it with
   * `presence` when they load. */
  state: string;
  /** active | stale | silent | offline (the server's presence). */
  presence?: string;
  interval_ms?: number | null;
  /** The worst severity among its firing alerts, and how many fire. */
  alert?: string;
  alerts?: number;
  last_seen: number;
  agent: string | null;
  host: string | null;
  rejects: number;
  gaps: number;
  lost_samples: number;
  series_count: number;
  cpu: number | null;
  mem_pct: number | null;
  cpu_spark: Point[];
  mem_spark: Point[];
}

export type SortKey = "device" | "state" | "last_seen" | "cpu" | "mem_pct" | "rejects" | "attention";

/** A stored alert (`api/v1/alerts`). */
export interface Alert {
  id: number;
  rule: string;
  device: string;
  series: string;
  severity: string;
  state: string;
  value: number | null;
  pending_ms: number;
  firing_ms: number | null;
  resolved_ms: number | null;
}

const SEVERITY: Record<string, number> = { critical: 3, warning: 2, info: 1 };

/** Natural order (b-2 before b-10), one collator for every comparison:
 * `localeCompare` with options builds one per call, 10x slower. */
const NATURAL = new Intl.Collator(undefined, { numeric: true });

/** The number of a threshold condition (`> 90` → 90); null for presence
 * rules. */
export function thresholdOf(when: string): number | null {
  const m = /^\s*(>=|<=|>|<)\s*(-?[0-9.eE+-]+)\s*$/.exec(when);
  const n = m ? Number(m[2]) : NaN;
  return Number.isFinite(n) ? n : null;
}

/** Shaded periods of a series' alerts in [from, to]: [start, end] of each,
 * from when it fired (or went pending) to when it resolved (or `to`). */
export function alertPeriods(alerts: Alert[], series: string, from: number, to: number): [number, number][] {
  return alerts
    .filter((a) => a.series === series && a.state !== "pending")
    .map((a): [number, number] => [a.firing_ms ?? a.pending_ms, a.resolved_ms ?? to])
    .filter(([s, e]) => e >= from && s <= to)
    .map(([s, e]) => [Math.max(s, from), Math.min(e, to)]);
}

/** Per device: the worst severity of its firing alerts and their count. */
export function worstByDevice<A extends Pick<Alert, "device" | "severity" | "state">>(
  alerts: A[],
): Map<string, { severity: string; count: number }> {
  const out = new Map<string, { severity: string; count: number }>();
  for (const a of alerts) {
    if (a.state !== "firing") continue;
    const w = out.get(a.device);
    if (!w) out.set(a.device, { severity: a.severity, count: 1 });
    else {
      w.count += 1;
      if ((SEVERITY[a.severity] ?? 0) > (SEVERITY[w.severity] ?? 0)) w.severity = a.severity;
    }
  }
  return out;
}

/** An alert transition pushed on the live stream (`{"type":"alert"}`). */
export interface AlertMsg {
  rule: string;
  device: string;
  series: string;
  severity: string;
  /** firing | resolved */
  state: string;
  at: number;
  value: number | null;
}

/** The firing alerts the fleet page shows: an `api/v1/alerts?state=firing`
 * snapshot, updated at once by the live stream's alert messages. A push
 * that arrived while a snapshot was in flight is newer than it, so
 * `load(snapshot, mark)` applies it again (like `LiveStates`). */
export class FiringAlerts {
  private firing = new Map<string, { device: string; severity: string }>();
  /** Latest push per alert, with its arrival number. */
  private pushes = new Map<string, { n: number; msg: AlertMsg }>();
  private n = 0;

  private static key(a: { rule: string; device: string; series: string }): string {
    return `${a.rule}\u0000${a.device}\u0000${a.series}`;
  }

  /** Call before requesting a snapshot; pass the result to `load`. */
  mark(): number {
    return this.n;
  }

  load(snapshot: Alert[], mark: number): void {
    this.firing.clear();
    for (const a of snapshot) {
      if (a.state === "firing") this.firing.set(FiringAlerts.key(a), { device: a.device, severity: a.severity });
    }
    for (const [k, p] of this.pushes) {
      if (p.n > mark) this.set(p.msg);
      else this.pushes.delete(k);
    }
  }

  /** A pushed transition. */
  apply(msg: AlertMsg): void {
    this.pushes.set(FiringAlerts.key(msg), { n: ++this.n, msg });
    this.set(msg);
  }

  private set(msg: AlertMsg): void {
    const k = FiringAlerts.key(msg);
    if (msg.state === "firing") this.firing.set(k, { device: msg.device, severity: msg.severity });
    else this.firing.delete(k);
  }

  /** The worst severity of each device's firing alerts and their count. */
  byDevice(): Map<string, { severity: string; count: number }> {
    return worstByDevice([...this.firing.values()].map((f) => ({ ...f, state: "firing" })));
  }

  /** The same for one device (undefined: none firing). */
  of(device: string): { severity: string; count: number } | undefined {
    return worstByDevice([...this.firing.values()].filter((f) => f.device === device).map((f) => ({ ...f, state: "firing" }))).get(device);
  }
}

/** How much a device needs attention: firing alerts by severity, then a
 * device that stopped sending, then rejects or gaps. Higher first. */
export function attention(d: FleetDevice): number {
  const alert = (SEVERITY[d.alert ?? ""] ?? 0) * 100;
  const state = d.state === "silent" || d.state === "offline" ? 30 : d.state === "stale" ? 20 : 0;
  return alert + state + (d.rejects > 0 || d.gaps > 0 ? 5 : 0);
}

/** Sorts a copy; missing numbers sort last in either direction. "attention"
 * puts the devices that need it first (ascending), then by name. */
export function sortFleet(list: FleetDevice[], key: SortKey, asc: boolean): FleetDevice[] {
  const dir = asc ? 1 : -1;
  const name = NATURAL.compare;
  if (key === "attention") {
    // Scores once per device, not once per comparison (10,000 devices).
    const score = new Map(list.map((d) => [d, attention(d)]));
    return [...list].sort((a, b) => ((score.get(b) ?? 0) - (score.get(a) ?? 0)) * dir || name(a.device, b.device));
  }
  return [...list].sort((a, b) => {
    const x = a[key];
    const y = b[key];
    if (x === y) return name(a.device, b.device);
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    if (typeof x === "number" && typeof y === "number") return (x - y) * dir;
    return name(String(x), String(y)) * dir;
  });
}

/** The presences, in the order the fleet counts them. */
export const PRESENCES = ["active", "stale", "silent", "offline"] as const;
export type PresenceFilter = "all" | (typeof PRESENCES)[number];

/** Filters by a case-insensitive text (device, host, agent) and a state. */
export function filterFleet(list: FleetDevice[], text: string, state: PresenceFilter): FleetDevice[] {
  const t = text.trim().toLowerCase();
  return list.filter((d) => {
    if (state !== "all" && d.state !== state) return false;
    if (!t) return true;
    return [d.device, d.host ?? "", d.agent ?? ""].some((s) => s.toLowerCase().includes(t));
  });
}

/** Chart order on a device page: cpu, mem, proc.*, then the rest by name. */
export function groupSeries(keys: string[]): string[] {
  const rank = (k: string) =>
    k.startsWith("cpu.") ? 0 : k.startsWith("mem.") ? 1 : k.startsWith("proc.") ? 2 : 3;
  return [...keys].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

/** SVG polyline points for a sparkline of `w`×`h` pixels. */
export function sparkPath(points: Point[], w: number, h: number): string {
  if (points.length === 0) return "";
  const t0 = points[0][0];
  const t1 = points[points.length - 1][0];
  let lo = Infinity;
  let hi = -Infinity;
  for (const [, v] of points) {
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  const dt = t1 - t0 || 1;
  const dv = hi - lo || 1;
  return points
    .map(([t, v]) => {
      const x = points.length === 1 ? w : ((t - t0) / dt) * w;
      const y = h - ((v - lo) / dv) * (h - 2) - 1;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    })
    .join(" ");
}

/** Human-friendly value: bytes in KiB/MiB/GiB for *_bytes series. */
export function formatValue(series: string, v: number): string {
  if (series.includes("bytes")) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let x = Math.abs(v);
    while (x >= 1024 && i < units.length - 1) {
      x /= 1024;
      i++;
    }
    return `${(Math.sign(v) * x).toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  // The unit from the name's convention (`cpu.usage_pct`, `…_ms`, `…_s`).
  const name = series.split("{")[0];
  const unit = /(_|\.)pct$/.test(name)
    ? " %"
    : /_ms$/.test(name)
      ? " ms"
      : /(_s|_seconds)$/.test(name)
        ? " s"
        : /celsius$/.test(name)
          ? " °C"
          : "";
  if (Math.abs(v) >= 1000 || Number.isInteger(v)) return v.toFixed(0) + unit;
  return v.toFixed(2) + unit;
}
