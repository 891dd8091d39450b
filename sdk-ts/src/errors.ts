/**
 * The one error type of the client, and the close-code policy (DESIGN §3; protocol/codes.py, client/wire.py).
 */

/**
 * A request failed or the session stopped. `code` is a DESIGN §3 error code (`invalid_op`, `conflict`, `too_large`,
 * `rate_limited`, `unauthorized`, `forbidden`, `not_found`, `slow_consumer`, `unavailable`, `internal`, `bad_frame`)
 * or a client-side one (`ended`, `closed`, `timeout`). `version` is the server's version when it sent one (`conflict`).
 */
export class SessionError extends Error {
  code: string;
  version?: number;

  constructor(code: string, message = "", version?: number) {
    super(message ? `${code}: ${message}` : code);
    this.name = "SessionError";
    this.code = code;
    if (version !== undefined) this.version = version;
  }
}

/** Close codes after which reconnecting cannot help: bad token, not the owner, no such session, deleted. */
export const FINAL_CLOSE_CODES: Readonly<Record<number, string>> = Object.freeze({
  4001: "unauthorized",
  4003: "forbidden",
  4004: "not_found",
  4010: "ended",
});

/** Subprotocol names of protocol v1. */
export const SUBPROTOCOLS = Object.freeze({ json: "sessiond.v1.json", msgpack: "sessiond.v1.msgpack" } as const);
