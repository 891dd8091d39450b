/**
 * Resume across a server restart: a sessiond of this file's own (embedded SQLite store in a data dir that outlives
 * the process) is stopped (SIGTERM, then SIGKILL) and started again on the same ports. The client reconnects with
 * `resume` (epoch + version), sends what it queued while the server was away, and retransmits what was in flight
 * with the original ids: exact counts after a graceful stop, convergence with the server after a kill.
 */

import WebSocket from "ws";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";

import { connect, type SessionClient } from "../../src/index.js";
import { closeAll, createSession, getSession, opened_, Proxy, type Target, until } from "./helpers.js";
import { mintToken, Sessiond } from "./sessiond.js";

/** The `ws` WebSocket, recording every frame the client sends (to check the resume in the hello). */
const sent: Record<string, unknown>[] = [];
class RecordingWebSocket extends WebSocket {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  override send(data: any, ...rest: any[]): void {
    if (typeof data === "string") sent.push(JSON.parse(data) as Record<string, unknown>);
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    (super.send as (...args: any[]) => void)(data, ...rest);
  }
}

// No periodic checkpoint: a SIGKILL loses every change since the last one (SIGTERM still checkpoints all).
const server = new Sessiond({ env: { SESSIOND_CHECKPOINT_EVERY_S: "3600", SESSIOND_CHECKPOINT_EVERY_VERSIONS: "100000" } });
let target: Target;
const clients: SessionClient[] = [];

function device(session: string, name: string, url = server.ws): SessionClient {
  const c = connect({
    url,
    session,
    device: name,
    token: () => mintToken(server.secret, "alice"),
    WebSocket: RecordingWebSocket,
    backoff: { baseMs: 50, maxMs: 300 },
  });
  clients.push(c);
  return c;
}

beforeAll(async () => {
  await server.start();
  target = { http: server.http, ws: server.ws, secret: server.secret };
});

afterEach(() => {
  for (const c of clients.splice(0)) c.close();
  closeAll();
});

afterAll(async () => {
  await server.stop("SIGKILL");
  server.removeData();
});

describe("server restart", () => {
  it("after a graceful stop: resumes with epoch + version, queued and in-flight ops applied exactly once", async () => {
    const session = await createSession(target, "alice", { n: 0 });
    const a = device(session, "a");
    await opened_(a);
    for (let i = 0; i < 20; i++) await a.inc("/n");
    expect(a.version).toBe(20);
    const epoch = a.epoch;
    expect(epoch).not.toBeNull();

    // 30 in flight while the server stops, 10 more queued while it is away.
    const inflight = Array.from({ length: 30 }, () => a.inc("/n"));
    await server.stop("SIGTERM");
    await until("client noticed the stop", () => a.status !== "open");
    const queued = Array.from({ length: 10 }, () => a.inc("/n"));
    expect(a.pending).toBeGreaterThanOrEqual(10);
    sent.length = 0;

    await server.start();
    await opened_(a, 15000);
    const results = await Promise.all([...inflight, ...queued]);
    expect(new Set(results.map((r) => r.version)).size).toBe(40);
    const hello = sent.find((f) => f.t === "hello") as { resume?: { version: number; epoch?: string } };
    expect(hello.resume?.epoch).toBe(epoch);
    expect(hello.resume?.version).toBeGreaterThanOrEqual(20);
    const stored = await getSession(target, "alice", session);
    expect(stored.state.n).toBe(60); // 20 + 30 + 10: nothing lost, nothing doubled
    await until("client at the server's version", () => a.version === stored.version);
    expect(a.state).toEqual(stored.state);
    expect(a.pending).toBe(0);
  });

  it("after SIGKILL: the devices converge on what the server kept; ops queued meanwhile apply once", async () => {
    const session = await createSession(target, "alice", { before: 0, after: 0 });
    const a = device(session, "a");
    await opened_(a);
    for (let i = 0; i < 10; i++) await a.inc("/before");
    await server.stop("SIGKILL"); // the embedded journal goes with the process: back to the last checkpoint
    await until("a noticed", () => a.status !== "open");
    const queued = Array.from({ length: 15 }, () => a.inc("/after"));
    await server.start();
    await opened_(a, 15000);
    await Promise.all(queued);
    const stored = await getSession(target, "alice", session);
    expect(stored.state.after).toBe(15); // sent once each after the restart
    await until("a at the server's version", () => a.version === stored.version);
    expect(a.state).toEqual(stored.state);
  });

  // Regression: in the embedded mode the lease's fencing token (the session's epoch) lived in process memory and
  // started again at 1 after every restart. After a SIGKILL that lost journal changes, version numbers repeated
  // with other contents under the SAME epoch, and a device resuming with (epoch, version) took a replay onto a
  // state that was gone (it ended at {before: 10, after: 5}). The memory lease counter now starts above the wall
  // clock in µs at each start, so the epoch changes and the device gets the full state.
  it("after SIGKILL a device that resumes with the old epoch must get the full state", async () => {
    const session = await createSession(target, "alice", { before: 0, after: 0 });
    const proxy = new Proxy(server.wsPort);
    await proxy.start();
    try {
      const a = device(session, "a");
      const b = device(session, "b", proxy.url());
      await Promise.all([opened_(a), opened_(b)]);
      for (let i = 0; i < 10; i++) await a.inc("/before");
      await until("b caught up", () => b.version === 10);
      const epochBefore = b.epoch;
      proxy.blocked = true; // b stays away until a has moved the restarted session past b's version
      await server.stop("SIGKILL");
      await until("both noticed", () => a.status !== "open" && b.status !== "open");
      const queued = Array.from({ length: 15 }, () => a.inc("/after"));
      await server.start();
      await opened_(a, 15000);
      await Promise.all(queued);
      const stored = await getSession(target, "alice", session);
      expect(stored.state).toEqual({ before: 0, after: 15 }); // the kill lost the 10 /before changes
      expect(stored.version).toBe(15); // so b's version 10 exists again, with other contents
      proxy.blocked = false;
      await opened_(b, 15000);
      await until("b at the server's version", () => b.version === stored.version);
      expect(b.epoch).not.toBe(epochBefore);
      expect(b.state).toEqual(stored.state);
    } finally {
      await proxy.stop();
    }
  });
});
