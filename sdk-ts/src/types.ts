/**
 * Public value types of the sessiond client (protocol v1, DESIGN §2–§3).
 *
 * Kept free of any platform typing (no DOM, no Node): the WebSocket is described structurally, so the same
 * declarations type-check in a browser, React Native, Electron or Node project.
 */

import type { SessionError } from "./errors.js";

/** A JSON value as the session document holds it. */
export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

/** One state op (DESIGN §2). `path` is an RFC 6901 JSON Pointer into the session state; `""` is the whole document. */
export type Op =
  | { op: "set"; path: string; value: Json }
  | { op: "del"; path: string }
  | { op: "inc"; path: string; by: number };

/**
 * Where the connection is:
 * - `connecting`: the first attempt (nothing received from the server yet);
 * - `open`: joined (a welcome arrived); requests are sent at once;
 * - `reconnecting`: the connection dropped and the client is trying again (with backoff); requests queue;
 * - `offline`: as `reconnecting`, but the platform reports no network (`navigator.onLine === false`);
 *   the client tries again when the platform says `online` (or when the backoff timer fires);
 * - `closed`: stopped for good (`close()`, the session ended, or a final close code: 4001, 4003, 4004, 4010).
 */
export type Status = "connecting" | "open" | "reconnecting" | "offline" | "closed";

/** A connected device as the server lists it in `welcome` and `presence`. */
export interface Device {
  device: string;
  kind?: string;
}

/** The device kinds the server knows (DESIGN §3). */
export type DeviceKind = "web" | "ios" | "android" | "desktop" | "other";

/**
 * The part of the standard WebSocket API the client uses. Browsers' (DOM) `WebSocket`, React Native's, Electron's,
 * and the `ws` package's classes all fit; nothing Node-only is required.
 */
export interface WebSocketLike {
  readonly readyState: number;
  /** The subprotocol the server chose ("" for none). Optional: React Native's typings omit it (its runtime has it). */
  readonly protocol?: string;
  /** Set to "arraybuffer" when present. Optional: React Native's typings omit it (its runtime has it). */
  binaryType?: string;
  // `any` parameters on purpose: each platform types its events differently (MessageEvent, WebSocketMessageEvent, ...)
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onopen: ((ev: any) => any) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onmessage: ((ev: any) => any) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onclose: ((ev: any) => any) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onerror: ((ev: any) => any) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
}

/** A WebSocket constructor: `globalThis.WebSocket` of any platform, or the `ws` package's class. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** A MessagePack implementation, e.g. `import { encode, decode } from "@msgpack/msgpack"`. */
export interface MsgpackCodec {
  encode(value: unknown): Uint8Array;
  decode(data: ArrayLike<number> | ArrayBuffer | Uint8Array): unknown;
}

/** An op request waiting for its ack, as handed to the persistence hook (ids are the ones the server will see). */
export interface QueuedRequest {
  id: number;
  ops: Op[];
  base?: number;
}

/**
 * Persistence hook for the offline queue. `save` is called with every unacked op request whenever that list
 * changes; `load` once before the first connection. Requests loaded this way are sent (with their original ids,
 * so the server applies each at most once) after the first welcome; their outcome arrives as `change` (applied)
 * or `error` events, since the promises that issued them belong to an earlier run.
 */
export interface QueueStore {
  load(): QueuedRequest[] | null | undefined | Promise<QueuedRequest[] | null | undefined>;
  save(requests: QueuedRequest[]): void | Promise<void>;
}

export interface ConnectOptions {
  /** WebSocket URL of the server, e.g. `wss://sessions.example.com/v1/ws`. */
  url: string;
  session: string;
  /** Stable id of this device: 1–64 of `[A-Za-z0-9._-]`. One live connection per device id. */
  device: string;
  kind?: DeviceKind;
  /** Called for every (re)connect and every in-band refresh: return a current JWT. */
  token: () => string | Promise<string>;
  /** Wire format; `msgpack` needs `msgpack` below or the optional peer dependency `@msgpack/msgpack`. Default `json`. */
  codec?: "json" | "msgpack";
  /** WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Full-jitter exponential backoff between attempts: uniform in [0, min(maxMs, baseMs * 2^attempt)]. Defaults 100 / 10000. */
  backoff?: { baseMs?: number; maxMs?: number };
  /** A request (op, pause, claim) unanswered this long after it was first sent rejects with code `timeout` (it stays
   *  queued and is retransmitted with its id, so it is applied at most once). Requests waiting in the offline queue
   *  have no deadline until they are sent. Default 30000. */
  requestTimeoutMs?: number;

