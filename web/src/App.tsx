/**
 * The sessiond demo app: sign in, pick or create a session, edit a shared task list live from several devices,
 * see who is connected and which device is active, and hand the session over ("continue on another device").
 * Routes: /app/ (sessions) and /app/s/<id> (one session); the server answers index.html for both.
 */
import { useCallback, useEffect, useMemo, useState } from "react";
import type { ConnectOptions, Json, QueueStore, QueuedRequest, Status } from "@sessiond/client";
import { useSession } from "@sessiond/client/react";
import { AuthError, currentToken, loadIdentity, signInDev, signInWithToken, signOut, type Identity } from "./auth";
import { BASE, type AppConfig } from "./config";
import { deviceId, setDeviceId } from "./device";
import { EMPTY_DOC, ops, tasksOf, type Task } from "./doc";
import { createSession, getSession, listSessions, recentSessions, RestError, type SessionSummary } from "./rest";

function sessionFromPath(): string | null {
  const m = window.location.pathname.match(/\/s\/([A-Za-z0-9_-]{1,128})\/?$/);
  return m ? m[1] : null;
}

function go(path: string): void {
  window.history.pushState(null, "", path);
  window.dispatchEvent(new PopStateEvent("popstate"));
}

function useOnline(): boolean {
  const [online, setOnline] = useState(navigator.onLine);
  useEffect(() => {
    const up = () => setOnline(true);
    const down = () => setOnline(false);
    window.addEventListener("online", up);
    window.addEventListener("offline", down);
    return () => {
      window.removeEventListener("online", up);
      window.removeEventListener("offline", down);
    };
  }, []);
  return online;
}

export function App({ config }: { config: AppConfig }) {
  const [identity, setIdentity] = useState<Identity | null>(loadIdentity);
  const [session, setSession] = useState<string | null>(sessionFromPath);
  const online = useOnline();

  useEffect(() => {
    const sync = () => setSession(sessionFromPath());
    window.addEventListener("popstate", sync);
    return () => window.removeEventListener("popstate", sync);
  }, []);

  return (
    <div className="page">
      <header className="top">
        <a className="brand" href={BASE} onClick={(e) => (e.preventDefault(), go(BASE))}>
          <img src={`${BASE}icons/icon-192.png`} alt="" width={28} height={28} />
          sessiond <span>tasks</span>
        </a>
        {identity && (
          <div className="who">
            <span data-testid="user">{identity.user}</span> · <span data-testid="device">{deviceId()}</span>
            <button
              className="link"
              onClick={() => {
                signOut();
                setIdentity(null);
                go(BASE);
              }}
            >
              Sign out
            </button>
          </div>
        )}
      </header>
      {!online && (
        <div className="banner offline" data-testid="offline-banner" role="status">
          You are offline. Changes stay on this device and are sent when the network is back.
        </div>
      )}
      {!identity ? (
        <SignIn config={config} onSignedIn={setIdentity} />
      ) : session ? (
        <SessionScreen key={session} config={config} session={session} />
      ) : (
        <Sessions />
      )}
    </div>
  );
}

function SignIn({ config, onSignedIn }: { config: AppConfig; onSignedIn: (i: Identity) => void }) {
  const [user, setUser] = useState("alice");
  const [device, setDevice] = useState(deviceId);
  const [token, setToken] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const finish = async (how: () => Promise<Identity> | Identity) => {
    setError(null);
    setBusy(true);
    try {
      setDeviceId(device.trim());
      onSignedIn(await how());
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    } finally {
      setBusy(false);
    }
  };

  return (
    <main className="card narrow">
      <h1>Sign in</h1>
      <p className="muted">One session, many devices: open this page on a second device (or window) to see it sync.</p>
      <label>
        This device's name
        <input data-testid="device-input" value={device} onChange={(e) => setDevice(e.target.value)} maxLength={64} />
      </label>
      {config.devLogin ? (
        <form onSubmit={(e) => (e.preventDefault(), finish(() => signInDev(user)))}>
          <label>
            User name
            <input data-testid="user-input" value={user} onChange={(e) => setUser(e.target.value)} maxLength={64} />
          </label>
          <button data-testid="dev-login" disabled={busy || !user.trim()}>
            Sign in (dev login)
          </button>
        </form>
      ) : (
        <p className="muted">Dev login is off on this server (SESSIOND_DEV_LOGIN): paste a token below.</p>
      )}
      <form onSubmit={(e) => (e.preventDefault(), finish(() => signInWithToken(token)))}>
        <label>
          Or paste a token (<code>sessiond token --user U</code>)
          <textarea data-testid="token-input" value={token} onChange={(e) => setToken(e.target.value)} rows={3} />
        </label>
        <button data-testid="token-login" className="secondary" disabled={busy || !token.trim()}>
          Use this token
        </button>
      </form>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
    </main>
  );
}

