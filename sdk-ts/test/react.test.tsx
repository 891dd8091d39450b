// @vitest-environment happy-dom
/**
 * useSession in a real React tree (react-dom, happy-dom): it connects on mount, re-renders on changes, status and
 * pending, reconnects when the session changes, closes on unmount, and uses the latest token callback.
 */

import { act, type ReactElement } from "react";
import { createRoot, type Root } from "react-dom/client";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

import type { ConnectOptions } from "../src/index.js";
import { type SessionView, useSession } from "../src/react.js";
import { FakeWebSocket } from "./fake-ws.js";

(globalThis as { IS_REACT_ACT_ENVIRONMENT?: boolean }).IS_REACT_ACT_ENVIRONMENT = true;

let root: Root;
let container: HTMLElement;
const views: SessionView[] = [];

function Probe(props: { opts: ConnectOptions | null }): ReactElement {
  const view = useSession(props.opts);
  views.push(view);
  return <span>{JSON.stringify(view.state)}</span>;
}

function options(session: string, token: () => string): ConnectOptions {
  return { url: "ws://x/v1/ws", session, device: "d1", token, WebSocket: FakeWebSocket, firstId: 1 };
}

const last = () => views[views.length - 1];
const settle = () => act(async () => await new Promise((done) => setTimeout(done, 0)));

beforeEach(() => {
  FakeWebSocket.reset();
  views.length = 0;
  container = document.createElement("div");
  root = createRoot(container);
});

afterEach(async () => {
  await act(async () => root.unmount());
});

describe("useSession", () => {
  it("connects on mount and renders every change", async () => {
    await act(async () => root.render(<Probe opts={options("s1", () => "t")} />));
    await settle();
    expect(last().status).toBe("connecting");
    const ws = FakeWebSocket.last;
    await act(async () => ws.welcome({ n: 1 }, 1));
    expect(last()).toMatchObject({ status: "open", version: 1, state: { n: 1 } });
    expect(container.textContent).toBe('{"n":1}');
    let done = false;
    await act(async () => void last().client!.inc("/n").then(() => (done = true)));
    expect(last().pending).toBe(1);
    await act(async () => ws.serverSend({ t: "ack", id: 1, version: 2 }));
    expect(done).toBe(true);
    expect(last()).toMatchObject({ version: 2, pending: 0, state: { n: 2 } });
    await act(async () => ws.serverSend({ t: "presence", devices: [{ device: "d1" }, { device: "d2" }], active: "d2" }));
    expect(last().devices).toHaveLength(2);
    expect(last().active).toBe("d2");
  });

  it("reconnects for another session, closes on unmount, and uses the latest token callback", async () => {
    await act(async () => root.render(<Probe opts={options("s1", () => "first")} />));
    await settle();
    const first = FakeWebSocket.last;
    // Same session, new token callback: no new connection.
    await act(async () => root.render(<Probe opts={options("s1", () => "second")} />));
    await settle();
    expect(FakeWebSocket.instances).toHaveLength(1);
    await act(async () => first.serverOpen());
    expect(first.sentOf("hello")[0].token).toBe("first"); // asked at connect time, before the re-render
    await act(async () => root.render(<Probe opts={options("s2", () => "third")} />));
    await settle();
    expect(first.closedByClient).not.toBeNull();
    const second = FakeWebSocket.last;
    expect(second).not.toBe(first);
    await act(async () => second.serverOpen());
    expect(second.sentOf("hello")[0]).toMatchObject({ session: "s2", token: "third" });
    await act(async () => root.render(<Probe opts={null} />));
    await settle();
    expect(second.closedByClient).not.toBeNull();
    expect(last()).toMatchObject({ status: "closed", client: null });
  });
});
