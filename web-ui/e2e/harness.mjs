// Helpers shared by the browser tests and benchmarks: free loopback ports
// and waiting on a condition with a deadline (never sleeping as
// synchronisation).
import net from "node:net";

/** A loopback port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Polls `check` every `every` ms until it returns a truthy value, or fails
 * after `ms` naming `what` and the last error. */
export async function waitFor(what, ms, check, every = 100) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? ` (${last.message})` : ""}`);
    await new Promise((r) => setTimeout(r, every));
  }
}
