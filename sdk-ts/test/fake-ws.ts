/**
 * A scripted stand-in for the standard WebSocket API: the test plays the server (open, send frames, close) and
 * reads what the client sent. Only the surface the client uses (WebSocketLike) is implemented.
 */

import { encode } from "@msgpack/msgpack";

import type { WebSocketLike } from "../src/index.js";

export type Sent = { t: string; [key: string]: unknown };

export class FakeWebSocket implements WebSocketLike {
  static instances: FakeWebSocket[] = [];
  static reset(): void {
    FakeWebSocket.instances = [];
  }
  static get last(): FakeWebSocket {
    const ws = FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
    if (ws === undefined) throw new Error("no socket was created");
    return ws;
  }

  readyState = 0;
  protocol = "";
  binaryType = "blob";
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  readonly raw: (string | Uint8Array)[] = [];
  closedByClient: { code?: number; reason?: string } | null = null;

  constructor(
    readonly url: string,
    readonly protocols?: string | string[],
  ) {
    FakeWebSocket.instances.push(this);
  }

  /** Frames the client sent, decoded (JSON text, or msgpack when `decode` is given). */
  sent(decode?: (b: Uint8Array) => unknown): Sent[] {
    return this.raw.map((m) => (typeof m === "string" ? JSON.parse(m) : decode!(m)) as Sent);
  }

  sentOf(t: string): Sent[] {
    return this.sent().filter((f) => f.t === t);
  }

  send(data: string | Uint8Array): void {
    if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
    this.raw.push(data);
  }

  close(code?: number, reason?: string): void {
    this.closedByClient = { code, reason };
    this.readyState = 3;
  }

  // ---- the server's side ----

  serverOpen(protocol = "sessiond.v1.json"): void {
    this.readyState = 1;
    this.protocol = protocol;
    this.onopen?.({});
  }

  /** Send one frame, or an array of frames as one message (a batch). */
  serverSend(frame: object | object[]): void {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  serverSendBinary(frame: object | object[]): void {
    const bytes = encode(frame);
    this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
  }

  serverClose(code = 1006, reason = ""): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  /** Open and answer the hello with a full welcome. */
  welcome(state: object = {}, version = 0, extra: Record<string, unknown> = {}): void {
    if (this.readyState !== 1) this.serverOpen();
    this.serverSend({
      t: "welcome",
      session: "s1",
      device: "d1",
      epoch: "1",
      version,
      mode: "full",
      state,
      active: null,
      devices: [{ device: "d1", kind: "web" }],
      ...extra,
    });
  }
}