function Sessions() {
  const [sessions, setSessions] = useState<SessionSummary[] | null>(null);
  const [name, setName] = useState("Groceries");
  const [join, setJoin] = useState("");
  const [error, setError] = useState<string | null>(null);

  const refresh = useCallback(() => {
    listSessions()
      .then(setSessions)
      .catch((e: unknown) => {
        if (e instanceof RestError || e instanceof AuthError) {
          setError(e.message);
          return;
        }
        // No answer at all: the server or the network is down. Offer what this device saw last time.
        setError("Cannot reach the server. These are the sessions this device knew; edits are sent when it is back.");
        setSessions(recentSessions());
      });
  }, []);
  useEffect(() => {
    window.addEventListener("online", refresh);
    return () => window.removeEventListener("online", refresh);
  }, [refresh]);
  useEffect(refresh, [refresh]);

  const create = async () => {
    setError(null);
    try {
      const s = await createSession(name.trim() || "Tasks", EMPTY_DOC);
      go(`${BASE}s/${s.id}`);
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    }
  };

  return (
    <main className="card">
      <h1>Your sessions</h1>
      <form className="row" onSubmit={(e) => (e.preventDefault(), create())}>
        <input data-testid="new-name" value={name} onChange={(e) => setName(e.target.value)} maxLength={200} />
        <button data-testid="create">New session</button>
      </form>
      <form className="row" onSubmit={(e) => (e.preventDefault(), join.trim() && go(`${BASE}s/${join.trim()}`))}>
        <input placeholder="or a session id" value={join} onChange={(e) => setJoin(e.target.value)} />
        <button className="secondary">Open</button>
      </form>
      {error && (
        <p className="error" data-testid="sessions-error">
          {error}
        </p>
      )}
      {sessions === null ? (
        <p className="muted">Loading…</p>
      ) : sessions.length === 0 ? (
        <p className="muted">No sessions yet.</p>
      ) : (
        <ul className="sessions" data-testid="sessions">
          {sessions.map((s) => (
            <li key={s.id}>
              <a href={`${BASE}s/${s.id}`} onClick={(e) => (e.preventDefault(), go(`${BASE}s/${s.id}`))}>
                {s.name || s.id}
              </a>
              <span className="muted">
                v{s.version} · {s.status}
                {s.active ? ` · active on ${s.active}` : ""}
              </span>
            </li>
          ))}
        </ul>
      )}
    </main>
  );
}

/** Unacked ops survive a reload (or the app being closed offline): the SDK retransmits them with their ids. */
function localQueue(session: string, device: string): QueueStore {
  const key = `sessiond.queue.${session}.${device}`;
  return {
    load: () => JSON.parse(localStorage.getItem(key) ?? "null") as QueuedRequest[] | null,
    save: (requests) =>
      requests.length ? localStorage.setItem(key, JSON.stringify(requests)) : localStorage.removeItem(key),
  };
}

const copyKey = (session: string) => `sessiond.copy.${session}`;

function saveCopy(session: string, state: Readonly<Record<string, Json>>, version: number): void {
  try {
    localStorage.setItem(copyKey(session), JSON.stringify({ state, version }));
  } catch {
    // storage full or disabled: the copy is a convenience
  }
}

