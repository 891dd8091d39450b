/** Small platform-neutral helpers: timers looked up at call time (fake timers in tests), JWT `exp`, backoff. */

type TimerHandle = unknown;
interface Timers {
  setTimeout(cb: () => void, ms: number): TimerHandle;
  clearTimeout(handle: TimerHandle): void;
}

export function setTimer(cb: () => void, ms: number): TimerHandle {
  return (globalThis as unknown as Timers).setTimeout(cb, Math.max(0, ms));
}

export function clearTimer(handle: TimerHandle | null | undefined): void {
  if (handle !== null && handle !== undefined) (globalThis as unknown as Timers).clearTimeout(handle);
}

/** Full-jitter exponential backoff: uniform in [0, min(maxMs, baseMs * 2^attempt)] (client/wire.py backoff_delay). */
export function backoffDelay(attempt: number, baseMs: number, maxMs: number, random: () => number = Math.random): number {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(Math.max(attempt, 0), 60));
  return random() * ceiling;
}

const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

function base64UrlDecode(text: string): string {
  const clean = text.replace(/-/g, "+").replace(/_/g, "/").replace(/=+$/, "");
  let bits = 0;
  let value = 0;
  const bytes: number[] = [];
  for (const ch of clean) {
    const index = B64.indexOf(ch);
    if (index < 0) throw new Error("bad base64");
    value = (value << 6) | index;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      bytes.push((value >> bits) & 0xff);
    }
  }
  const Decoder = (globalThis as unknown as { TextDecoder?: new () => { decode(b: Uint8Array): string } }).TextDecoder;
  if (Decoder !== undefined) return new Decoder().decode(new Uint8Array(bytes));
  let latin = "";
  for (const b of bytes) latin += String.fromCharCode(b);
  return decodeURIComponent(escape(latin)); // UTF-8 without TextDecoder (older engines)
}

/** The `exp` claim (seconds since the epoch) of a JWT, read without verifying it; null when there is none. */
export function tokenExpiry(token: string): number | null {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const claims = JSON.parse(base64UrlDecode(parts[1])) as { exp?: unknown };
    return typeof claims.exp === "number" && Number.isFinite(claims.exp) ? claims.exp : null;
  } catch {
    return null;
  }
}
