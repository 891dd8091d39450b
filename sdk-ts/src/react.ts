/**
 * `useSession`: a React hook over `connect()` (entry `@sessiond/client/react`; react is an optional peer dependency).
 *
 * The client lives in an effect (created on mount or when url/session/device/kind/codec change, closed on unmount),
 * so StrictMode's double mount costs one extra connection, never a leak. Reads go through useSyncExternalStore:
 * one consistent snapshot per render, and re-renders only when a value changed (the state object is replaced on
 * every change and kept otherwise).
 */

import { useCallback, useEffect, useRef, useState, useSyncExternalStore } from "react";

import { connect } from "./client.js";
import type { ConnectOptions, Device, Json, SessionClient, Status } from "./types.js";

export interface SessionView {
  state: Readonly<Record<string, Json>>;
  version: number;
  status: Status;
  devices: Device[];
  active: string | null;
  pending: number;
  client: SessionClient | null;
}

type Snapshot = Omit<SessionView, "client">;

const EMPTY_STATE: Readonly<Record<string, Json>> = Object.freeze({});
const IDLE: Snapshot = Object.freeze({
  state: EMPTY_STATE,
  version: 0,
  status: "closed",
  devices: [],
  active: null,
  pending: 0,
}) as Snapshot;
const CONNECTING: Snapshot = Object.freeze({ ...IDLE, status: "connecting" }) as Snapshot;
const EVENTS = ["change", "status", "presence", "handoff", "pending"] as const;
const snapshots = new WeakMap<SessionClient, Snapshot>();

function snapshotOf(client: SessionClient): Snapshot {
  const last = snapshots.get(client);
  if (
    last !== undefined &&
    last.state === client.state &&
    last.version === client.version &&
    last.status === client.status &&
    last.devices === client.devices &&
    last.active === client.active &&
    last.pending === client.pending
  ) {
    return last;
  }
  const next: Snapshot = {
    state: client.state,
    version: client.version,
    status: client.status,
    devices: client.devices,
    active: client.active,
    pending: client.pending,
  };
  snapshots.set(client, next);
  return next;
}

/**
 * Connect while mounted; `null` options mean "not now" (e.g. no session chosen yet). The latest `token` callback
 * is always the one used, so an inline arrow function does not reconnect on every render.
 */
export function useSession(opts: ConnectOptions | null): SessionView {
  const optsRef = useRef(opts);
  optsRef.current = opts;
  const key =
    opts === null ? null : JSON.stringify([opts.url, opts.session, opts.device, opts.kind ?? null, opts.codec ?? "json"]);
  const [client, setClient] = useState<SessionClient | null>(null);

  useEffect(() => {
    const initial = optsRef.current;
    if (key === null || initial === null) {
      setClient(null);
      return undefined;
    }
    const created = connect({
      ...initial,
      token: () => (optsRef.current ?? initial).token(),
    });
    setClient(created);
    return () => {
      created.close();
      setClient((current) => (current === created ? null : current));
    };
  }, [key]);

  const subscribe = useCallback(
    (notify: () => void) => {
      if (client === null) return () => undefined;
      const offs = EVENTS.map((event) => client.on(event, notify));
      return () => offs.forEach((off) => off());
    },
    [client],
  );
  // Before the effect has created the client (first render), options given read as "connecting".
  const waiting = key === null ? IDLE : CONNECTING;
  const getSnapshot = useCallback(() => (client === null ? waiting : snapshotOf(client)), [client, waiting]);
  const snapshot = useSyncExternalStore(subscribe, getSnapshot, getSnapshot);
  return { ...snapshot, client };
}