function loadCopy(session: string): { state: Record<string, Json>; version: number } | null {
  try {
    return JSON.parse(localStorage.getItem(copyKey(session)) ?? "null");
  } catch {
    return null;
  }
}

const STATUS_LABEL: Record<Status, string> = {
  connecting: "Connecting…",
  open: "Live",
  reconnecting: "Reconnecting…",
  offline: "Offline",
  closed: "Disconnected",
};

function SessionScreen({ config, session }: { config: AppConfig; session: string }) {
  const device = deviceId();
  const options = useMemo<ConnectOptions>(
    () => ({
      url: config.wsUrl,
      session,
      device,
      kind: "web",
      token: currentToken,
      optimistic: true,
      queue: localQueue(session, device),
      backoff: { baseMs: 200, maxMs: 5000 },
    }),
    [config.wsUrl, session, device],
  );
  const view = useSession(options);
  const { client, state, status, version, pending, devices, active } = view;
  const [message, setMessage] = useState<string | null>(null);
  const [ended, setEnded] = useState(false);
  const [text, setText] = useState("");
  // Until the first welcome of this page, show the copy this device saved last time (the SDK keeps no state across
  // reloads): read-only, since edits would apply to an empty document. Queued edits of the last run still go out.
  const [welcomed, setWelcomed] = useState(false);
  useEffect(() => {
    if (status === "open") setWelcomed(true);
  }, [status]);
  useEffect(() => {
    if (welcomed) saveCopy(session, state, version);
  }, [welcomed, session, state, version]);
  const copy = useMemo(() => (welcomed ? null : loadCopy(session)), [welcomed, session]);
  const readOnly = copy !== null;
  const tasks = tasksOf(copy ? copy.state : state);
  const [name, setName] = useState(() => recentSessions().find((s) => s.id === session)?.name);
  useEffect(() => {
    getSession(session).then((s) => setName(s.name), () => undefined); // offline: the remembered name
  }, [session]);

  useEffect(() => {
    if (!client) return;
    const offs = [
      client.on("error", (e) => setMessage(e.message)),
      client.on("ended", () => setEnded(true)),
      client.on("handoff", (who) => setMessage(who ? `Now active on ${who === device ? "this device" : who}` : null)),
    ];
    return () => offs.forEach((off) => off());
  }, [client, device]);

  const send = (change: ReturnType<typeof ops.add>) => {
    client?.apply(change).catch((e: Error) => setMessage(`Not saved: ${e.message}`));
  };

  const closedWhy = status === "closed" && !ended ? client?.error?.message : null;

  return (
    <main className="card" data-testid="session">
      <div className="status-line">
        <h1>{name || "Tasks"}</h1>
        <span className={`badge ${status}`} data-testid="status" data-status={status} title={`connection: ${status}`}>
          {STATUS_LABEL[status]}
        </span>
        <span className={`badge ${pending ? "pending" : "synced"}`} data-testid="pending" data-count={pending}>
          {pending ? `${pending} pending` : "all saved"}
        </span>
        <span className="muted" data-testid="version" data-version={version}>
          v{copy ? copy.version : version}
        </span>
      </div>
      {(status === "reconnecting" || status === "offline") && (
        <div className="banner warn" role="status" data-testid="reconnecting">
          {status === "offline" ? "No network." : "Connection lost, reconnecting…"} Your changes are kept
          {pending ? ` (${pending} waiting)` : ""} and sent when the server answers again.
        </div>
      )}
      {readOnly && (
        <div className="banner warn" data-testid="saved-copy">
          Showing the copy saved on this device (v{copy.version}); editing resumes when the server answers.
        </div>
      )}
      {ended && <div className="banner error">This session was deleted.</div>}
      {closedWhy && (
        <div className="banner error">
          Disconnected: {closedWhy}.{" "}
          <a href={BASE} onClick={(e) => (e.preventDefault(), go(BASE))}>
            Back to your sessions
          </a>
        </div>
      )}

      <Handoff
        device={device}
        active={active}
        devices={devices}
        live={status === "open"}
        known={welcomed}
        onPause={() => client?.pause().catch((e: Error) => setMessage(e.message))}
        onClaim={() => client?.claim().catch((e: Error) => setMessage(e.message))}
      />

      <form className="row" onSubmit={(e) => (e.preventDefault(), text.trim() && (send(ops.add(text.trim())), setText("")))}>
        <input
          data-testid="task-input"
          placeholder="Add a task"
          value={text}
          onChange={(e) => setText(e.target.value)}
          maxLength={200}
          disabled={readOnly}
        />
        <button data-testid="add" disabled={readOnly}>
          Add
        </button>
      </form>
      <ul className="tasks" data-testid="tasks">
        {tasks.map((task) => (
          <TaskRow key={task.id} task={task} send={send} disabled={readOnly} />
        ))}
      </ul>
      {tasks.length === 0 && <p className="muted">No tasks yet: add one, then watch it appear on your other device.</p>}
      {message && (
        <p className="note" data-testid="message">
          {message}
        </p>
      )}
      <p className="muted small">
        Session <code data-testid="session-id">{session}</code> · open{" "}
        <a href={`${BASE}s/${session}`}>this link</a> on another device (signed in as the same user) to join.
      </p>
    </main>
  );
}

