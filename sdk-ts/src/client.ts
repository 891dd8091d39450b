/**
 * One device's live, self-healing view of one session over protocol v1 (DESIGN §3, §5); mirrors client/sdk.py.
 *
 * `connect()` joins with `hello`, keeps the replica current, and hides reconnects: after a drop it resumes from its
 * epoch + version (the server replays or sends full state) and retransmits unacknowledged requests with their
 * original ids, which the server answers idempotently, so an op is neither lost nor applied twice and its promise
 * settles once. Event-driven on the standard WebSocket API and timers only: no Node API, no polling.
 */

import { Codec, DecodeError, type Frame, loadMsgpack } from "./codec.js";
import { FINAL_CLOSE_CODES, SessionError } from "./errors.js";
import { applyOps, checkOps } from "./ops.js";
import { Replica, ResyncNeeded } from "./replica.js";
import type {
  ChangeInfo,
  ConnectOptions,
  Device,
  Json,
  Op,
  QueuedRequest,
  SessionClient,
  SessionEventName,
  SessionEvents,
  Status,
  WebSocketConstructor,
  WebSocketLike,
} from "./types.js";
import { backoffDelay, clearTimer, setTimer, tokenExpiry } from "./util.js";

/** An ack ahead of a missing patch waits this long for the gap to fill, then the client resyncs. */
export const HOLD_TIMEOUT_MS = 2000;
const AUTH_TIMEOUT_MS = 10000;
const OPEN = 1;

/** The highest request id issued per device id in this JS realm (ids must only grow per device). */
const lastIds = new Map<string, number>();

interface Request {
  id: number;
  frame: Frame;
  ops: Op[] | null; // null for pause/claim
  resolve: ((r: { version: number }) => void) | null; // null once settled, or for requests loaded from the store
  reject: ((e: SessionError) => void) | null;
  timer: unknown;
}

interface AuthWaiter {
  resolve: (exp: number) => void;
  reject: (e: SessionError) => void;
  timer: unknown;
}

interface Outcome {
  code?: number;
  reason: string;
  resync?: boolean;
  resume?: boolean;
}

type Listener = (...args: unknown[]) => void;

class Client implements SessionClient {
  private readonly opts: ConnectOptions;
  private readonly replica: Replica;
  private readonly WS: WebSocketConstructor | undefined;
  private readonly baseMs: number;
  private readonly maxMs: number;
  private readonly requestTimeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly refreshBeforeMs: number;
  private readonly random: () => number;
  private readonly listeners = new Map<string, Set<Listener>>();
  private readonly requests = new Map<number, Request>();
  private readonly authWaiters: AuthWaiter[] = [];
  private codec: Codec | null = null;
  private ws: WebSocketLike | null = null;
  private generation = 0; // bumps per connection: callbacks of an older socket are ignored
  private welcomed = false; // on the current connection
  private welcomedOnce = false;
  private resumeOk = true;
  private attempt = 0;
  private stopped = false;
  private status_: Status = "connecting";
  private error_: SessionError | null = null;
  private nextId: number;
  private retryTimer: unknown = null;
  private connectTimer: unknown = null;
  private holdTimer: unknown = null;
  private refreshTimer: unknown = null;
  private readonly onlineHandler = (): void => this.retryNow();
  private view: { base: Record<string, Json>; revision: number; state: Record<string, Json> } | null = null;
  private storeLoaded = false; // the queue store's list was read (saves wait for it)
  private saveInFlight = false;
  private saveAgain = false;
  private revision = 0; // bumps whenever the set of unacked ops changes (optimistic view cache key)
  /** Reconnects after the first welcome (diagnostics). */
  reconnects = 0;

