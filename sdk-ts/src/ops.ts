/**
 * State ops of DESIGN §2 (set/del/inc on RFC 6901 JSON Pointers), with the semantics of protocol/ops.py.
 *
 * Pure and copy-on-write: `applyOps` never mutates its input; it copies only the objects on the changed paths
 * (structural sharing), so unchanged subtrees keep their identity (cheap React memoisation) and a failing op
 * needs no rollback: the input was never touched. The shared case table protocol/cases/ops.json keeps this
 * file and protocol/ops.py equal.
 *
 * One known difference, in key ORDER only: JavaScript objects list integer-like keys ("0", "42") first, in
 * numeric order, whatever order they were inserted in. Values are always equal.
 */

import { SessionError } from "./errors.js";
import type { Json, Op } from "./types.js";

export const MAX_POINTER_DEPTH = 32;
export const MAX_STATE_DEPTH = 64;
// What the server can carry: an integer result outside int64/uint64 is refused there (orjson), so here too.
const SAFE = 2 ** 53;
const BAD_ESCAPE = /~(?![01])/;

type Obj = Record<string, Json>;

function invalid(message: string): SessionError {
  return new SessionError("invalid_op", message);
}

const hasOwn = (obj: object, key: string): boolean => Object.prototype.hasOwnProperty.call(obj, key);

/** Set an own data property, also for keys like "__proto__" that plain assignment would treat specially. */
function put(obj: Obj, key: string, value: Json): void {
  if (key === "__proto__") {
    Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
  } else {
    obj[key] = value;
  }
}

/** Integer sum within [-2^63, 2^64 - 1], exactly as Python computes it (doubles round past 2^53: use BigInt there). */
function intInRange(a: number, b: number): boolean {
  const sum = a + b;
  if (Math.abs(a) < SAFE && Math.abs(b) < SAFE && Math.abs(sum) < SAFE) return true;
  const exact = BigInt(a) + BigInt(b);
  return exact >= -(BigInt(2) ** BigInt(63)) && exact <= BigInt(2) ** BigInt(64) - BigInt(1);
}

