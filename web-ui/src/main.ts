// Entry point: hash routing between the fleet and device views, one live
// connection for the page, and its state in the header.
import "./style.css";
import { esc, mountFleet } from "./fleet";
import { Live } from "./live";

const app = document.getElementById("app")!;
const conn = document.getElementById("conn")!;
const crumbs = document.getElementById("crumbs")!;
const live = new Live();
live.onState = (s) => {
  conn.dataset.conn = s;
  conn.textContent = s === "live" ? "● live" : s === "connecting" ? "connecting…" : "reconnecting…";
};

let unmount: (() => void) | null = null;
let routes = 0;

function route() {
  unmount?.();
  unmount = null;
  const gen = ++routes;
  const m = location.hash.match(/^#\/device\/(.+)$/);
  if (m) {
    const id = decodeURIComponent(m[1]);
    crumbs.innerHTML = `<a href="#/">Fleet</a> / <span>${esc(id)}</span>`;
    // The device view (and ECharts, most of the JavaScript) loads only
    // when a device is opened: the fleet of a wall screen renders sooner.
    void import("./device").then(({ mountDevice }) => {
      if (gen === routes) unmount = mountDevice(app, live, id);
    });
  } else {
    crumbs.innerHTML = `<span>Fleet</span>`;
    unmount = mountFleet(app, live);
  }
}

window.addEventListener("hashchange", route);
route();
