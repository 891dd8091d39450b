/**
 * The SDK against a real sessiond (started by global-setup.ts): convergence of two devices, acks and patches,
 * server-side errors, handoff, inc exactly-once across forced reconnects, in-band token refresh, MessagePack,
 * final close codes.
 */

import { type AddressInfo, createServer, type Socket } from "node:net";

import { decode, encode } from "@msgpack/msgpack";
import { afterEach, describe, expect, inject, it } from "vitest";

import { type ChangeInfo, SessionError } from "../../src/index.js";
import {
  client,
  closeAll,
  createSession,
  getSession,
  opened_,
  Proxy,
  restPatch,
  type Target,
  until,
} from "./helpers.js";
import { mintToken } from "./sessiond.js";

const target: Target = inject("sessiond");

afterEach(() => closeAll());

describe("against a real sessiond", () => {
  it("two clients converge on the server's state", async () => {
    const session = await createSession(target, "alice", { n: 0, list: [] });
    const a = client(target, { session, device: "laptop", kind: "desktop" });
    const b = client(target, { session, device: "phone", kind: "ios" });
    await Promise.all([opened_(a), opened_(b)]);
    const ops: Promise<{ version: number }>[] = [];
    for (let i = 0; i < 25; i++) {
      ops.push(a.inc("/n", 1));
      ops.push(b.inc("/n", 2));
      ops.push(a.set(`/a${i % 5}`, i));
      ops.push(b.set(`/b/${i % 3}`, { i }));
    }
    const versions = (await Promise.all(ops)).map((r) => r.version);
    expect(new Set(versions).size).toBe(100); // one version per change, no two alike
    const server = await getSession(target, "alice", session);
    expect(server.version).toBe(100);
    await until("both clients at the server's version", () => a.version === 100 && b.version === 100);
    expect(a.state).toEqual(server.state);
    expect(b.state).toEqual(server.state);
    expect(server.state.n).toBe(75);
    expect(a.devices.map((d) => d.device).sort()).toEqual(["laptop", "phone"]);
  });

  it("acks the sender and patches the others, REST changes included", async () => {
    const session = await createSession(target, "alice", { title: "" });
    const a = client(target, { session, device: "a" });
    const b = client(target, { session, device: "b" });
    await Promise.all([opened_(a), opened_(b)]);
    const seen: ChangeInfo[] = [];
    b.on("change", (_s, _v, info) => seen.push(info));
    const { version } = await a.set("/title", "hello");
    expect(version).toBe(1);
    expect(a.state).toEqual({ title: "hello" }); // own op applied at its ack
    await until("b got the patch", () => b.version === 1);
    expect(b.state).toEqual({ title: "hello" });
    expect(seen).toEqual([{ source: "patch", device: "a", ops: [{ op: "set", path: "/title", value: "hello" }] }]);
    await restPatch(target, "alice", session, [{ op: "inc", path: "/views" }]);
    await until("both got the REST change", () => a.version === 2 && b.version === 2);
    expect(seen[1]).toMatchObject({ source: "patch", device: "@rest" });
    expect(a.state).toEqual({ title: "hello", views: 1 });
  });

  it("rejects a refused op with its error code and keeps going", async () => {
    const session = await createSession(target, "alice", { s: "text" });
    const a = client(target, { session, device: "a" });
    await opened_(a);
    const refused = await a.inc("/s").catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(SessionError);
    expect((refused as SessionError).code).toBe("invalid_op");
    const conflict = await a.apply([{ op: "set", path: "/x", value: 1 }], { base: 5 }).catch((e: unknown) => e);
    expect((conflict as SessionError).code).toBe("conflict");
    expect((conflict as SessionError).version).toBe(0);
    expect(await a.apply([{ op: "set", path: "/x", value: 1 }], { base: 0 })).toEqual({ version: 1 });
    expect(a.status).toBe("open");
    expect(a.pending).toBe(0);
  });

  it("hands off: claim, pause, and the other device claims", async () => {
    const session = await createSession(target, "alice", {});
    const phone = client(target, { session, device: "phone" });
    const laptop = client(target, { session, device: "laptop" });
    await Promise.all([opened_(phone), opened_(laptop)]);
    const handoffs: (string | null)[] = [];
    laptop.on("handoff", (active) => handoffs.push(active));
    await phone.claim();
    expect(phone.active).toBe("phone");
    await until("laptop saw the phone take over", () => laptop.active === "phone");
    await phone.pause();
    expect((await getSession(target, "alice", session)).status).toBe("paused");
    await laptop.claim();
    await until("phone saw the laptop take over", () => phone.active === "laptop");
    const server = await getSession(target, "alice", session);
    expect(server.active).toBe("laptop");
    expect(server.status).toBe("active");
    expect(handoffs).toContain("phone");
    expect(laptop.active).toBe("laptop");
  });

  it("applies each inc exactly once across forced reconnects (retransmit with original ids)", async () => {
    const session = await createSession(target, "alice", { n: 0 });
    const wsPort = Number(new URL(target.ws).port);
    const proxy = new Proxy(wsPort);
    await proxy.start();
    try {
      const a = client(target, { session, device: "flaky", url: proxy.url() });
      const watcher = client(target, { session, device: "watcher" });
      await Promise.all([opened_(a), opened_(watcher)]);
      const total = 300;
      let reconnects = 0;
      a.on("status", (status) => {
        if (status === "open") reconnects++;
      });
      const inFlight: number[] = [];
      const incs: Promise<{ version: number }>[] = [];
      // Three times: 100 incs reach the server and are applied while their acks are lost on the way back; then
      // the connection is cut. The client must retransmit them with their original ids and get their acks.
      for (let cut = 0; cut < 3; cut++) {
        proxy.dropReplies = true;
        const base = watcher.version;
        for (let i = 0; i < total / 3; i++) incs.push(a.inc("/n"));
        await until("the server applied the batch", () => watcher.version === base + total / 3, 10000);
        inFlight.push(a.pending);
        proxy.cut();
        proxy.dropReplies = false;
        await until("reconnected", () => reconnects === cut + 1, 10000);
        await until("the retransmitted batch is answered", () => a.pending === 0, 10000);
      }
      const versions = (await Promise.all(incs)).map((r) => r.version);
      expect(new Set(versions).size).toBe(total);
      const server = await getSession(target, "alice", session);
      expect(server.state.n).toBe(total); // exactly once: nothing lost, nothing doubled
      expect(server.version).toBe(total);
      await until("watcher caught up", () => watcher.version === total);
      expect(watcher.state).toEqual({ n: total });
      expect(a.state).toEqual({ n: total });
      expect(proxy.cuts).toBe(3);
      expect(inFlight).toEqual([total / 3, total / 3, total / 3]); // each cut caught a whole batch unacked
    } finally {
      await proxy.stop();
    }
  });

  it("refreshes the token in band before it expires and stays connected past the first expiry", async () => {
    const session = await createSession(target, "alice", {});
    let minted = 0;
    const a = client(target, {
      session,
      device: "short-lived",
      token: () => (minted++, mintToken(target.secret, "alice", 3)), // 3 s tokens: refresh at half life (1.5 s)
      refreshBeforeMs: 60000,
    });
    await opened_(a);
    const closedWith: string[] = [];
    a.on("error", (e) => closedWith.push(e.code));
    await new Promise((done) => setTimeout(done, 4500)); // past the first token's exp
    expect(a.status).toBe("open");
    expect(minted).toBeGreaterThanOrEqual(3); // hello + at least two refreshes
    expect(await a.set("/still", true)).toEqual({ version: 1 });
    expect(closedWith).toEqual([]);
  });

  it("closes quietly while the socket is still connecting (no uncaught error)", async () => {
    // A TCP server that accepts and never answers the upgrade: the client's socket stays CONNECTING. Node's
    // `ws` reports an error when such a socket is closed; with no listener left that was an uncaught exception.
    const sockets: Socket[] = [];
    const silent = createServer((socket) => sockets.push(socket));
    await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
    const port = (silent.address() as AddressInfo).port;
    try {
      const c = client({ ...target, ws: `ws://127.0.0.1:${port}/v1/ws` }, { session: "s-never", device: "d" });
      await until("the TCP connection is accepted", () => sockets.length === 1);
      c.close();
      await new Promise((resolve) => setTimeout(resolve, 50)); // the error comes on a later tick, if at all
      expect(c.status).toBe("closed");
    } finally {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => silent.close(resolve));
    }
  });

  it("speaks MessagePack", async () => {
    const session = await createSession(target, "alice", { a: 1 });
    const m = client(target, { session, device: "mp", codec: "msgpack", msgpack: { encode, decode } });
    const j = client(target, { session, device: "js" });
    await Promise.all([opened_(m), opened_(j)]);
    expect(m.state).toEqual({ a: 1 });
    await m.set("/b", { deep: [1, "two", null] });
    await j.inc("/a", 2.5);
    await until("both at version 2", () => m.version === 2 && j.version === 2);
    expect(m.state).toEqual({ a: 3.5, b: { deep: [1, "two", null] } });
    expect(j.state).toEqual(m.state);
  });

  it("stops for good on a final close: wrong owner, unknown session, bad token", async () => {
    const session = await createSession(target, "alice", {});
    const mallory = client(target, { session, device: "m", user: "mallory" });
    const ghost = client(target, { session: "no-such-session", device: "g" });
    const forged = client(target, { session, device: "f", token: () => mintToken("not-the-secret-at-all-0123456789", "alice") });
    await until("all three closed", () => [mallory, ghost, forged].every((c) => c.status === "closed"));
    expect(mallory.error?.code).toBe("forbidden");
    expect(ghost.error?.code).toBe("not_found");
    expect(forged.error?.code).toBe("unauthorized");
  });

  it("ends with the session: ended event, pending rejected", async () => {
    const session = await createSession(target, "alice", {});
    const a = client(target, { session, device: "a" });
    await opened_(a);
    let ended = false;
    a.on("ended", () => (ended = true));
    const res = await fetch(`${target.http}/v1/sessions/${session}`, {
      method: "DELETE",
      headers: { authorization: `Bearer ${mintToken(target.secret, "alice")}` },
    });
    expect(res.status).toBe(204);
    await until("ended", () => ended);
    expect(a.status).toBe("closed");
    await expect(a.set("/x", 1)).rejects.toMatchObject({ code: "ended" });
  });
});
