/**
 * Browser: the global (DOM) WebSocket, a token from your backend, the offline queue persisted in localStorage.
 * Type-checked against the DOM lib by `npm run typecheck` (examples/tsconfig.dom.json).
 */

import { connect, type QueuedRequest, type QueueStore, SessionError } from "@sessiond/client";

/** Keeps unacked ops across reloads: they are resent with their original ids, so applied at most once. */
function localStorageQueue(key: string): QueueStore {
  return {
    load: () => JSON.parse(localStorage.getItem(key) ?? "[]") as QueuedRequest[],
    save: (requests) => localStorage.setItem(key, JSON.stringify(requests)),
  };
}

/** One stable device id per browser profile (use sessionStorage instead for one per tab). */
function deviceId(): string {
  let id = localStorage.getItem("sessiond-device");
  if (id === null) {
    id = `web-${crypto.randomUUID()}`;
    localStorage.setItem("sessiond-device", id);
  }
  return id;
}

export function start(sessionId: string, counter: HTMLElement, button: HTMLButtonElement): () => void {
  const device = deviceId();
  const client = connect({
    url: `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`,
    session: sessionId,
    device,
    kind: "web",
    // Called at every (re)connect and before expiry for the in-band refresh.
    token: async () => {
      const res = await fetch("/auth/sessiond-token", { credentials: "include" });
      if (!res.ok) throw new Error(`token: ${res.status}`);
      return res.text();
    },
    queue: localStorageQueue(`sessiond-queue:${sessionId}:${device}`),
  });

  const render = () => {
    counter.textContent = `${String(client.state.count ?? 0)} (v${client.version}, ${client.status}, ${client.pending} pending)`;
  };
  const offs = [client.on("change", render), client.on("status", render), client.on("pending", render)];
  offs.push(
    client.on("error", (error: SessionError) => console.warn("sessiond:", error.code, error.message)),
    client.on("ended", () => (button.disabled = true)),
  );
  button.onclick = () => {
    client.inc("/count").catch((error: SessionError) => {
      if (error.code !== "timeout") console.warn("inc refused:", error.code);
    });
  };
  render();
  return () => {
    offs.forEach((off) => off());
    client.close();
  };
}
