/**
 * React (web and Electron renderer): `useSession` connects while the component is mounted.
 * Type-checked against the DOM lib and @types/react.
 */

import type { SessionError } from "@sessiond/client";
import { useSession } from "@sessiond/client/react";

export function Counter(props: { sessionId: string; device: string; getToken: () => Promise<string> }) {
  const { state, version, status, pending, devices, active, client } = useSession({
    url: "wss://sessions.example.com/v1/ws",
    session: props.sessionId,
    device: props.device,
    kind: "web",
    token: props.getToken, // the latest callback is used; a new function does not reconnect
    optimistic: true, // show own changes before the ack
  });
  const count = typeof state.count === "number" ? state.count : 0;
  return (
    <div>
      <p>
        {count} at v{version} — {status}
        {pending > 0 ? ` (${pending} waiting)` : ""}
      </p>
      <p>
        devices: {devices.map((d) => d.device).join(", ")}; active: {active ?? "none"}
      </p>
      <button
        disabled={client === null}
        onClick={() => void client?.inc("/count").catch((e: SessionError) => console.warn(e.code))}
      >
        +1
      </button>
    </div>
  );
}
