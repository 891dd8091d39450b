/**
 * A real sessiond process for the browser tests: temp data dir, free ports, dev login on, the built app served.
 *
 * With E2E_REDIS_URL (the pytest wrapper passes the run's Redis and a private key prefix), acked changes go to the
 * Redis journal (SESSIOND_DURABILITY=redis), so a SIGKILL loses nothing acked: `kill()` is a real SIGKILL. Without
 * Redis the embedded mode keeps the journal in memory, which a SIGKILL would lose by design (README, Durability),
 * so `kill()` falls back to SIGTERM (a clean stop) and says so.
 */
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const REPO = resolve(import.meta.dirname, "..", "..");

export function freePort() {
  return new Promise((ok, fail) => {
    const probe = createServer();
    probe.unref();
    probe.on("error", fail);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => ok(port));
    });
  });
}

export async function waitFor(what, check, timeoutMs = 15000, everyMs = 100) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ""}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export class Sessiond {
  constructor({ python, redisUrl, redisPrefix, webDir }) {
    this.python = python ?? process.env.E2E_PYTHON ?? join(REPO, ".venv", "bin", "python");
    this.redisUrl = redisUrl ?? process.env.E2E_REDIS_URL ?? "";
    this.redisPrefix = redisPrefix ?? process.env.E2E_REDIS_PREFIX ?? `sessiond-e2e-${process.pid}:`;
    this.webDir = webDir ?? join(REPO, "web", "dist");
    this.dataDir = mkdtempSync(join(tmpdir(), "sessiond-e2e-"));
    this.proc = null;
    this.log = [];
  }

  get durable() {
    return Boolean(this.redisUrl);
  }

  get url() {
    return `http://127.0.0.1:${this.httpPort}`;
  }

  async start() {
    if (this.httpPort === undefined) {
      this.httpPort = await freePort();
      this.wsPort = await freePort();
    }
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("SESSIOND_")));
    Object.assign(env, {
      SESSIOND_HOST: "127.0.0.1",
      SESSIOND_HTTP_PORT: String(this.httpPort),
      SESSIOND_WS_PORT: String(this.wsPort),
      SESSIOND_DATA_DIR: this.dataDir,
      SESSIOND_WEB_DIR: this.webDir,
      SESSIOND_DEV_LOGIN: "1",
      SESSIOND_LOG_FORMAT: "json",
      SESSIOND_LOG_LEVEL: "warning",
      SESSIOND_SHUTDOWN_GRACE_S: "3",
    });
    if (this.redisUrl) {
      Object.assign(env, {
        SESSIOND_REDIS_URL: this.redisUrl,
        SESSIOND_REDIS_PREFIX: this.redisPrefix,
        SESSIOND_DURABILITY: "redis",
        SESSIOND_LEASE_TTL_S: "1", // after a SIGKILL the session's lease frees within 1 s
      });
    }
    const proc = spawn(this.python, ["-m", "api.cli", "serve"], { cwd: REPO, env, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    const keep = (chunk) => {
      this.log.push(chunk.toString());
      if (this.log.length > 400) this.log.splice(0, 100);
    };
    proc.stdout.on("data", keep);
    proc.stderr.on("data", keep);
    const exited = new Promise((r) => proc.once("exit", (code, signal) => r({ code, signal })));
    this.exited = exited;
    let gone = null;
    exited.then((x) => (gone = x));
    await waitFor("sessiond to be ready", async () => {
      if (gone) throw new Error(`sessiond exited (${JSON.stringify(gone)}):\n${this.tail()}`);
      const r = await fetch(`${this.url}/readyz`);
      return r.ok;
    }, 30000);
  }

  tail(lines = 40) {
    return this.log.join("").split("\n").slice(-lines).join("\n");
  }

  /** SIGKILL with a durable journal; a clean stop otherwise (see the module comment). */
  async kill() {
    const signal = this.durable ? "SIGKILL" : "SIGTERM";
    this.proc.kill(signal);
    await waitFor(`sessiond to exit on ${signal}`, async () => this.proc.exitCode !== null || this.proc.signalCode, 15000);
    return signal;
  }

  async stop() {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill("SIGTERM");
      const timer = setTimeout(() => this.proc.kill("SIGKILL"), 8000);
      await this.exited;
      clearTimeout(timer);
    }
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}