function TaskRow(props: { task: Task; send: (o: ReturnType<typeof ops.add>) => void; disabled: boolean }) {
  const { task, send, disabled } = props;
  return (
    <li className={task.done ? "done" : ""} data-testid="task" data-text={task.text}>
      <label className="check">
        <input
          type="checkbox"
          checked={task.done}
          onChange={() => send(ops.toggle(task))}
          data-testid="toggle"
          disabled={disabled}
        />
        <span>{task.text}</span>
      </label>
      <div className="counter">
        <button className="round" aria-label="minus one" data-testid="dec" onClick={() => send(ops.bump(task, -1))} disabled={disabled}>
          −
        </button>
        <span data-testid="count">{task.count}</span>
        <button className="round" aria-label="plus one" data-testid="inc" onClick={() => send(ops.bump(task, 1))} disabled={disabled}>
          +
        </button>
        <button className="link" aria-label="delete" onClick={() => send(ops.remove(task))} disabled={disabled}>
          ✕
        </button>
      </div>
    </li>
  );
}

function Handoff(props: {
  device: string;
  active: string | null;
  devices: { device: string; kind?: string }[];
  live: boolean;
  known: boolean; // a welcome arrived: active and devices are the server's, not placeholders
  onPause: () => void;
  onClaim: () => void;
}) {
  const { device, active, devices, live } = props;
  const here = active === device;
  return (
    <section className={`devices${live ? "" : " stale"}`} data-testid="devices">
      <div className={`active-line ${here ? "here" : ""}`} data-testid="active" data-active={active ?? ""}>
        {!props.known ? (
          <span className="muted">Waiting for the server to say who is connected…</span>
        ) : here ? (
          <>
            <strong>Active on this device.</strong>
            <button data-testid="pause" onClick={props.onPause} disabled={!live}>
              Continue on another device
            </button>
          </>
        ) : active ? (
          <>
            <span>
              Active on <strong>{active}</strong>.
            </span>
            <button data-testid="claim" onClick={props.onClaim} disabled={!live}>
              Continue here
            </button>
          </>
        ) : (
          <>
            <span>Paused: no device is active.</span>
            <button data-testid="claim" onClick={props.onClaim} disabled={!live}>
              Continue here
            </button>
          </>
        )}
      </div>
      <ul className="device-list" title={live ? "connected devices" : "last known (not connected)"}>
        {devices.map((d) => (
          <li key={d.device} data-testid="device-chip" data-device={d.device} className={d.device === active ? "on" : ""}>
            <span className="dot" />
            {d.device}
            {d.device === device ? " (this device)" : ""}
            {d.kind ? <span className="muted"> · {d.kind}</span> : null}
            {d.device === active ? <span className="star"> · active</span> : null}
          </li>
        ))}
      </ul>
    </section>
  );
}
