/**
 * Who is signed in, and a token for every REST call and (re)connect.
 *
 * Two ways in: dev login (`POST /v1/dev/token`, only when the server runs with SESSIOND_DEV_LOGIN=1; tokens are
 * short-lived and minted again shortly before they expire) or a pasted token (`sessiond token --user U`), used as
 * is until it expires. Kept in localStorage, so a reload (also offline) stays signed in.
 */

const KEY = "sessiond.auth";
const REFRESH_MARGIN_S = 60;

export interface Identity {
  mode: "dev" | "token";
  user: string;
  token: string;
  exp: number; // seconds since the epoch
}

export class AuthError extends Error {}

/** The JWT payload's `sub` and `exp` (not verified: the server does that; this only reads them for display). */
export function readJwt(token: string): { sub: string; exp: number } {
  const part = token.split(".")[1];
  if (!part) throw new AuthError("this does not look like a JWT");
  try {
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    const payload = JSON.parse(json) as { sub?: unknown; exp?: unknown };
    if (typeof payload.sub !== "string" || typeof payload.exp !== "number") throw new Error("claims");
    return { sub: payload.sub, exp: payload.exp };
  } catch {
    throw new AuthError("this token has no readable sub/exp claims");
  }
}

export function loadIdentity(): Identity | null {
  try {
    const raw = localStorage.getItem(KEY);
    return raw ? (JSON.parse(raw) as Identity) : null;
  } catch {
    return null;
  }
}

function save(identity: Identity | null): void {
  if (identity) localStorage.setItem(KEY, JSON.stringify(identity));
  else localStorage.removeItem(KEY);
}

export function signOut(): void {
  save(null);
}

async function mintDev(user: string): Promise<Identity> {
  const response = await fetch("/v1/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user }),
  });
  if (response.status === 404) throw new AuthError("dev login is off on this server: paste a token instead");
  const body = (await response.json().catch(() => ({}))) as { token?: string; error?: { message?: string } };
  if (!response.ok || !body.token) throw new AuthError(body.error?.message ?? `sign-in failed (${response.status})`);
  const identity: Identity = { mode: "dev", user, token: body.token, exp: readJwt(body.token).exp };
  save(identity);
  return identity;
}

export async function signInDev(user: string): Promise<Identity> {
  return mintDev(user.trim());
}

export function signInWithToken(token: string): Identity {
  const clean = token.trim();
  const { sub, exp } = readJwt(clean);
  if (exp * 1000 <= Date.now()) throw new AuthError("this token has expired");
  const identity: Identity = { mode: "token", user: sub, token: clean, exp };
  save(identity);
  return identity;
}

/** A current token: a dev identity mints a new one shortly before expiry; a pasted one is returned until it expires. */
export async function currentToken(): Promise<string> {
  const identity = loadIdentity();
  if (!identity) throw new AuthError("signed out");
  const left = identity.exp - Date.now() / 1000;
  if (left > REFRESH_MARGIN_S) return identity.token;
  if (identity.mode === "dev") {
    try {
      return (await mintDev(identity.user)).token;
    } catch (error) {
      if (left > 0) return identity.token; // offline: the old one still works for a while
      throw error;
    }
  }
  if (left > 0) return identity.token;
  throw new AuthError("your token has expired: sign in again");
}