  constructor(opts: ConnectOptions) {
    this.opts = opts;
    this.replica = new Replica(opts.device, (info) => this.changed(info));
    this.WS = opts.WebSocket ?? (globalThis as unknown as { WebSocket?: WebSocketConstructor }).WebSocket;
    this.baseMs = opts.backoff?.baseMs ?? 100;
    this.maxMs = opts.backoff?.maxMs ?? 10000;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 30000;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? 10000;
    this.refreshBeforeMs = opts.refreshBeforeMs ?? 60000;
    this.random = opts.random ?? Math.random;
    // Ids must keep increasing across restarts of the same device too (the server acks an id it has seen instead of
    // applying it), so by default they start at the wall clock in microseconds (< 2^53 until the year 2255).
    // Another client of the same device in this realm (a remount, a reconnect by hand) continues above its ids.
    this.nextId = opts.firstId ?? Math.max(Date.now() * 1000, (lastIds.get(opts.device) ?? 0) + 1);
    const g = globalThis as unknown as { addEventListener?: (name: string, cb: () => void) => void };
    if (typeof g.addEventListener === "function") g.addEventListener("online", this.onlineHandler);
    void this.start();
  }

  // ---- public API -------------------------------------------------------------------------------

  get state(): Readonly<Record<string, Json>> {
    if (!this.opts.optimistic) return this.replica.state;
    return this.optimisticState();
  }
  get version(): number {
    return this.replica.version;
  }
  get epoch(): string | null {
    return this.replica.epoch;
  }
  get status(): Status {
    return this.status_;
  }
  get devices(): Device[] {
    return this.replica.devices;
  }
  get active(): string | null {
    return this.replica.active;
  }
  get pending(): number {
    return this.requests.size;
  }
  get error(): SessionError | null {
    return this.error_;
  }

  apply(ops: Op[], opts?: { base?: number }): Promise<{ version: number }> {
    let checked: Op[];
    try {
      checked = checkOps(ops);
    } catch (exc) {
      return Promise.reject(exc);
    }
    const frame: Frame = { t: "op", ops: checked };
    if (opts?.base !== undefined) frame.base = opts.base;
    return this.request(frame, checked);
  }

  set(path: string, value: Json): Promise<{ version: number }> {
    return this.apply([{ op: "set", path, value }]);
  }

  del(path: string): Promise<{ version: number }> {
    return this.apply([{ op: "del", path }]);
  }

  inc(path: string, by = 1): Promise<{ version: number }> {
    return this.apply([{ op: "inc", path, by }]);
  }

  pause(): Promise<{ version: number }> {
    return this.request({ t: "pause" }, null);
  }

  claim(): Promise<{ version: number }> {
    return this.request({ t: "claim" }, null);
  }

  async refreshToken(): Promise<number> {
    if (this.stopped) throw this.stoppedError();
    if (!this.welcomed) throw new SessionError("disconnected", "not connected; the next connection asks for a token");
    const generation = this.generation;
    const token = await this.opts.token();
    if (this.stopped || generation !== this.generation) {
      throw new SessionError("disconnected", "the connection dropped during the refresh");
    }
    return new Promise<number>((resolve, reject) => {
      const waiter: AuthWaiter = {
        resolve,
        reject,
        timer: setTimer(() => {
          this.removeWaiter(waiter);
          reject(new SessionError("timeout", `no answer to auth within ${AUTH_TIMEOUT_MS} ms`));
        }, AUTH_TIMEOUT_MS),
      };
      this.authWaiters.push(waiter);
      this.send({ t: "auth", token });
    });
  }

  on<E extends SessionEventName>(event: E, cb: SessionEvents[E]): () => void {
    let set = this.listeners.get(event);
    if (set === undefined) this.listeners.set(event, (set = new Set()));
    const listener = cb as unknown as Listener;
    set.add(listener);
    return () => {
      set.delete(listener);
    };
  }

  close(): void {
    this.stop(new SessionError("closed", "the session was closed by the client"), false);
  }

  // ---- requests ---------------------------------------------------------------------------------

