/**
 * The shared op-case table (protocol/cases/ops.json) through the TypeScript replica's applyOps. The Python server
 * runs the same table (tests/protocol/test_op_cases.py), so both sides apply ops identically.
 */

import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

import { describe, expect, it } from "vitest";

import { applyOps, type Json, type Op, SessionError } from "../src/index.js";

interface Case {
  name: string;
  state: Record<string, Json>;
  ops: Op[];
  result?: Record<string, Json>;
  error?: string;
}

const table = fileURLToPath(new URL("../../protocol/cases/ops.json", import.meta.url));
const cases = JSON.parse(readFileSync(table, "utf8")) as Case[];

/** Deep-freeze the input so any mutation by applyOps throws (strict mode) instead of passing unnoticed. */
function freeze<T>(value: T): T {
  if (typeof value === "object" && value !== null) {
    for (const key of Object.keys(value)) freeze((value as Record<string, unknown>)[key]);
    Object.freeze(value);
  }
  return value;
}

describe("shared op cases", () => {
  it("loads the whole table", () => {
    expect(cases.length).toBeGreaterThanOrEqual(60);
    expect(cases.filter((c) => c.error !== undefined).length).toBeGreaterThanOrEqual(20);
  });

  for (const c of cases) {
    it(c.name, () => {
      const input = freeze(structuredClone(c.state));
      const before = JSON.stringify(input);
      if (c.error !== undefined) {
        let caught: unknown;
        try {
          applyOps(input, c.ops);
        } catch (exc) {
          caught = exc;
        }
        expect(caught).toBeInstanceOf(SessionError);
        expect((caught as SessionError).code).toBe(c.error);
      } else {
        const out = applyOps(input, c.ops);
        expect(out).toEqual(c.result);
        // own keys only: a "__proto__" key must be data, never the prototype
        expect(JSON.parse(JSON.stringify(out))).toEqual(c.result);
      }
      expect(JSON.stringify(input)).toBe(before);
    });
  }
});

describe("applyOps structural sharing", () => {
  it("copies only the changed path", () => {
    const state = freeze({ a: { x: 1 }, b: { y: { z: 2 } } }) as Record<string, Json>;
    const out = applyOps(state, [{ op: "set", path: "/b/y/w", value: 3 }]);
    expect(out).not.toBe(state);
    expect(out.a).toBe(state.a);
    expect(out.b).not.toBe(state.b);
    expect(out).toEqual({ a: { x: 1 }, b: { y: { z: 2, w: 3 } } });
  });

  it("keeps values passed in from later mutation", () => {
    const value = { list: [1, 2] };
    const out = applyOps({}, [{ op: "set", path: "/v", value }]);
    value.list.push(3);
    expect(out).toEqual({ v: { list: [1, 2] } });
  });

  it("refuses values that are not JSON", () => {
    for (const value of [undefined, Number.NaN, Infinity, () => 1, new Date(0)]) {
      expect(() => applyOps({}, [{ op: "set", path: "/v", value: value as unknown as Json }])).toThrow(SessionError);
    }
  });
});
