// The HTTP API (same origin, paths relative to the page so a path prefix
// works).
import type { Alert, Bucket, FleetDevice, Point } from "./data";

export interface DeviceInfo {
  device: string;
  /** The retained status; the device view replaces it with `presence`. */
  state: string;
  /** active | stale | silent | offline (the server's presence). */
  presence?: string;
  interval_ms?: number | null;
  session: string | null;
  agent: string | null;
  host: string | null;
  first_seen: number;
  last_seen: number;
  rejects: number;
  gaps: number;
  lost_samples: number;
  series: string[];
}

export interface SeriesResponse {
  device: string;
  series: string;
  from: number;
  to: number;
  source: string;
  points: Point[];
  bucket_ms?: number;
  buckets?: Bucket[];
}

export interface AppEvent {
  ts: number;
  event: string;
  body: Record<string, unknown>;
}

async function getJson<T>(path: string): Promise<T> {
  const r = await fetch(path, { headers: { accept: "application/json" } });
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    const msg = body?.error?.message ?? `${r.status} ${r.statusText}`;
    throw new Error(`${path}: ${msg}`);
  }
  return body as T;
}

/** Alerts in `state` (firing, open, …; "" for all), newest first. */
export async function alerts(state: string, device?: string): Promise<Alert[]> {
  const q = new URLSearchParams({ limit: "10000" });
  if (state) q.set("state", state);
  if (device) q.set("device", device);
  return (await getJson<{ alerts: Alert[] }>(`api/v1/alerts?${q}`)).alerts;
}

/** A rule as `api/v1/rules` lists it. */
export interface RuleInfo {
  name: string;
  devices: string;
  series?: string | null;
  when: string;
  severity: string;
}

export async function rules(): Promise<RuleInfo[]> {
  return (await getJson<{ rules: RuleInfo[] }>("api/v1/rules")).rules;
}

export function fleet(): Promise<{ now: number; devices: FleetDevice[] }> {
  return getJson("api/v1/fleet");
}

export async function device(id: string): Promise<DeviceInfo | undefined> {
  const all = await getJson<DeviceInfo[]>("api/v1/devices");
  return all.find((d) => d.device === id);
}

export function series(
  device: string,
  key: string,
  from: number,
  to: number,
  maxPoints: number,
): Promise<SeriesResponse> {
  const q = new URLSearchParams({
    device,
    series: key,
    from: String(Math.floor(from)),
    to: String(Math.floor(to)),
    max_points: String(Math.max(2, Math.min(100_000, Math.floor(maxPoints)))),
  });
  return getJson(`api/v1/series?${q}`);
}

export async function events(device: string, from: number, to: number): Promise<AppEvent[]> {
  const q = new URLSearchParams({
    device,
    from: String(Math.floor(from)),
    to: String(Math.floor(to)),
    limit: "500",
  });
  const r = await getJson<{ events: AppEvent[] }>(`api/v1/events?${q}`);
  return r.events;
}
