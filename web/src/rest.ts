/** The REST calls the app needs (DESIGN §4): list and create sessions. Same origin as the page. */
import type { Json } from "@sessiond/client";
import { currentToken } from "./auth";

export interface SessionSummary {
  id: string;
  name: string;
  status: string;
  version: number;
  active: string | null;
  updated_at: number;
}

export class RestError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { Authorization: `Bearer ${await currentToken()}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = (await response.json().catch(() => ({}))) as { error?: { message?: string } };
  if (!response.ok) throw new RestError(response.status, data.error?.message ?? `HTTP ${response.status}`);
  return data as T;
}

const RECENT = "sessiond.recent";

/** The caller's sessions; the last list is kept so the app can offer them when the server cannot be reached. */
export async function listSessions(): Promise<SessionSummary[]> {
  const sessions = (await call<{ sessions: SessionSummary[] }>("GET", "/v1/sessions?limit=50")).sessions;
  localStorage.setItem(RECENT, JSON.stringify(sessions.slice(0, 20)));
  return sessions;
}

export function recentSessions(): SessionSummary[] {
  try {
    return JSON.parse(localStorage.getItem(RECENT) ?? "[]") as SessionSummary[];
  } catch {
    return [];
  }
}

function remember(session: SessionSummary): void {
  const { id, name, status, version, active, updated_at } = session;
  const recent = [{ id, name, status, version, active, updated_at }, ...recentSessions().filter((s) => s.id !== id)];
  localStorage.setItem(RECENT, JSON.stringify(recent.slice(0, 20)));
}

export async function createSession(name: string, state: Record<string, Json>): Promise<SessionSummary> {
  const created = await call<SessionSummary>("POST", "/v1/sessions", { name, state });
  remember(created);
  return created;
}

/** One session's record (its name for the title); remembered for the offline list. */
export async function getSession(id: string): Promise<SessionSummary> {
  const found = await call<SessionSummary>("GET", `/v1/sessions/${encodeURIComponent(id)}`);
  remember(found);
  return found;
}
