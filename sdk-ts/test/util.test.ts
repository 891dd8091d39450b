/** Pure helpers: backoff bounds, JWT exp reading, pointer escaping, the local shape check. */

import { describe, expect, it } from "vitest";

import { backoffDelay, checkOps, escapeToken, parsePointer, SessionError, tokenExpiry } from "../src/index.js";

describe("backoffDelay", () => {
  it("is uniform in [0, min(max, base * 2^attempt)]", () => {
    expect(backoffDelay(0, 100, 10000, () => 1)).toBe(100);
    expect(backoffDelay(3, 100, 10000, () => 1)).toBe(800);
    expect(backoffDelay(3, 100, 10000, () => 0.25)).toBe(200);
    expect(backoffDelay(20, 100, 10000, () => 1)).toBe(10000);
    expect(backoffDelay(5000, 100, 10000, () => 0)).toBe(0);
  });
});

describe("tokenExpiry", () => {
  const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
  it("reads exp from a JWT payload (base64url, UTF-8)", () => {
    expect(tokenExpiry(`${b64({ alg: "HS256" })}.${b64({ sub: "zoë ✓", exp: 1700000000.5 })}.x`)).toBe(1700000000.5);
  });
  it("is null for opaque tokens or payloads without a numeric exp", () => {
    expect(tokenExpiry("opaque")).toBeNull();
    expect(tokenExpiry(`${b64({})}.${b64({ exp: "soon" })}.x`)).toBeNull();
    expect(tokenExpiry("a.!!!.c")).toBeNull();
  });
});

describe("pointers", () => {
  it("escape and parse round-trip", () => {
    for (const key of ["a/b", "m~n", "~1", "/~0", "", "plain"]) {
      expect(parsePointer(`/${escapeToken(key)}`)).toEqual([key]);
    }
  });
});

describe("checkOps", () => {
  it("normalises ops to the wire form", () => {
    expect(checkOps([{ op: "inc", path: "/n", extra: 1 }, { op: "del", path: "/x", value: 2 }])).toEqual([
      { op: "inc", path: "/n", by: 1 },
      { op: "del", path: "/x" },
    ]);
  });
  it("refuses what the server's codec refuses", () => {
    for (const bad of [[], [null], [{ op: "move", path: "/a" }], [{ op: "set", path: "/a" }], [{ op: "inc", path: "/a", by: "1" }],
      [{ op: "set", path: "a", value: 1 }], [{ op: "set", path: `/${"x".repeat(1024)}`, value: 1 }]]) {
      expect(() => checkOps(bad)).toThrow(SessionError);
    }
  });
});
