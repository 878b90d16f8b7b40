// Test fixtures shared by the unit tests.
import type { FleetDevice } from "./data";

/** A fleet row with neutral values, overridden by `more`. */
export const fleetDevice = (device: string, more: Partial<FleetDevice> = {}): FleetDevice => ({
  device,
  state: "active",
  last_seen: 0,
  agent: null,
  host: null,
  rejects: 0,
  gaps: 0,
  lost_samples: 0,
  series_count: 0,
  cpu: null,
  mem_pct: null,
  cpu_spark: [],
  mem_spark: [],
  ...more,
});
