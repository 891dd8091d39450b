/** Shared pieces of the integration tests: REST calls, clients over the `ws` package, a cuttable TCP proxy. */

import { createConnection, createServer, type Server, type Socket } from "node:net";

import WebSocket from "ws";

import { connect, type ConnectOptions, type Json, type SessionClient } from "../../src/index.js";
import { mintToken } from "./sessiond.js";

export interface Target {
  http: string;
  ws: string;
  secret: string;
}

export async function createSession(target: Target, user: string, state: Record<string, Json> = {}): Promise<string> {
  const res = await fetch(`${target.http}/v1/sessions`, {
    method: "POST",
    headers: { authorization: `Bearer ${mintToken(target.secret, user)}`, "content-type": "application/json" },
    body: JSON.stringify({ name: "sdk-ts test", state }),
  });
  if (res.status !== 201) throw new Error(`create session: ${res.status} ${await res.text()}`);
  return ((await res.json()) as { id: string }).id;
}

export async function getSession(
  target: Target,
  user: string,
  id: string,
): Promise<{ state: Record<string, Json>; version: number; active: string | null; status: string }> {
  const res = await fetch(`${target.http}/v1/sessions/${id}`, {
    headers: { authorization: `Bearer ${mintToken(target.secret, user)}` },
  });
  if (!res.ok) throw new Error(`get session: ${res.status} ${await res.text()}`);
  return (await res.json()) as { state: Record<string, Json>; version: number; active: string | null; status: string };
}

export async function restPatch(target: Target, user: string, id: string, ops: unknown[]): Promise<number> {
  const res = await fetch(`${target.http}/v1/sessions/${id}`, {
    method: "PATCH",
    headers: { authorization: `Bearer ${mintToken(target.secret, user)}`, "content-type": "application/json" },
    body: JSON.stringify({ ops }),
  });
  if (!res.ok) throw new Error(`patch: ${res.status} ${await res.text()}`);
  return ((await res.json()) as { version: number }).version;
}

const opened: SessionClient[] = [];

/** A client on the `ws` package's WebSocket (Node 20 has no global one); closed by closeAll(). */
export function client(target: Target, opts: Partial<ConnectOptions> & { session: string; device: string; user?: string }): SessionClient {
  const user = opts.user ?? "alice";
  const c = connect({
    url: target.ws,
    token: () => mintToken(target.secret, user),
    WebSocket,
    backoff: { baseMs: 50, maxMs: 500 },
    ...opts,
  });
  opened.push(c);
  return c;
}

export function closeAll(): void {
  for (const c of opened.splice(0)) c.close();
}

/** Poll `check` every 20 ms until it holds; fail with `what` after `timeoutMs`. */
export async function until(what: string, check: () => boolean, timeoutMs = 10000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what}`);
    await new Promise((done) => setTimeout(done, 20));
  }
}

export function opened_(c: SessionClient, timeoutMs = 10000): Promise<void> {
  return until(`client open (status ${c.status})`, () => c.status === "open", timeoutMs);
}

/** A TCP forwarder in front of the server's WebSocket port whose connections the test can cut at once. */
export class Proxy {
  private server: Server | null = null;
  private readonly sockets = new Set<Socket>();
  port = 0;
  cuts = 0;
  /** While true, new connections are dropped at once (the device cannot reach the server). */
  blocked = false;
  /** While true, what the server sends is thrown away (requests arrive and are applied, their answers are lost). */
  dropReplies = false;

  constructor(private readonly targetPort: number) {}

  async start(): Promise<void> {
    const server = createServer((inbound) => {
      if (this.blocked) {
        inbound.destroy();
        return;
      }
      const outbound = createConnection({ host: "127.0.0.1", port: this.targetPort });
      for (const s of [inbound, outbound]) {
        this.sockets.add(s);
        s.on("close", () => this.sockets.delete(s));
        s.on("error", () => s.destroy());
      }
      inbound.pipe(outbound);
      outbound.on("data", (chunk: Buffer) => {
        if (!this.dropReplies) inbound.write(chunk);
      });
      inbound.on("close", () => outbound.destroy());
      outbound.on("close", () => inbound.destroy());
    });
    this.server = server;
    await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
    this.port = (server.address() as { port: number }).port;
  }

  url(path = "/v1/ws"): string {
    return `ws://127.0.0.1:${this.port}${path}`;
  }

  /** Drop every live connection (no close frame: like a network failure). */
  cut(): void {
    this.cuts++;
    for (const s of this.sockets) s.destroy();
  }

  async stop(): Promise<void> {
    this.cut();
    const server = this.server;
    this.server = null;
    if (server !== null) await new Promise<void>((done) => server.close(() => done()));
  }
}