  private request(frame: Frame, ops: Op[] | null): Promise<{ version: number }> {
    if (this.stopped) return Promise.reject(this.stoppedError());
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      lastIds.set(this.opts.device, Math.max(lastIds.get(this.opts.device) ?? 0, id));
      frame.id = id;
      const request: Request = { id, frame, ops, resolve, reject, timer: null };
      this.requests.set(id, request);
      if (this.welcomed) this.transmit(request);
      this.pendingChanged(ops !== null);
      if (ops !== null && this.opts.optimistic) this.emit("change", this.state, this.version, {
        source: "optimistic", device: this.opts.device, ops,
      } satisfies ChangeInfo);
    });
  }

  /**
   * Send a request and start its deadline (a request waiting in the offline queue has none yet). After the
   * deadline the outcome is unknown (it may have been applied): the promise rejects with `timeout`, but the
   * request stays queued and is retransmitted with its id on every reconnect, so it is applied at most once.
   */
  private transmit(request: Request): void {
    this.send(request.frame);
    if (request.resolve === null || request.timer !== null) return;
    request.timer = setTimer(() => {
      request.timer = null;
      const message = `no answer within ${this.requestTimeoutMs} ms; the request stays queued (applied at most once)`;
      this.settle(request, new SessionError("timeout", message));
    }, this.requestTimeoutMs);
  }

  private settle(request: Request, outcome: SessionError | { version: number }): void {
    const { resolve, reject } = request;
    request.resolve = request.reject = null;
    clearTimer(request.timer);
    request.timer = null;
    if (outcome instanceof SessionError) {
      if (reject !== null) reject(outcome);
      else if (resolve === null && outcome.code !== "timeout" && request.frame.t === "op") {
        // A request loaded from the queue store: nobody holds its promise, so say it here.
        this.emit("error", outcome);
      }
    } else if (resolve !== null) {
      resolve(outcome);
    }
  }

  private pendingChanged(ops: boolean): void {
    this.revision++;
    this.emit("pending", this.requests.size);
    if (ops) this.persist();
  }

  /**
   * Hand the unacked ops to the queue store. Saves never overlap (an async store could finish them out of order
   * and keep a stale list): while one is in flight, later changes coalesce into one more save after it. Nothing
   * is saved before the store's own list was loaded, or a fast first op would overwrite the queue of the last run.
   */
  private persist(): void {
    const store = this.opts.queue;
    if (store === undefined) return;
    if (!this.storeLoaded || this.saveInFlight) {
      this.saveAgain = true;
      return;
    }
    const queued: QueuedRequest[] = [];
    for (const request of [...this.requests.values()].sort((a, b) => a.id - b.id)) {
      if (request.ops === null) continue;
      const item: QueuedRequest = { id: request.id, ops: request.ops };
      if (typeof request.frame.base === "number") item.base = request.frame.base;
      queued.push(item);
    }
    let result: void | Promise<void>;
    try {
      result = store.save(queued);
    } catch (exc) {
      this.storeFailed(exc);
      return;
    }
    if (result === undefined || typeof (result as Promise<void>).then !== "function") return; // a synchronous store
    this.saveInFlight = true;
    (result as Promise<void>)
      .catch((exc: unknown) => this.storeFailed(exc))
      .finally(() => {
        this.saveInFlight = false;
        if (this.saveAgain) {
          this.saveAgain = false;
          this.persist();
        }
      });
  }

  private storeFailed(exc: unknown): void {
    this.emit("error", new SessionError("queue_store", `saving the offline queue failed: ${String(exc)}`));
  }

  private optimisticState(): Record<string, Json> {
    const base = this.replica.state;
    const view = this.view;
    if (view !== null && view.base === base && view.revision === this.revision) return view.state;
    let state = base;
    const changes: Op[][] = [...this.replica.held.entries()].sort((a, b) => a[0] - b[0]).map((e) => e[1]);
    for (const request of [...this.requests.values()].sort((a, b) => a.id - b.id)) {
      if (request.ops !== null) changes.push(request.ops);
    }
    for (const ops of changes) {
      try {
        state = applyOps(state, ops);
      } catch {
        // refused here, and most likely by the server too: its rejection removes it
      }
    }
    this.view = { base, revision: this.revision, state };
    return state;
  }

  // ---- connection loop --------------------------------------------------------------------------

  private async start(): Promise<void> {
    try {
      if (this.opts.codec === "msgpack") {
        this.codec = new Codec("msgpack", await loadMsgpack(this.opts.msgpack));
      } else {
        this.codec = new Codec("json", null);
      }
      const store = this.opts.queue;
      if (store !== undefined) {
        let loaded: QueuedRequest[] | null | undefined = null;
        try {
          loaded = await store.load();
        } catch (exc) {
          this.emit("error", new SessionError("queue_store", `loading the offline queue failed: ${String(exc)}`));
        }
        if (!this.stopped && Array.isArray(loaded)) this.restore(loaded);
        this.storeLoaded = true;
        if (this.saveAgain) {
          this.saveAgain = false;
          this.persist();
        }
      }
    } catch (exc) {
      const error = exc instanceof SessionError ? exc : new SessionError("internal", String(exc));
      this.stop(error, true);
      return;
    }
    this.connectAttempt();
  }

  /** Requests of an earlier run, from the queue store: queued with their original ids. */
  private restore(loaded: QueuedRequest[]): void {
    let restored = false;
    for (const item of loaded) {
      if (!Number.isSafeInteger(item?.id) || this.requests.has(item.id)) continue;
      let ops: Op[];
      try {
        ops = checkOps(item.ops);
      } catch {
        continue;
      }
      const frame: Frame = { t: "op", id: item.id, ops };
      if (typeof item.base === "number") frame.base = item.base;
      this.requests.set(item.id, { id: item.id, frame, ops, resolve: null, reject: null, timer: null });
      this.nextId = Math.max(this.nextId, item.id + 1);
      restored = true;
    }
    if (restored) this.pendingChanged(false);
  }

  private connectAttempt(): void {
    this.retryTimer = null;
    if (this.stopped) return;
    const generation = ++this.generation;
    this.setStatus(this.welcomedOnce ? (platformOffline() ? "offline" : "reconnecting") : "connecting");
    // One deadline for the token, the socket's open and the welcome: a hung provider or server costs one attempt.
    this.connectTimer = setTimer(() => {
      if (generation === this.generation) this.drop({ reason: `no welcome within ${this.connectTimeoutMs} ms` });
    }, this.connectTimeoutMs);
    let tokenPromise: Promise<string>;
    try {
      tokenPromise = Promise.resolve(this.opts.token());
    } catch (exc) {
      tokenPromise = Promise.reject(exc);
    }
    tokenPromise.then(
      (token) => {
        if (generation === this.generation && !this.stopped) this.open(token, generation);
      },
      (exc: unknown) => {
        if (generation !== this.generation || this.stopped) return;
        this.emit("error", new SessionError("token", `the token provider failed: ${String(exc)}`));
        this.drop({ reason: "no token" });
      },
    );
  }

  private open(token: string, generation: number): void {
    const WS = this.WS;
    const codec = this.codec as Codec;
    if (WS === undefined) {
      this.stop(new SessionError("no_websocket", "no WebSocket: pass ConnectOptions.WebSocket"), true);
      return;
    }
    let ws: WebSocketLike;
    try {
      ws = new WS(this.opts.url, [codec.subprotocol]);
    } catch (exc) {
      // The constructor throws only for a malformed URL (or scheme): no retry can fix that.
      this.stop(new SessionError("bad_url", String(exc)), true);
      return;
    }
    this.ws = ws;
    this.welcomed = false;
    try {
      ws.binaryType = "arraybuffer";
    } catch {
      // some platforms only support one binary type
    }
    ws.onopen = () => {
      if (generation === this.generation) this.sendNow(ws, this.hello(token));
    };
    ws.onmessage = (ev: { data: unknown }) => {
      if (generation === this.generation) this.onMessage(ev.data, token);
    };
    ws.onclose = (ev: { code?: number; reason?: string }) => {
      if (generation !== this.generation) return;
      this.generation++; // timers and callbacks of this connection are void from here on
      this.ws = null;
      this.afterConnection({ code: ev?.code, reason: ev?.reason || `closed with ${String(ev?.code)}` });
    };
    ws.onerror = () => {
      // a close event follows with the code
    };
  }

  private hello(token: string): Frame {
    const hello: Frame = { t: "hello", token, session: this.opts.session, device: this.opts.device };
    if (this.opts.kind !== undefined) hello.kind = this.opts.kind;
    if (this.replica.haveState && this.resumeOk) {
      const resume: Record<string, unknown> = { version: this.replica.version };
      if (this.replica.epoch !== null) resume.epoch = this.replica.epoch;
      hello.resume = resume;
    }
    return hello;
  }

  private onMessage(data: unknown, token: string): void {
    const generation = this.generation;
    let frames: Frame[];
    try {
      frames = (this.codec as Codec).decode(data);
    } catch (exc) {
      if (exc instanceof DecodeError) {
        this.drop({ code: 1002, reason: exc.message });
        return;
      }
      throw exc;
    }
    try {
      for (const frame of frames) {
        if (generation !== this.generation || this.stopped) return; // a frame before this one ended the connection
        if (!this.welcomed && frame.t === "welcome") this.onFirstWelcome(frame, token);
        else this.handle(frame);
      }
    } catch (exc) {
      if (exc instanceof ResyncNeeded) {
        this.drop({ reason: exc.why, resync: true, resume: exc.resume });
        return;
      }
      throw exc;
    }
    this.watchHeld(generation);
  }

  private onFirstWelcome(frame: Frame, token: string): void {
    this.replica.onWelcome(frame);
    clearTimer(this.connectTimer);
    this.connectTimer = null;
    this.welcomed = true;
    if (this.welcomedOnce) this.reconnects++;
    // Same ids, in id order: the server acks what it already applied and applies the rest once.
    for (const id of [...this.requests.keys()].sort((a, b) => a - b)) this.transmit(this.requests.get(id) as Request);
    this.welcomedOnce = true;
    this.resumeOk = true;
    this.attempt = 0;
    this.setStatus("open");
    this.emit("presence", this.replica.devices, this.replica.active);
    this.scheduleRefresh(tokenExpiry(token));
  }

  private handle(frame: Frame): void {
    switch (frame.t) {
      case "ack":
        this.onAck(frame);
        return;
      case "error":
        this.onError(frame);
        return;
      case "authed": {
        const waiter = this.authWaiters.shift();
        const exp = typeof frame.exp === "number" ? frame.exp : null;
        this.scheduleRefresh(exp);
        if (waiter !== undefined) {
          clearTimer(waiter.timer);
          waiter.resolve(exp ?? 0);
        }
        return;
      }
      case "welcome": // mid-connection: the server replaced our backlog with fresh state (§5.5)
        this.replica.onWelcome(frame);
        this.emit("presence", this.replica.devices, this.replica.active);
        return;
      case "patch":
        this.replica.onPatch(frame);
        return;
      case "handoff":
        this.replica.onHandoff(frame);
        this.emit("handoff", this.replica.active, typeof frame.version === "number" ? frame.version : this.version);
        return;
      case "presence":
        this.replica.onPresence(frame);
        this.emit("presence", this.replica.devices, this.replica.active);
        return;
      case "ended":
        this.stop(new SessionError("ended", "the session was deleted"), true);
        return;
      default:
        return; // unknown frame types are ignored (forward compatibility)
    }
  }

  private onAck(frame: Frame): void {
    const id = frame.id as number;
    const request = this.requests.get(id);
    const version = frame.version;
    if (request === undefined || typeof version !== "number" || !Number.isInteger(version)) return;
    this.requests.delete(id);
    this.settle(request, { version });
    try {
      if (request.ops !== null) this.replica.onOwnAck(version, request.ops);
    } finally {
      this.pendingChanged(request.ops !== null); // after the state moved: listeners never see the op missing
    }
  }

  private onError(frame: Frame): void {
    const version = typeof frame.version === "number" ? frame.version : undefined;
    const error = new SessionError(String(frame.code ?? "internal"), String(frame.message ?? ""), version);
    const request = typeof frame.id === "number" ? this.requests.get(frame.id) : undefined;
    if (request !== undefined) {
      this.requests.delete(request.id);
      this.settle(request, error);
      this.pendingChanged(request.ops !== null);
      if (request.ops !== null && this.opts.optimistic) {
        this.emit("change", this.state, this.version, { source: "optimistic", device: this.opts.device, ops: request.ops });
      }
      return;
    }
    if (error.code === "unauthorized" && this.authWaiters.length > 0) {
      const waiter = this.authWaiters.shift() as AuthWaiter;
      clearTimer(waiter.timer);
      waiter.reject(error);
    }
    this.emit("error", error);
  }

  /** An ack ahead of a missing patch: give the gap HOLD_TIMEOUT_MS to fill, then resync with resume. */
  private watchHeld(generation: number): void {
    if (this.replica.heldSince === null) {
      clearTimer(this.holdTimer);
      this.holdTimer = null;
    } else if (this.holdTimer === null) {
      this.holdTimer = setTimer(() => {
        this.holdTimer = null;
        if (generation === this.generation && this.replica.heldSince !== null) {
          this.drop({ reason: "an acked version never got its missing predecessor", resync: true, resume: true });
        }
      }, HOLD_TIMEOUT_MS);
    }
  }

  // ---- token refresh ----------------------------------------------------------------------------

  private scheduleRefresh(exp: number | null): void {
    clearTimer(this.refreshTimer);
    this.refreshTimer = null;
    if (exp === null || exp <= 0) return;
    const remaining = exp * 1000 - Date.now();
    if (remaining <= 0) return; // already expired: the server closes with 4001 and a reconnect fetches a new one
    // Refresh `refreshBeforeMs` ahead, but never in the first half of a short token's life (no refresh storms).
    const delay = Math.max(remaining - this.refreshBeforeMs, remaining / 2, 1000);
    const generation = this.generation;
    this.refreshTimer = setTimer(() => {
      this.refreshTimer = null;
      if (generation !== this.generation || this.stopped) return;
      this.refreshToken().catch((exc: unknown) => {
        if (generation !== this.generation || this.stopped) return;
        this.emit("error", exc instanceof SessionError ? exc : new SessionError("token", String(exc)));
        // try again while the token in force still holds
        if (exp * 1000 - Date.now() > 2000) this.scheduleRefresh(exp);
      });
    }, delay);
  }

  private removeWaiter(waiter: AuthWaiter): void {
    const index = this.authWaiters.indexOf(waiter);
    if (index >= 0) this.authWaiters.splice(index, 1);
  }

  private failAuth(error: SessionError): void {
    for (const waiter of this.authWaiters.splice(0)) {
      clearTimer(waiter.timer);
      waiter.reject(error);
    }
  }

  // ---- drops, retries, stop ---------------------------------------------------------------------

  /** End the current connection ourselves (resync, timeout, bad message) and carry on as after a close. */
  private drop(outcome: Outcome): void {
    const ws = this.ws;
    this.generation++; // its close event, when it comes, is ignored
    this.ws = null;
    if (ws !== null) closeQuietly(ws, outcome.reason); // always 1000: browsers refuse other codes below 3000
    this.afterConnection(outcome);
  }

  private afterConnection(outcome: Outcome): void {
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    for (const name of ["connectTimer", "holdTimer", "refreshTimer"] as const) {
      clearTimer(this[name]);
      this[name] = null;
    }
    this.failAuth(new SessionError("disconnected", outcome.reason));
    if (this.stopped) return;
    const final = outcome.code !== undefined ? FINAL_CLOSE_CODES[outcome.code] : undefined;
    if (final !== undefined) {
      this.stop(new SessionError(final, outcome.reason), true);
      return;
    }
    if (wasWelcomed) this.attempt = 0;
    let delay: number;
    if (outcome.resync) {
      this.resumeOk = this.resumeOk && outcome.resume !== false;
      delay = backoffDelay(0, this.baseMs, this.maxMs, this.random);
    } else {
      delay = backoffDelay(this.attempt, this.baseMs, this.maxMs, this.random);
      this.attempt++;
    }
    if (this.welcomedOnce) this.setStatus(platformOffline() ? "offline" : "reconnecting");
    else if (platformOffline()) this.setStatus("offline");
    this.retryTimer = setTimer(() => this.connectAttempt(), delay);
  }

  /** The platform says the network is back: skip the rest of the backoff. */
  private retryNow(): void {
    if (this.stopped || this.retryTimer === null) return;
    clearTimer(this.retryTimer);
    this.connectAttempt();
  }

  private stop(error: SessionError, emitError: boolean): void {
    if (this.stopped) return;
    this.stopped = true;
    this.error_ = error;
    this.generation++;
    this.welcomed = false;
    for (const name of ["retryTimer", "connectTimer", "holdTimer", "refreshTimer"] as const) {
      clearTimer(this[name]);
      this[name] = null;
    }
    const ws = this.ws;
    this.ws = null;
    if (ws !== null) closeQuietly(ws, error.code);
    const g = globalThis as unknown as { removeEventListener?: (name: string, cb: () => void) => void };
    if (typeof g.removeEventListener === "function") g.removeEventListener("online", this.onlineHandler);
    this.failAuth(error);
    const requests = [...this.requests.values()];
    this.requests.clear();
    for (const request of requests) {
      if (request.resolve === null && request.reject === null) continue;
      this.settle(request, error);
    }
    // Ops of a session that is gone (or not ours) can never apply: drop the persisted queue. After close() or
    // an expired token they stay, for the next run to send.
    if (error.code === "ended" || error.code === "forbidden" || error.code === "not_found") this.persist();
    this.revision++;
    this.setStatus("closed");
    if (emitError) this.emit("error", error);
    if (error.code === "ended") this.emit("ended");
    this.emit("pending", 0);
  }

  private stoppedError(): SessionError {
    const error = this.error_ ?? new SessionError("closed");
    return new SessionError(error.code, error.message.replace(/^[^:]*: /, ""), error.version);
  }

  // ---- plumbing ---------------------------------------------------------------------------------

  private send(frame: Frame): void {
    const ws = this.ws;
    if (ws !== null && this.welcomed) this.sendNow(ws, frame);
  }

  /** A send on a dying socket is not the caller's error: the close event reconnects and retransmits. */
  private sendNow(ws: WebSocketLike, frame: Frame): void {
    if (ws.readyState !== OPEN) return;
    try {
      const codec = this.codec as Codec;
      // No `protocol` property at all: assume the one subprotocol we offered; "" means the server chose none (JSON).
      ws.send(codec.encode(frame, ws.protocol ?? codec.subprotocol));
    } catch {
      // the close event follows
    }
  }

  private setStatus(status: Status): void {
    if (this.status_ === status) return;
    this.status_ = status;
    this.emit("status", status);
  }

  private changed(info: ChangeInfo): void {
    this.emit("change", this.state, this.replica.version, info);
  }

  private emit(event: SessionEventName, ...args: unknown[]): void {
    const set = this.listeners.get(event);
    if (set === undefined) return;
    for (const listener of [...set]) {
      try {
        listener(...args);
      } catch (exc) {
        // A listener's bug must not break the protocol state machine; surface it asynchronously.
        setTimer(() => {
          throw exc;
        }, 0);
      }
    }
  }
}

function closeQuietly(ws: WebSocketLike, reason: string): void {
  ws.onopen = ws.onmessage = ws.onclose = null;
  // Closing a socket that is still connecting makes it report an error (node's `ws` emits one, and with no
  // listener left it is an uncaught exception): keep a listener that ignores it.
  ws.onerror = () => {};
  try {
    ws.close(1000, reason.replace(/[^\x20-\x7e]/g, "?").slice(0, 120)); // a close reason is limited to 123 bytes
  } catch {
    // already closed
  }
}

function platformOffline(): boolean {
  const nav = (globalThis as unknown as { navigator?: { onLine?: unknown } }).navigator;
  return nav !== undefined && nav.onLine === false;
}

/**
 * Connect one device to one session. Returns at once; the client connects in the background (`status`), and
 * requests made before the welcome wait in the offline queue.
 */
export function connect(opts: ConnectOptions): SessionClient {
  return new Client(opts);
}
