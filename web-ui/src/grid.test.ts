import { describe, expect, it } from "vitest";
import type { FleetDevice } from "./data";
import { fleetDevice } from "./fixtures";
import { cellColour, cellSize, groupKey, hit, layout } from "./grid";

const dev = (device: string, state = "active", host: string | null = null): FleetDevice =>
  fleetDevice(device, { state, host, cpu: 50 });

describe("fleet grid", () => {
  it("groups by id prefix or host", () => {
    expect(groupKey(dev("line-1-07"), "prefix")).toBe("line-1");
    expect(groupKey(dev("solo"), "prefix")).toBe("solo");
    expect(groupKey(dev("a", "active", "rack-7"), "host")).toBe("rack-7");
    expect(groupKey(dev("a"), "host")).toBe("(no host)");
  });
  it("colours alerts over presence, and metrics without a value grey", () => {
    expect(cellColour({ ...dev("a"), alert: "critical" }, "health")).toBe("#ff4d4f");
    expect(cellColour(dev("a", "stale"), "health")).toBe("#b38a2e");
    expect(cellColour(dev("a"), "mem_pct")).toBe("#3a3f4a");
    expect(cellColour(dev("a"), "cpu")).toMatch(/^hsl\(60,/);
  });
  it("lays out 10,000 cells in rows, groups with headers, and hits the right one", () => {
    const many = Array.from({ length: 10_000 }, (_, i) => dev(`hall-${i % 4}-${i}`));
    expect(cellSize(many.length)).toBe(6);
    const l = layout(many, 1600, "none");
    expect(l.cells.length).toBe(10_000);
    const perRow = Math.floor((1600 + 2) / (6 + 2));
    expect(l.height).toBe(Math.ceil(10_000 / perRow) * 8);
    const c = l.cells[perRow + 3];
    expect(hit(l, c.x + 1, c.y + 1)?.index).toBe(perRow + 3);
    expect(hit(l, c.x + 6.5, c.y + 1)).toBeUndefined();
    const g = layout(many, 1600, "prefix");
    expect(g.headers.map((h) => [h.label, h.count])).toEqual([
      ["hall-0", 2500],
      ["hall-1", 2500],
      ["hall-2", 2500],
      ["hall-3", 2500],
    ]);
  });
});
