// The fleet grid: one cell per device on a canvas (10,000 devices are
// 10,000 rectangles, not 10,000 DOM nodes), coloured by health or by a
// metric, grouped by id prefix or host, in the table's order (needs
// attention first). Hover shows the device's values; a click opens it.
import type { FleetDevice } from "./data";

export type ColourBy = "health" | "cpu" | "mem_pct";
export type GroupBy = "none" | "prefix" | "host";

/** Cell size for a fleet of `n`: a wall of 10,000 fits one screen. */
export function cellSize(n: number): number {
  return n > 4000 ? 6 : n > 1000 ? 9 : 12;
}
const GAP = 2;
const HEADER = 18;

/** The group of a device: its id up to the last `-`, `_` or `.` (line-1-07
 * → line-1), or its host. */
export function groupKey(d: FleetDevice, by: GroupBy): string {
  if (by === "host") return d.host || "(no host)";
  if (by === "prefix") {
    const i = Math.max(d.device.lastIndexOf("-"), d.device.lastIndexOf("_"), d.device.lastIndexOf("."));
    return i > 0 ? d.device.slice(0, i) : d.device;
  }
  return "";
}

/** A cell's colour: health (alerts first, then presence), or a metric on a
 * green → amber → red scale (grey without a value). */
export function cellColour(d: FleetDevice, by: ColourBy): string {
  if (by === "health") {
    if (d.alert === "critical") return "#ff4d4f";
    if (d.alert === "warning") return "#f5a524";
    if (d.state === "offline" || d.state === "silent") return "#8b2f3a";
    if (d.state === "stale") return "#b38a2e";
    if (d.rejects > 0 || d.gaps > 0) return "#6f7bd9";
    return d.state === "active" ? "#2fa36b" : "#555b66";
  }
  const v = d[by];
  if (v === null || v === undefined) return "#3a3f4a";
  const t = Math.max(0, Math.min(1, v / 100));
  // 0 → green (120°), 1 → red (0°).
  return `hsl(${Math.round(120 - 120 * t)}, 65%, ${Math.round(38 + 10 * t)}%)`;
}

export interface Placed {
  x: number;
  y: number;
  index: number;
}

export interface Layout {
  cell: number;
  cells: Placed[];
  headers: { x: number; y: number; label: string; count: number }[];
  height: number;
}

/** Places the cells of `view` in rows `width` pixels wide, a header line
 * before each group (groups in order of first appearance). */
export function layout(view: FleetDevice[], width: number, by: GroupBy): Layout {
  const CELL = cellSize(view.length);
  const perRow = Math.max(1, Math.floor((width + GAP) / (CELL + GAP)));
  const groups = new Map<string, number[]>();
  view.forEach((d, i) => {
    const g = groupKey(d, by);
    let list = groups.get(g);
    if (!list) groups.set(g, (list = []));
    list.push(i);
  });
  const cells: Placed[] = [];
  const headers: Layout["headers"] = [];
  let y = 0;
  for (const [label, idx] of groups) {
    if (by !== "none") {
      headers.push({ x: 0, y, label, count: idx.length });
      y += HEADER;
    }
    idx.forEach((index, k) => {
      cells.push({ x: (k % perRow) * (CELL + GAP), y: y + Math.floor(k / perRow) * (CELL + GAP), index });
    });
    y += Math.ceil(idx.length / perRow) * (CELL + GAP) + (by === "none" ? 0 : 6);
  }
  return { cell: CELL, cells, headers, height: Math.max(y, CELL) };
}

/** The cell under (x, y), if any. */
export function hit(l: Layout, x: number, y: number): Placed | undefined {
  // Cells are in rows; a linear scan of 10,000 is well under a millisecond.
  const s = l.cell;
  return l.cells.find((c) => x >= c.x && x < c.x + s && y >= c.y && y < c.y + s);
}

/** Draws `view` on `canvas`; returns the layout for hit testing. */
export function draw(
  canvas: HTMLCanvasElement,
  view: FleetDevice[],
  colourBy: ColourBy,
  groupBy: GroupBy,
): Layout {
  const width = Math.max(64, canvas.parentElement?.clientWidth ?? 800);
  const l = layout(view, width, groupBy);
  const dpr = window.devicePixelRatio || 1;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${l.height}px`;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(l.height * dpr);
  const ctx = canvas.getContext("2d");
  if (!ctx) return l;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, l.height);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#9aa3b2";
  for (const h of l.headers) ctx.fillText(`${h.label} (${h.count})`, h.x, h.y + 13);
  // Batch by colour: one fillStyle change per colour, not per cell.
  const byColour = new Map<string, Placed[]>();
  for (const c of l.cells) {
    const col = cellColour(view[c.index], colourBy);
    let list = byColour.get(col);
    if (!list) byColour.set(col, (list = []));
    list.push(c);
  }
  for (const [col, list] of byColour) {
    ctx.fillStyle = col;
    for (const c of list) ctx.fillRect(c.x, c.y, l.cell, l.cell);
  }
  canvas.dataset.cells = String(l.cells.length);
  return l;
}
