/**
 * Electron renderer (contextIsolation on, no Node integration): the renderer's own (DOM) WebSocket; the token comes
 * from the main process through the preload's contextBridge. Type-checked against the DOM lib.
 *
 * preload.ts (main side, not type-checked here):
 *   contextBridge.exposeInMainWorld("sessiondAuth", { token: () => ipcRenderer.invoke("sessiond:token") });
 */

import { connect, type SessionClient } from "@sessiond/client";

declare global {
  interface Window {
    sessiondAuth: { token(): Promise<string> };
  }
}

export function openDesktopSession(serverUrl: string, sessionId: string, machineId: string): SessionClient {
  const client = connect({
    url: serverUrl, // e.g. "wss://sessions.example.com/v1/ws"
    session: sessionId,
    device: `desktop-${machineId}`,
    kind: "desktop",
    token: () => window.sessiondAuth.token(),
    WebSocket: window.WebSocket, // the default as well; shown because main-process code would inject one
  });
  client.on("handoff", (active) => {
    document.title = active === client.devices.find((d) => d.kind === "desktop")?.device ? "Active here" : "Paused";
  });
  return client;
}

/** Take the session over from the phone: the laptop becomes the active device. */
export async function resumeHere(client: SessionClient): Promise<void> {
  await client.claim();
}