  // ---- additions beyond the minimal API ----
  /** Bound on one attempt: socket open + welcome. Default 10000. */
  connectTimeoutMs?: number;
  /** Refresh the token in band this long before it expires (read from the JWT `exp`, then from `authed`). Default 60000. */
  refreshBeforeMs?: number;
  /** Apply own ops locally at once (`state` shows them before the ack; rolled back if refused). Default false. */
  optimistic?: boolean;
  /** MessagePack implementation for `codec: "msgpack"` (else `@msgpack/msgpack` is imported at run time). */
  msgpack?: MsgpackCodec;
  /** Persist the offline queue (e.g. in localStorage / AsyncStorage), so unacked ops survive a restart of the app. */
  queue?: QueueStore;
  /** First request id (default: wall clock in µs, so ids keep growing across restarts of the same device). */
  firstId?: number;
  /** Random source in [0, 1) for the backoff jitter (tests). Default Math.random. */
  random?: () => number;
}

/** What a `change` event was caused by. */
export interface ChangeInfo {
  /** `welcome`: full state or replay; `patch`: another device (or REST, device `@rest`); `ack`: our own acked op;
   *  `optimistic`: our own op applied locally before its ack (or rolled back when refused). */
  source: "welcome" | "patch" | "ack" | "optimistic";
  /** The device that made the change, when one did. */
  device?: string | null;
  /** The ops of the change (absent for a full welcome). */
  ops?: Op[];
}

/** Listener signatures of `SessionClient.on`. */
export interface SessionEvents {
  /** The state (or version) changed. `state` is a new object on every change (safe for React identity checks). */
  change: (state: Readonly<Record<string, Json>>, version: number, info: ChangeInfo) => void;
  status: (status: Status) => void;
  presence: (devices: Device[], active: string | null) => void;
  handoff: (active: string | null, version: number) => void;
  /** An error no promise can carry: an error frame naming no request (e.g. `slow_consumer`), a failed token
   *  refresh, the failure of a request loaded from the queue store, or the final error that closed the client. */
  error: (error: SessionError) => void;
  /** The session was deleted (`ended` frame); the client is closed. */
  ended: () => void;
  /** The number of unacked requests changed. */
  pending: (count: number) => void;
}

export type SessionEventName = keyof SessionEvents;

export interface SessionClient {
  /** The synced document at `version` (plus, with `optimistic`, our unacked ops). Immutable: never mutate it. */
  readonly state: Readonly<Record<string, Json>>;
  readonly version: number;
  /** The session incarnation our version belongs to (sent back in `resume`). */
  readonly epoch: string | null;
  readonly status: Status;
  readonly devices: Device[];
  readonly active: string | null;
  /** Unacked requests (queued while disconnected, or in flight). */
  readonly pending: number;
  /** Why the client closed for good, once it has (`closed`, `ended`, `unauthorized`, `forbidden`, `not_found`). */
  readonly error: SessionError | null;

  /**
   * Submit one atomic change; resolves with the version it got once the server acked it (durable).
   * Rejects with SessionError: `invalid_op` (refused locally or by the server), `conflict` (with `base`; carries
   * `version`), `too_large`, `rate_limited`, `unavailable`, `timeout` (no answer within `requestTimeoutMs`: the
   * outcome is unknown and the request stays queued, retransmitted with its id, so it is applied at most once),
   * `closed` / `ended` / final codes. Issued while disconnected, the op waits in the offline queue.
   * By default the local `state` changes only when the ack (or a patch) arrives; see `optimistic`.
   */
  apply(ops: Op[], opts?: { base?: number }): Promise<{ version: number }>;
  set(path: string, value: Json): Promise<{ version: number }>;
  del(path: string): Promise<{ version: number }>;
  inc(path: string, by?: number): Promise<{ version: number }>;
  /** Handoff: the active device pauses the session. Resolves with the current version. */
  pause(): Promise<{ version: number }>;
  /** Handoff: become the active device. Resolves with the current version. */
  claim(): Promise<{ version: number }>;
  /** Refresh the token in band now (done automatically before expiry); resolves with the new `exp` (seconds). */
  refreshToken(): Promise<number>;
  on<E extends SessionEventName>(event: E, cb: SessionEvents[E]): () => void;
  /** Close for good (code 1000): pending requests reject with `closed` (persisted ones stay in the queue store). */
  close(): void;
}