function isObject(value: unknown): value is Obj {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function isNumber(value: unknown): value is number {
  return typeof value === "number" && Number.isFinite(value);
}

/** Split an RFC 6901 pointer into unescaped tokens; `""` is the whole document. Throws SessionError("invalid_op"). */
export function parsePointer(path: string): string[] {
  if (path === "") return [];
  if (!path.startsWith("/")) throw invalid(`path ${JSON.stringify(path)} must be empty or start with '/'`);
  const tokens = path.slice(1).split("/");
  if (tokens.length > MAX_POINTER_DEPTH) throw invalid(`path deeper than ${MAX_POINTER_DEPTH} levels`);
  return tokens.map((token) => {
    if (!token.includes("~")) return token;
    if (BAD_ESCAPE.test(token)) throw invalid(`bad escape in path ${JSON.stringify(path)}`);
    return token.replace(/~1/g, "/").replace(/~0/g, "~");
  });
}

/** Escape one key for use in a pointer (`~` → `~0`, `/` → `~1`). */
export function escapeToken(key: string): string {
  return key.replace(/~/g, "~0").replace(/\//g, "~1");
}

/**
 * Own deep copy of a value landing at `depth` in the document; refuses nesting past MAX_STATE_DEPTH (as the
 * server does) and anything that is not JSON (undefined, NaN, functions, class instances...).
 */
function copyValue(value: unknown, depth: number): Json {
  if (value === null || typeof value === "string" || typeof value === "boolean") return value;
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw invalid("numbers must be finite");
    return value;
  }
  if (Array.isArray(value)) {
    if (depth >= MAX_STATE_DEPTH) throw invalid(`the state may nest at most ${MAX_STATE_DEPTH} levels`);
    return value.map((item) => copyValue(item, depth + 1));
  }
  if (typeof value === "object") {
    const proto = Object.getPrototypeOf(value);
    if (proto !== Object.prototype && proto !== null) throw invalid("values must be plain JSON objects");
    if (depth >= MAX_STATE_DEPTH) throw invalid(`the state may nest at most ${MAX_STATE_DEPTH} levels`);
    const out: Obj = {};
    for (const key of Object.keys(value)) put(out, key, copyValue((value as Obj)[key], depth + 1));
    return out;
  }
  throw invalid(`a value of type ${typeof value} is not JSON`);
}

/** The objects of the draft that this change already copied (safe to mutate). */
type Owned = Set<object>;

function shallowCopy(obj: Obj, owned: Owned): Obj {
  const out: Obj = {};
  for (const key of Object.keys(obj)) put(out, key, obj[key]);
  owned.add(out);
  return out;
}

/** The (owned, mutable) object holding the last token; creates missing parents when `create`. */
function parentOf(root: Obj, tokens: string[], create: boolean, owned: Owned): Obj | null {
  let node = root;
  for (let i = 0; i < tokens.length - 1; i++) {
    const token = tokens[i];
    if (!hasOwn(node, token)) {
      if (!create) return null;
      const fresh: Obj = {};
      owned.add(fresh);
      put(node, token, fresh);
      node = fresh;
      continue;
    }
    let child = node[token];
    if (!isObject(child)) throw invalid(`cannot traverse through a non-object at ${JSON.stringify(token)}`);
    if (!owned.has(child)) {
      child = shallowCopy(child, owned);
      put(node, token, child);
    }
    node = child;
  }
  return node;
}

function applyOne(draft: { root: Obj }, op: unknown, owned: Owned): void {
  if (!isObject(op)) throw invalid("an op must be an object");
  const kind = op.op;
  const path = op.path;
  if (typeof path !== "string") throw invalid("path must be a string");
  const tokens = parsePointer(path);
  if (kind === "set") {
    if (!hasOwn(op, "value")) throw invalid("set needs a value");
    const value = op.value;
    if (tokens.length === 0) {
      if (!isObject(value)) throw invalid("setting the whole document needs an object");
      const root: Obj = {};
      for (const key of Object.keys(value)) put(root, key, copyValue(value[key], 1));
      owned.add(root);
      draft.root = root;
      return;
    }
    const parent = parentOf(draft.root, tokens, true, owned) as Obj;
    put(parent, tokens[tokens.length - 1], copyValue(value, tokens.length));
  } else if (kind === "del") {
    if (tokens.length === 0) throw invalid("cannot delete the whole document");
    const parent = parentOf(draft.root, tokens, false, owned);
    const key = tokens[tokens.length - 1];
    if (parent !== null && hasOwn(parent, key)) delete parent[key];
  } else if (kind === "inc") {
    const by = hasOwn(op, "by") && op.by !== undefined ? op.by : 1;
    if (!isNumber(by)) throw invalid("inc needs a numeric 'by'");
    if (tokens.length === 0) throw invalid("cannot increment the whole document");
    const parent = parentOf(draft.root, tokens, true, owned) as Obj;
    const key = tokens[tokens.length - 1];
    const current = hasOwn(parent, key) ? parent[key] : 0;
    if (!isNumber(current)) throw invalid(`cannot increment a non-number at ${JSON.stringify(path)}`);
    const result = current + by;
    if (!Number.isFinite(result) || (Number.isInteger(current) && Number.isInteger(by) && !intInRange(current, by))) {
      throw invalid(`inc at ${JSON.stringify(path)} would leave the range JSON can carry`);
    }
    put(parent, key, result);
  } else {
    throw invalid(`unknown op ${JSON.stringify(kind ?? null)}`);
  }
}

/**
 * Apply a change (all ops, atomically) to `state` and return the new state; `state` itself is never modified.
 * Throws SessionError with code `invalid_op` when any op cannot apply (then nothing changed).
 */
export function applyOps(state: Record<string, Json>, ops: Op[]): Record<string, Json> {
  if (!Array.isArray(ops)) throw invalid("ops must be a list");
  const owned: Owned = new Set();
  const draft = { root: shallowCopy(state as Obj, owned) };
  for (const op of ops) applyOne(draft, op, owned);
  return draft.root;
}

/**
 * The shape check the server's codec makes before an op reaches the state (protocol/codec.py `_check_op`), plus
 * JSON-ness of values, so a malformed request is refused locally (SessionError `invalid_op`) instead of costing a
 * round trip. Returns the ops normalised to the wire form (unknown keys dropped, `by` filled in).
 */
export function checkOps(ops: unknown): Op[] {
  if (!Array.isArray(ops) || ops.length === 0) throw invalid("ops must be a non-empty list");
  if (ops.length > 1000) throw invalid("at most 1000 ops per change");
  return ops.map((item): Op => {
    if (!isObject(item)) throw invalid("each op must be an object");
    const path = item.path;
    if (typeof path !== "string" || path.length > 1024) {
      throw invalid("op 'path' must be a string of at most 1024 characters");
    }
    parsePointer(path);
    if (item.op === "set") {
      if (!hasOwn(item, "value") || item.value === undefined) throw invalid("set needs a 'value'");
      return { op: "set", path, value: copyValue(item.value, 0) };
    }
    if (item.op === "del") return { op: "del", path };
    if (item.op === "inc") {
      const by = item.by === undefined || item.by === null ? 1 : item.by;
      if (!isNumber(by)) throw invalid("inc 'by' must be a finite number");
      return { op: "inc", path, by };
    }
    throw invalid("op 'op' must be set, del or inc");
  });
}
