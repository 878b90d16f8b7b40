// The live connection (`api/v1/live` websocket): one socket for the page,
// reconnecting with backoff and resuming from its cursor, so no committed
// sample is missed or received twice across reconnects.
import { type AlertMsg, Cursor, LiveStates, backoffDelay, type Point } from "./data";

export interface Subscription {
  devices: string[] | null;
  series: string[] | null;
  status: boolean;
  events: boolean;
}

export interface SamplesMsg {
  type: "samples";
  commit: number;
  device: string;
  seq: number;
  series: Record<string, Point[]>;
}

export interface Handlers {
  samples?(m: SamplesMsg): void;
  status?(m: { device: string; state: string; ts: number }): void;
  /** A device's presence changed (active, stale, silent, offline). */
  presence?(m: { device: string; presence: string; ts: number }): void;
  event?(m: { device: string; ts: number; event: string; body: Record<string, unknown> }): void;
  /** An alert fired or resolved (sent with `status`). */
  alert?(m: AlertMsg): void;
  /** The server dropped data for us: reload visible history. */
  lost?(): void;
}

export type ConnState = "connecting" | "live" | "reconnecting";

export class Live {
  private ws: WebSocket | null = null;
  private sub: Subscription | null = null;
  private handlers: Handlers = {};
  private cursor = new Cursor();
  private attempt = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private stopped = false;
  onState: (s: ConnState) => void = () => {};
  /** Every presence (and offline status) received, so views can tell whether an
   * API snapshot is older than what arrived live. */
  readonly states = new LiveStates();

  constructor(private url: string = Live.defaultUrl()) {}

  static defaultUrl(): string {
    const u = new URL("api/v1/live", location.href);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    u.hash = "";
    return u.toString();
  }

  /** Replaces the subscription; live data starts from now (fresh cursor). */
  subscribe(sub: Subscription, handlers: Handlers): void {
    this.sub = sub;
    this.handlers = handlers;
    this.cursor = new Cursor();
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.send(false);
    else this.connect();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.ws?.close();
  }

  private send(resume: boolean): void {
    if (!this.ws || !this.sub) return;
    const since = resume ? this.cursor.value : null;
    this.ws.send(JSON.stringify({ subscribe: { ...this.sub, since } }));
  }

  private connect(): void {
    if (this.stopped || (this.ws && this.ws.readyState <= WebSocket.OPEN)) return;
    this.onState(this.attempt === 0 ? "connecting" : "reconnecting");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      // Resume from the cursor if we had one: the server replays what we
      // missed, then continues live.
      this.send(this.cursor.value !== null);
    };
    ws.onmessage = (e) => this.dispatch(String(e.data));
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) return;
      this.onState("reconnecting");
      const delay = backoffDelay(this.attempt++);
      this.timer = setTimeout(() => this.connect(), delay);
    };
    ws.onerror = () => ws.close();
  }

  private dispatch(text: string): void {
    let m: { type?: string; [k: string]: unknown };
    try {
      m = JSON.parse(text);
    } catch {
      return;
    }
    switch (m.type) {
      case "hello":
        this.cursor.hello(m.cursor as number);
        this.onState("live");
        break;
      case "samples":
        if (this.cursor.accept(m.commit as number)) this.handlers.samples?.(m as unknown as SamplesMsg);
        break;
      case "status":
        // An offline status is the presence at once; online waits for the
        // server's presence (activity decides).
        if (m.state === "offline") this.states.note(m.device as string, "offline");
        this.handlers.status?.(m as never);
        break;
      case "presence":
        this.states.note(m.device as string, m.presence as string);
        this.handlers.presence?.(m as never);
        break;
      case "event":
        this.handlers.event?.(m as never);
        break;
      case "alert":
        this.handlers.alert?.(m as unknown as AlertMsg);
        break;
      case "lost":
        this.cursor.reset(m.cursor as number);
        this.handlers.lost?.();
        break;
      case "error":
        console.warn("live subscription refused:", m.message);
        break;
    }
  }
}
