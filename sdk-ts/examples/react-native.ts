/**
 * React Native: RN's global WebSocket (no DOM lib here; see rn-env.d.ts), AsyncStorage for the offline queue,
 * and `useSession` inside a screen's hook. Type-checked by examples/tsconfig.rn.json.
 */

import { connect, type ConnectOptions, type QueuedRequest, type QueueStore } from "@sessiond/client";
import { useSession } from "@sessiond/client/react";

/** The part of @react-native-async-storage/async-storage this example uses. */
export interface AsyncStorageLike {
  getItem(key: string): Promise<string | null>;
  setItem(key: string, value: string): Promise<void>;
}

export function asyncStorageQueue(storage: AsyncStorageLike, key: string): QueueStore {
  return {
    load: async () => JSON.parse((await storage.getItem(key)) ?? "[]") as QueuedRequest[],
    save: (requests) => storage.setItem(key, JSON.stringify(requests)),
  };
}

export function sessionOptions(
  sessionId: string,
  deviceId: string,
  getToken: () => Promise<string>,
  storage: AsyncStorageLike,
): ConnectOptions {
  return {
    url: "wss://sessions.example.com/v1/ws",
    session: sessionId,
    device: deviceId, // e.g. from react-native-device-info, stable per install
    kind: "ios",
    token: getToken,
    WebSocket, // React Native's global WebSocket (the default too)
    queue: asyncStorageQueue(storage, `sessiond-queue:${sessionId}`),
  };
}

/** A screen's data: the synced player position and a way to hand off to another device. */
export function usePlayer(opts: ConnectOptions | null) {
  const { state, status, active, client } = useSession(opts);
  const position = typeof state.position === "number" ? state.position : 0;
  return {
    position,
    online: status === "open",
    activeHere: opts !== null && active === opts.device,
    seek: (to: number) => client?.set("/position", to),
    pauseHere: () => client?.pause(),
    playHere: () => client?.claim(),
  };
}

/** Outside React (a background task): connect directly. */
export function connectInBackground(opts: ConnectOptions) {
  return connect(opts);
}
