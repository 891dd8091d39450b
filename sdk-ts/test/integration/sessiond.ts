/**
 * A real sessiond process for the integration tests (test-only code: Node APIs are fine here).
 *
 * Ports default to 0: the server binds free ones and logs them in its "sessiond listening" event, which we read,
 * so nothing races for a port. A restart reuses the ports of the first start (clients reconnect to the same URL).
 */

import { type ChildProcess, spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(fileURLToPath(new URL("../../..", import.meta.url)));
export const SESSIOND = join(ROOT, ".venv", "bin", "sessiond");

export const SERVER_ENV: Record<string, string> = {
  SESSIOND_LOG_FORMAT: "json",
  SESSIOND_RATE_LIMIT: "100000/100000", // tests fire hundreds of ops in a burst
  SESSIOND_REST_RATE_LIMIT: "100000/100000",
  SESSIOND_MAX_SESSIONS_PER_USER: "100000",
  SESSIOND_MAX_CONNECTIONS_PER_USER: "100000",
  SESSIOND_CHECKPOINT_EVERY_S: "0.2", // a SIGKILL loses at most this much of the embedded journal
};

export class Sessiond {
  readonly dataDir: string;
  readonly secret: string;
  httpPort = 0;
  wsPort = 0;
  private proc: ChildProcess | null = null;
  private exited: Promise<number | null> | null = null;
  log = "";

  private readonly extraEnv: Record<string, string>;

  constructor(opts: { dataDir?: string; secret?: string; env?: Record<string, string> } = {}) {
    this.extraEnv = opts.env ?? {};
    this.dataDir = opts.dataDir ?? mkdtempSync(join(tmpdir(), "sessiond-sdk-ts-"));
    this.secret = opts.secret ?? `sdk-ts-test-secret-${Math.random().toString(36).slice(2)}-0123456789abcdef`;
  }

  get http(): string {
    return `http://127.0.0.1:${this.httpPort}`;
  }

  get ws(): string {
    return `ws://127.0.0.1:${this.wsPort}/v1/ws`;
  }

  /** Start and wait until it listens and /readyz answers 200 (deadline `timeoutMs`). */
  async start(timeoutMs = 20000): Promise<void> {
    const env: Record<string, string> = {};
    for (const [key, value] of Object.entries(process.env)) {
      if (!key.startsWith("SESSIOND_") && value !== undefined) env[key] = value;
    }
    Object.assign(env, SERVER_ENV, this.extraEnv, {
      SESSIOND_HOST: "127.0.0.1",
      SESSIOND_HTTP_PORT: String(this.httpPort),
      SESSIOND_WS_PORT: String(this.wsPort),
      SESSIOND_DATA_DIR: this.dataDir,
      SESSIOND_JWT_SECRET: this.secret,
    });
    const proc = spawn(SESSIOND, ["serve"], { env, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    this.exited = new Promise((done) => proc.once("exit", (code) => done(code)));
    const listening = new Promise<void>((done, fail) => {
      let buffer = "";
      const onData = (chunk: Buffer) => {
        const text = chunk.toString();
        this.log += text;
        buffer += text;
        let newline: number;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + 1);
          try {
            const event = JSON.parse(line) as { event?: string; http_port?: number; ws_port?: number };
            if (event.event === "sessiond listening" && event.http_port && event.ws_port) {
              this.httpPort = event.http_port;
              this.wsPort = event.ws_port;
              done();
            }
          } catch {
            // not a JSON line (a traceback): kept in this.log
          }
        }
      };
      proc.stdout?.on("data", onData);
      proc.stderr?.on("data", onData);
      proc.once("exit", (code) => fail(new Error(`sessiond exited with ${code} before listening:\n${this.log}`)));
      proc.once("error", fail);
    });
    await withDeadline(listening, timeoutMs, () => `sessiond did not listen within ${timeoutMs} ms:\n${this.log}`);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        if ((await fetch(`${this.http}/readyz`)).ok) return;
      } catch {
        // not yet
      }
      if (Date.now() > deadline) throw new Error(`sessiond not ready within ${timeoutMs} ms:\n${this.log}`);
      await sleep(50);
    }
  }

  /** SIGTERM (graceful: checkpoints, closes devices with 1001) or SIGKILL; returns once the process is gone. */
  async stop(signal: "SIGTERM" | "SIGKILL" = "SIGTERM", graceMs = 15000): Promise<void> {
    const proc = this.proc;
    if (proc === null || this.exited === null) return;
    this.proc = null;
    if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
    let timer: NodeJS.Timeout | undefined;
    const gone = await Promise.race([
      this.exited.then(() => true),
      new Promise<boolean>((done) => (timer = setTimeout(() => done(false), graceMs))),
    ]);
    clearTimeout(timer);
    if (!gone) {
      proc.kill("SIGKILL");
      await this.exited;
    }
  }

  removeData(): void {
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((done) => setTimeout(done, ms));
}

async function withDeadline<T>(promise: Promise<T>, ms: number, message: () => string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, fail) => {
    timer = setTimeout(() => fail(new Error(message())), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** An HS256 JWT signed with the server's secret (what `sessiond token --user U` prints). */
export function mintToken(secret: string, sub: string, ttlS = 3600): string {
  const b64 = (value: object | Buffer) =>
    (Buffer.isBuffer(value) ? value : Buffer.from(JSON.stringify(value))).toString("base64url");
  const now = Date.now() / 1000;
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, iat: Math.floor(now), exp: now + ttlS })}`;
  return `${head}.${b64(createHmac("sha256", secret).update(head).digest())}`;
}
