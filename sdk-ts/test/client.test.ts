/**
 * The client against a scripted fake WebSocket (the test plays the server), under fake timers: hello/welcome,
 * acks and errors, patches and the replica's version discipline, batched frames, reconnect with backoff, resume
 * with epoch, retransmit with original ids, the offline queue and its store, token refresh, handoff, msgpack.
 */

import { decode as mpDecode, encode as mpEncode } from "@msgpack/msgpack";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import {
  type ChangeInfo,
  connect,
  type ConnectOptions,
  type QueuedRequest,
  type SessionClient,
  SessionError,
  type Status,
} from "../src/index.js";
import { FakeWebSocket } from "./fake-ws.js";

/** An unsigned JWT-shaped token whose payload has `exp` (the client reads exp without verifying). */
function jwt(exp: number, sub = "u1"): string {
  const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp })}.sig`;
}

let clients: SessionClient[] = [];

function start(extra: Partial<ConnectOptions> = {}): SessionClient {
  const client = connect({
    url: "ws://sessiond.test/v1/ws",
    session: "s1",
    device: "d1",
    kind: "web",
    token: () => "tok",
    WebSocket: FakeWebSocket,
    firstId: 100,
    random: () => 1, // the backoff ceiling exactly: deterministic timing
    ...extra,
  });
  clients.push(client);
  return client;
}

/** Let promise callbacks (token provider, codec load) and due timers run. */
const flush = (ms = 0) => vi.advanceTimersByTimeAsync(ms);

async function joined(extra: Partial<ConnectOptions> = {}, state: object = {}, version = 0): Promise<[SessionClient, FakeWebSocket]> {
  const client = start(extra);
  await flush();
  const ws = FakeWebSocket.last;
  ws.welcome(state, version);
  return [client, ws];
}

function settled<T>(promise: Promise<T>): { value?: T; error?: unknown; done: boolean } {
  const box: { value?: T; error?: unknown; done: boolean } = { done: false };
  promise.then(
    (value) => Object.assign(box, { value, done: true }),
    (error: unknown) => Object.assign(box, { error, done: true }),
  );
  return box;
}

beforeEach(() => {
  vi.useFakeTimers({ now: new Date("2026-01-01T00:00:00Z") });
  FakeWebSocket.reset();
  clients = [];
});

afterEach(() => {
  for (const client of clients) client.close();
  vi.useRealTimers();
});

describe("joining", () => {
  it("sends hello with the provider's token and becomes open on welcome", async () => {
    let calls = 0;
    const statuses: Status[] = [];
    const client = start({ token: async () => `tok${++calls}` });
    client.on("status", (s) => statuses.push(s));
    expect(client.status).toBe("connecting");
    await flush();
    const ws = FakeWebSocket.last;
    expect(ws.url).toBe("ws://sessiond.test/v1/ws");
    expect(ws.protocols).toEqual(["sessiond.v1.json"]);
    ws.serverOpen();
    expect(ws.sent()).toEqual([{ t: "hello", token: "tok1", session: "s1", device: "d1", kind: "web" }]);
    const changes: [object, number, ChangeInfo][] = [];
    client.on("change", (state, version, info) => changes.push([state, version, info]));
    ws.welcome({ n: 1 }, 7, { active: "d2", devices: [{ device: "d2", kind: "ios" }] });
    expect(client.status).toBe("open");
    expect(statuses).toEqual(["open"]);
    expect(client.state).toEqual({ n: 1 });
    expect(client.version).toBe(7);
    expect(client.epoch).toBe("1");
    expect(client.active).toBe("d2");
    expect(client.devices).toEqual([{ device: "d2", kind: "ios" }]);
    expect(changes).toEqual([[{ n: 1 }, 7, { source: "welcome" }]]);
  });

  it("gives up at once on a final close code and rejects what is pending", async () => {
    const client = start();
    const op = settled(client.set("/a", 1));
    await flush();
    const errors: SessionError[] = [];
    client.on("error", (e) => errors.push(e));
    FakeWebSocket.last.serverOpen();
    FakeWebSocket.last.serverClose(4003, "not yours");
    await flush(60_000);
    expect(FakeWebSocket.instances).toHaveLength(1); // no reconnect
    expect(client.status).toBe("closed");
    expect(client.error?.code).toBe("forbidden");
    expect(errors.map((e) => e.code)).toEqual(["forbidden"]);
    expect((op.error as SessionError).code).toBe("forbidden");
    await expect(client.set("/a", 2)).rejects.toMatchObject({ code: "forbidden" });
  });

  it.each([
    [4001, "unauthorized"],
    [4004, "not_found"],
    [4010, "ended"],
  ])("close %i is final (%s)", async (code, name) => {
    const [client, ws] = await joined();
    ws.serverClose(code, "");
    await flush(60_000);
    expect(FakeWebSocket.instances).toHaveLength(1);
    expect(client.error?.code).toBe(name);
    expect(client.status).toBe("closed");
  });

  it("ended frame closes the client and emits ended", async () => {
    const [client, ws] = await joined();
    const ended = vi.fn();
    client.on("ended", ended);
    const op = settled(client.inc("/n"));
    ws.serverSend({ t: "ended" });
    await flush();
    expect(ended).toHaveBeenCalledOnce();
    expect(client.status).toBe("closed");
    expect((op.error as SessionError).code).toBe("ended");
    expect(ws.closedByClient).not.toBeNull();
  });
});

describe("requests", () => {
  it("resolves an op by its ack and applies it at that version", async () => {
    const [client, ws] = await joined({}, { n: 1 }, 3);
    const infos: ChangeInfo[] = [];
    client.on("change", (_s, _v, info) => infos.push(info));
    const result = settled(client.inc("/n", 2));
    const [frame] = ws.sentOf("op");
    expect(frame).toEqual({ t: "op", id: 100, ops: [{ op: "inc", path: "/n", by: 2 }] });
    expect(client.pending).toBe(1);
    expect(client.state).toEqual({ n: 1 }); // not optimistic by default
    ws.serverSend({ t: "ack", id: 100, version: 4 });
    await flush();
    expect(result.value).toEqual({ version: 4 });
    expect(client.state).toEqual({ n: 3 });
    expect(client.version).toBe(4);
    expect(client.pending).toBe(0);
    expect(infos).toEqual([{ source: "ack", device: "d1", ops: [{ op: "inc", path: "/n", by: 2 }] }]);
  });

  it("sends base and rejects with the error code and version", async () => {
    const [client, ws] = await joined({}, {}, 5);
    const result = settled(client.apply([{ op: "set", path: "/a", value: 1 }], { base: 4 }));
    expect(ws.sentOf("op")[0]).toMatchObject({ id: 100, base: 4 });
    ws.serverSend({ t: "error", id: 100, code: "conflict", message: "base 4 != 5", version: 5 });
    await flush();
    const error = result.error as SessionError;
    expect(error).toBeInstanceOf(SessionError);
    expect(error.code).toBe("conflict");
    expect(error.version).toBe(5);
    expect(client.pending).toBe(0);
    expect(client.state).toEqual({});
  });

  it("refuses a malformed op locally without sending it", async () => {
    const [client, ws] = await joined();
    await expect(client.apply([{ op: "set", path: "nope", value: 1 }])).rejects.toMatchObject({ code: "invalid_op" });
    await expect(client.apply([])).rejects.toMatchObject({ code: "invalid_op" });
    await expect(client.inc("/n", Number.NaN)).rejects.toMatchObject({ code: "invalid_op" });
    expect(ws.sentOf("op")).toHaveLength(0);
  });

  it("an error frame naming no request goes to the error event", async () => {
    const [client, ws] = await joined();
    const errors: SessionError[] = [];
    client.on("error", (e) => errors.push(e));
    ws.serverSend({ t: "error", code: "rate_limited", message: "slow down" });
    expect(errors.map((e) => e.code)).toEqual(["rate_limited"]);
  });

  it("times out with code timeout, keeps the request and retransmits it with its id", async () => {
    const [client, ws] = await joined({ requestTimeoutMs: 1000 });
    const result = settled(client.inc("/n"));
    await flush(1000);
    expect((result.error as SessionError).code).toBe("timeout");
    expect(client.pending).toBe(1);
    ws.serverClose(1006);
    await flush(100);
    const ws2 = FakeWebSocket.last;
    ws2.serverOpen();
    ws2.serverSend({ t: "welcome", epoch: "1", version: 0, mode: "replay", patches: [], devices: [] });
    expect(ws2.sentOf("op")).toEqual([{ t: "op", id: 100, ops: [{ op: "inc", path: "/n", by: 1 }] }]);
    ws2.serverSend({ t: "ack", id: 100, version: 1 });
    expect(client.state).toEqual({ n: 1 });
    expect(client.pending).toBe(0);
  });

  it("pause and claim resolve by ack without touching the state", async () => {
    const [client, ws] = await joined({}, { a: 1 }, 2);
    const paused = settled(client.pause());
    const claimed = settled(client.claim());
    expect(ws.sent().slice(1)).toEqual([
      { t: "pause", id: 100 },
      { t: "claim", id: 101 },
    ]);
    const handoffs: [string | null, number][] = [];
    client.on("handoff", (active, version) => handoffs.push([active, version]));
    ws.serverSend([
      { t: "ack", id: 100, version: 2 },
      { t: "handoff", active: "d1", version: 2 },
      { t: "ack", id: 101, version: 2 },
    ]);
    await flush();
    expect(paused.value).toEqual({ version: 2 });
    expect(claimed.value).toEqual({ version: 2 });
    expect(client.active).toBe("d1");
    expect(handoffs).toEqual([["d1", 2]]);
    expect(client.version).toBe(2);
    expect(client.state).toEqual({ a: 1 });
  });
});

describe("the stream", () => {
  it("applies patches of other devices in version order and ignores duplicates", async () => {
    const [client, ws] = await joined({}, { n: 0 }, 0);
    ws.serverSend({ t: "patch", version: 1, device: "d2", ops: [{ op: "inc", path: "/n", by: 1 }] });
    ws.serverSend({ t: "patch", version: 1, device: "d2", ops: [{ op: "inc", path: "/n", by: 1 }] });
    ws.serverSend({ t: "patch", version: 2, device: "@rest", ops: [{ op: "set", path: "/t", value: "x" }] });
    expect(client.state).toEqual({ n: 1, t: "x" });
    expect(client.version).toBe(2);
  });

  it("takes a batch (an array of frames in one message) in order", async () => {
    const client = start();
    await flush();
    const ws = FakeWebSocket.last;
    ws.serverOpen();
    const op = settled(client.set("/mine", true)); // queued: not yet welcomed
    ws.serverSend([
      { t: "welcome", epoch: "e", version: 0, mode: "full", state: {}, devices: [] },
      { t: "patch", version: 1, device: "d2", ops: [{ op: "set", path: "/a", value: 1 }] },
      { t: "presence", devices: [{ device: "d1" }, { device: "d2" }], active: "d2" },
    ]);
    expect(client.status).toBe("open");
    expect(client.version).toBe(1);
    expect(client.devices.map((d) => d.device)).toEqual(["d1", "d2"]);
    expect(client.active).toBe("d2");
    expect(ws.sentOf("op")).toHaveLength(1); // sent right after the welcome
    ws.serverSend([
      { t: "patch", version: 2, device: "d2", ops: [{ op: "inc", path: "/a" }] },
      { t: "ack", id: 100, version: 3 },
    ]);
    await flush();
    expect(op.value).toEqual({ version: 3 });
    expect(client.state).toEqual({ a: 2, mine: true });
  });

  it("holds an ack that overtook a patch until the patch arrives", async () => {
    const [client, ws] = await joined({}, {}, 0);
    const op = settled(client.set("/mine", 1));
    ws.serverSend({ t: "ack", id: 100, version: 2 });
    await flush();
    expect(op.value).toEqual({ version: 2 });
    expect(client.version).toBe(0);
    ws.serverSend({ t: "patch", version: 1, device: "d2", ops: [{ op: "set", path: "/other", value: 1 }] });
    expect(client.version).toBe(2);
    expect(client.state).toEqual({ other: 1, mine: 1 });
    await flush(5000);
    expect(FakeWebSocket.instances).toHaveLength(1); // no resync: the gap filled
  });

  it("resyncs with resume when a held ack's predecessor never comes", async () => {
    const [client, ws] = await joined({}, {}, 0);
    void client.set("/mine", 1);
    ws.serverSend({ t: "ack", id: 100, version: 2 });
    await flush(1999);
    expect(FakeWebSocket.instances).toHaveLength(1);
    await flush(1);
    expect(ws.closedByClient).not.toBeNull();
    await flush(100); // backoff(0) = base
    const ws2 = FakeWebSocket.last;
    expect(ws2).not.toBe(ws);
    ws2.serverOpen();
    expect(ws2.sentOf("hello")[0].resume).toEqual({ version: 0, epoch: "1" });
  });

  it("a gap in patches drops the connection and resumes from epoch + version", async () => {
    const [client, ws] = await joined({}, { n: 0 }, 10);
    ws.serverSend({ t: "patch", version: 12, device: "d2", ops: [{ op: "inc", path: "/n" }] });
    expect(ws.closedByClient).not.toBeNull();
    expect(client.version).toBe(10);
    expect(client.status).toBe("reconnecting");
    await flush(100);
    const ws2 = FakeWebSocket.last;
    ws2.serverOpen();
    expect(ws2.sentOf("hello")[0]).toMatchObject({ resume: { version: 10, epoch: "1" } });
    ws2.serverSend({
      t: "welcome",
      epoch: "1",
      version: 12,
      mode: "replay",
      devices: [],
      patches: [
        { version: 11, device: "d2", ops: [{ op: "inc", path: "/n" }] },
        { version: 12, device: "d2", ops: [{ op: "inc", path: "/n" }] },
      ],
    });
    expect(client.state).toEqual({ n: 2 });
    expect(client.version).toBe(12);
    expect(client.status).toBe("open");
  });

  it("a replay that does not line up resyncs without resume (full state)", async () => {
    const [client, ws] = await joined({}, { n: 0 }, 1);
    ws.serverClose(1001, "going away");
    await flush(100);
    const ws2 = FakeWebSocket.last;
    ws2.serverOpen();
    ws2.serverSend({ t: "welcome", epoch: "1", version: 3, mode: "replay", devices: [], patches: [{ version: 3, ops: [] }] });
    expect(ws2.closedByClient).not.toBeNull();
    await flush(100);
    const ws3 = FakeWebSocket.last;
    ws3.serverOpen();
    expect(ws3.sentOf("hello")[0].resume).toBeUndefined();
    ws3.welcome({ n: 5 }, 3, { epoch: "2" });
    expect(client.state).toEqual({ n: 5 });
    expect(client.epoch).toBe("2");
  });

  it("a patch that does not apply means divergence: full resync", async () => {
    const [, ws] = await joined({}, { s: "text" }, 0);
    ws.serverSend({ t: "patch", version: 1, device: "d2", ops: [{ op: "inc", path: "/s" }] });
    expect(ws.closedByClient).not.toBeNull();
    await flush(100);
    FakeWebSocket.last.serverOpen();
    expect(FakeWebSocket.last.sentOf("hello")[0].resume).toBeUndefined();
  });

  it("a message that is not JSON reconnects", async () => {
    const [client, ws] = await joined();
    ws.onmessage?.({ data: "{nope" });
    expect(ws.closedByClient).not.toBeNull();
    expect(client.status).toBe("reconnecting");
  });
});

describe("reconnect", () => {
  it("backs off exponentially with full jitter, capped, and resets after a welcome", async () => {
    const delays: number[] = [];
    let value = 1;
    const client = start({ backoff: { baseMs: 100, maxMs: 1000 }, random: () => value });
    await flush();
    let ws = FakeWebSocket.last;
    ws.welcome();
    // Measure how long each failed attempt waits before the next socket appears.
    for (let i = 0; i < 6; i++) {
      const count = FakeWebSocket.instances.length;
      ws.serverClose(1006);
      let waited = 0;
      while (FakeWebSocket.instances.length === count) {
        await flush(10);
        waited += 10;
        if (waited > 5000) throw new Error("no reconnect");
      }
      delays.push(waited);
      ws = FakeWebSocket.last;
      ws.serverOpen(); // but no welcome: the next close counts as another failed attempt
    }
    expect(delays).toEqual([100, 200, 400, 800, 1000, 1000]);
    ws.welcome(); // the attempt counter restarts: the next delay is base * 2^0 again
    value = 0.5; // jitter: half the ceiling
    ws.serverClose(1006);
    const count = FakeWebSocket.instances.length;
    await flush(49);
    expect(FakeWebSocket.instances.length).toBe(count);
    await flush(1);
    expect(FakeWebSocket.instances.length).toBe(count + 1);
    expect(client.status).toBe("reconnecting");
  });

  it("an attempt with no welcome within connectTimeoutMs is abandoned and retried", async () => {
    start({ connectTimeoutMs: 3000 });
    await flush();
    const ws = FakeWebSocket.last;
    ws.serverOpen(); // hello sent, welcome never comes
    await flush(2999);
    expect(ws.closedByClient).toBeNull();
    await flush(1);
    expect(ws.closedByClient).not.toBeNull();
    await flush(100);
    expect(FakeWebSocket.instances).toHaveLength(2);
  });

  it("a failing token provider costs an attempt, not the client", async () => {
    let fail = true;
    const client = start({
      token: () => {
        if (fail) throw new Error("no network for the auth server");
        return "tok";
      },
    });
    const errors: string[] = [];
    client.on("error", (e) => errors.push(e.code));
    await flush();
    expect(FakeWebSocket.instances).toHaveLength(0);
    expect(errors).toEqual(["token"]);
    fail = false;
    await flush(100);
    expect(FakeWebSocket.instances).toHaveLength(1);
  });

  it("retransmits unacked ops with their original ids, in id order, and settles each once", async () => {
    const [client, ws] = await joined({}, { n: 0 }, 0);
    const a = settled(client.inc("/n"));
    const b = settled(client.inc("/n"));
    const c = settled(client.inc("/n"));
    ws.serverSend({ t: "ack", id: 100, version: 1 });
    ws.serverClose(1006); // 101 and 102 unanswered: maybe applied, maybe not
    const d = settled(client.inc("/n")); // issued while disconnected: offline queue
    expect(client.pending).toBe(3);
    await flush(100);
    const ws2 = FakeWebSocket.last;
    ws2.serverOpen();
    expect(ws2.sentOf("hello")[0].resume).toEqual({ version: 1, epoch: "1" });
    // The server had applied 101 (v2) before the drop: replay it, then answer the retransmits idempotently.
    ws2.serverSend({
      t: "welcome", epoch: "1", version: 2, mode: "replay", devices: [],
      patches: [{ version: 2, device: "d1", ops: [{ op: "inc", path: "/n", by: 1 }] }],
    });
    expect(ws2.sentOf("op").map((f) => f.id)).toEqual([101, 102, 103]);
    ws2.serverSend([
      { t: "ack", id: 101, version: 2 }, // the original answer again
      { t: "ack", id: 102, version: 3 },
      { t: "ack", id: 103, version: 4 },
    ]);
    await flush();
    expect([a.value, b.value, c.value, d.value]).toEqual([{ version: 1 }, { version: 2 }, { version: 3 }, { version: 4 }]);
    expect(client.state).toEqual({ n: 4 });
    expect(client.version).toBe(4);
    expect(client.pending).toBe(0);
  });

  it("after a restart that lost changes (new epoch) takes the full state and still retransmits", async () => {
    const [client, ws] = await joined({}, { n: 5 }, 5);
    const op = settled(client.inc("/n"));
    ws.serverClose(1001);
    await flush(100);
    const ws2 = FakeWebSocket.last;
    ws2.serverOpen();
    expect(ws2.sentOf("hello")[0].resume).toEqual({ version: 5, epoch: "1" });
    ws2.welcome({ n: 4 }, 4, { epoch: "7" });
    expect(client.state).toEqual({ n: 4 });
    expect(client.epoch).toBe("7");
    expect(ws2.sentOf("op").map((f) => f.id)).toEqual([100]);
    ws2.serverSend({ t: "ack", id: 100, version: 5 });
    await flush();
    expect(op.value).toEqual({ version: 5 });
    expect(client.state).toEqual({ n: 5 });
  });

  it("goes offline when the platform says so and retries at once when it is back", async () => {
    const target = new EventTarget();
    const nav = { onLine: true };
    vi.stubGlobal("addEventListener", target.addEventListener.bind(target));
    vi.stubGlobal("removeEventListener", target.removeEventListener.bind(target));
    vi.stubGlobal("navigator", nav);
    try {
      const [client, ws] = await joined({ backoff: { baseMs: 60_000, maxMs: 60_000 } });
      nav.onLine = false;
      ws.serverClose(1006);
      expect(client.status).toBe("offline");
      const queued = settled(client.set("/x", 1));
      nav.onLine = true;
      target.dispatchEvent(new Event("online"));
      await flush();
      expect(FakeWebSocket.instances).toHaveLength(2);
      expect(client.status).toBe("reconnecting");
      FakeWebSocket.last.welcome();
      expect(FakeWebSocket.last.sentOf("op")).toHaveLength(1);
      expect(queued.done).toBe(false);
    } finally {
      vi.unstubAllGlobals();
    }
  });

  it("close() stops for good: no reconnect, pending rejects with closed", async () => {
    const [client, ws] = await joined();
    const op = settled(client.set("/a", 1));
    client.close();
    await flush(60_000);
    expect(ws.closedByClient?.code).toBe(1000);
    expect(FakeWebSocket.instances).toHaveLength(1);
    expect(client.status).toBe("closed");
    expect((op.error as SessionError).code).toBe("closed");
  });
});

describe("offline queue", () => {
  it("queues ops issued before the first welcome and sends them after it, in order", async () => {
    const client = start();
    const first = settled(client.set("/a", 1));
    const second = settled(client.inc("/n", 2));
    expect(client.pending).toBe(2);
    await flush(60_000); // no deadline while queued
    expect(first.done).toBe(false);
    const ws = FakeWebSocket.last;
    ws.serverOpen();
    expect(ws.sent().map((f) => f.t)).toEqual(["hello"]);
    ws.welcome();
    expect(ws.sentOf("op").map((f) => f.id)).toEqual([100, 101]);
    ws.serverSend([
      { t: "ack", id: 100, version: 1 },
      { t: "ack", id: 101, version: 2 },
    ]);
    await flush();
    expect(second.value).toEqual({ version: 2 });
    expect(client.state).toEqual({ a: 1, n: 2 });
  });

  it("persists unacked ops and restores them, with their ids, in the next run", async () => {
    let saved: QueuedRequest[] = [];
    const store = { load: () => saved, save: (q: QueuedRequest[]) => void (saved = structuredClone(q)) };
    const first = start({ queue: store, firstId: 500 });
    void first.set("/a", 1).catch(() => undefined);
    void first.apply([{ op: "inc", path: "/n", by: 1 }], { base: 0 }).catch(() => undefined);
    await flush(); // saves wait until the store's list was loaded
    expect(saved).toEqual([
      { id: 500, ops: [{ op: "set", path: "/a", value: 1 }] },
      { id: 501, ops: [{ op: "inc", path: "/n", by: 1 }], base: 0 },
    ]);
    first.close(); // the app is killed: the queue stays in the store
    expect(saved).toHaveLength(2);

    const second = start({ queue: store, firstId: 1 });
    const errors: SessionError[] = [];
    second.on("error", (e) => errors.push(e));
    await flush();
    expect(second.pending).toBe(2);
    const ws = FakeWebSocket.last;
    ws.welcome();
    expect(ws.sentOf("op")).toEqual([
      { t: "op", id: 500, ops: [{ op: "set", path: "/a", value: 1 }] },
      { t: "op", id: 501, ops: [{ op: "inc", path: "/n", by: 1 }], base: 0 },
    ]);
    const next = settled(second.set("/b", 2));
    expect(ws.sentOf("op")[2].id).toBe(502); // new ids stay above the restored ones
    ws.serverSend([
      { t: "ack", id: 500, version: 1 },
      { t: "error", id: 501, code: "conflict", message: "base", version: 1 },
      { t: "ack", id: 502, version: 2 },
    ]);
    await flush();
    expect(second.state).toEqual({ a: 1, b: 2 });
    expect(next.value).toEqual({ version: 2 });
    expect(errors.map((e) => e.code)).toEqual(["conflict"]); // nobody holds 501's promise
    expect(saved).toEqual([]);
  });

  it("never overlaps saves of an async store, so the last list written is the latest", async () => {
    const writes: { ids: number[]; done: () => void }[] = [];
    let stored: number[] = [];
    const store = {
      load: async () => [],
      save: (q: QueuedRequest[]) =>
        new Promise<void>((done) => writes.push({ ids: q.map((r) => r.id), done: () => ((stored = q.map((r) => r.id)), done()) })),
    };
    const client = start({ queue: store });
    await flush();
    void client.set("/a", 1).catch(() => undefined);
    void client.set("/b", 2).catch(() => undefined);
    void client.set("/c", 3).catch(() => undefined);
    expect(writes.map((w) => w.ids)).toEqual([[100]]); // one in flight, the rest coalesce
    writes[0].done();
    await flush();
    expect(writes.map((w) => w.ids)).toEqual([[100], [100, 101, 102]]);
    writes[1].done();
    await flush();
    expect(writes).toHaveLength(2);
    expect(stored).toEqual([100, 101, 102]);
  });

  it("a store that cannot load reports it and the client still connects", async () => {
    const client = start({ queue: { load: () => Promise.reject(new Error("disk")), save: () => undefined } });
    const errors: string[] = [];
    client.on("error", (e) => errors.push(e.code));
    await flush();
    expect(errors).toEqual(["queue_store"]);
    expect(FakeWebSocket.instances).toHaveLength(1);
  });
});

describe("token refresh", () => {
  it("refreshes in band before expiry with the provider's token and reschedules from authed", async () => {
    const now = Date.now() / 1000;
    const tokens = [jwt(now + 600), jwt(now + 1200), jwt(now + 1800)];
    let calls = 0;
    const [client, ws] = await joined({ token: () => tokens[calls++], refreshBeforeMs: 60_000 });
    expect(ws.sentOf("hello")[0].token).toBe(tokens[0]);
    await flush(539_000);
    expect(ws.sentOf("auth")).toHaveLength(0);
    await flush(1_000); // 600 s - 60 s
    expect(ws.sentOf("auth")).toEqual([{ t: "auth", token: tokens[1] }]);
    ws.serverSend({ t: "authed", exp: now + 1200 });
    await flush(599_000);
    expect(ws.sentOf("auth")).toHaveLength(1);
    await flush(1_000);
    expect(ws.sentOf("auth")).toEqual([
      { t: "auth", token: tokens[1] },
      { t: "auth", token: tokens[2] },
    ]);
    expect(client.status).toBe("open");
  });

  it("refreshToken() resolves with exp, and rejects on an unauthorized answer", async () => {
    const [client, ws] = await joined({ token: () => "opaque" });
    const ok = settled(client.refreshToken());
    await flush();
    expect(ws.sentOf("auth")).toHaveLength(1);
    ws.serverSend({ t: "authed", exp: 12345 });
    await flush();
    expect(ok.value).toBe(12345);
    const bad = settled(client.refreshToken());
    await flush();
    ws.serverSend({ t: "error", code: "unauthorized", message: "other sub" });
    await flush();
    expect((bad.error as SessionError).code).toBe("unauthorized");
    expect(client.status).toBe("open"); // the token in force still holds
  });

  it("a short-lived token is refreshed at half its life, not in a loop", async () => {
    const now = Date.now() / 1000;
    const [, ws] = await joined({ token: () => jwt(now + 30), refreshBeforeMs: 60_000 });
    await flush(14_999);
    expect(ws.sentOf("auth")).toHaveLength(0);
    await flush(1);
    expect(ws.sentOf("auth")).toHaveLength(1);
  });
});

describe("optimistic mode", () => {
  it("shows own ops at once and rolls back a refused one", async () => {
    const [client, ws] = await joined({ optimistic: true }, { n: 0 }, 0);
    const seen: object[] = [];
    client.on("change", (state) => seen.push(state));
    const ok = settled(client.inc("/n"));
    const bad = settled(client.set("/n/x", 1));
    expect(client.state).toEqual({ n: 1 }); // the second does not apply locally either
    ws.serverSend([
      { t: "ack", id: 100, version: 1 },
      { t: "error", id: 101, code: "invalid_op", message: "cannot traverse" },
    ]);
    await flush();
    expect(ok.value).toEqual({ version: 1 });
    expect((bad.error as SessionError).code).toBe("invalid_op");
    expect(client.state).toEqual({ n: 1 });
    expect(client.version).toBe(1);
    expect(seen.length).toBeGreaterThanOrEqual(3);
  });
});

describe("msgpack", () => {
  it("speaks MessagePack when asked, with an injected codec", async () => {
    const client = start({ codec: "msgpack", msgpack: { encode: mpEncode, decode: mpDecode } });
    await flush();
    const ws = FakeWebSocket.last;
    expect(ws.protocols).toEqual(["sessiond.v1.msgpack"]);
    ws.serverOpen("sessiond.v1.msgpack");
    const [hello] = ws.sent((b) => mpDecode(b));
    expect(hello).toMatchObject({ t: "hello", session: "s1" });
    expect(ws.raw[0]).toBeInstanceOf(Uint8Array);
    ws.serverSendBinary([
      { t: "welcome", epoch: "1", version: 1, mode: "full", state: { a: [1, 2] }, devices: [] },
      { t: "patch", version: 2, device: "d2", ops: [{ op: "set", path: "/b", value: "x" }] },
    ]);
    expect(client.state).toEqual({ a: [1, 2], b: "x" });
  });

  it("loads @msgpack/msgpack itself when no codec is passed", async () => {
    const client = start({ codec: "msgpack" });
    await flush();
    await vi.waitFor(() => expect(FakeWebSocket.instances).toHaveLength(1));
    const ws = FakeWebSocket.last;
    ws.serverOpen("sessiond.v1.msgpack");
    ws.serverSendBinary({ t: "welcome", epoch: "1", version: 3, mode: "full", state: { ok: true }, devices: [] });
    expect(client.version).toBe(3);
  });
});

describe("request ids", () => {
  it("grow per device across clients of the same realm, even within one millisecond", async () => {
    const first = connect({ url: "ws://x", session: "s1", device: "ids-dev", token: () => "t", WebSocket: FakeWebSocket });
    clients.push(first);
    for (let i = 0; i < 1500; i++) void first.inc("/n").catch(() => undefined);
    first.close();
    const second = connect({ url: "ws://x", session: "s1", device: "ids-dev", token: () => "t", WebSocket: FakeWebSocket });
    clients.push(second);
    await flush();
    FakeWebSocket.last.welcome();
    void second.inc("/n").catch(() => undefined);
    const [op] = FakeWebSocket.last.sentOf("op");
    expect(op.id).toBe(Date.now() * 1000 + 1500); // fake time stands still: above the first client's last id
  });
});
