/**
 * Frame encoding for the negotiated subprotocol, and decoding of server messages (a frame or a batch array).
 *
 * Decoding goes by message type, not by what was asked for (as client/wire.py does): text is always JSON, binary is
 * MessagePack when a MessagePack codec is loaded (JSON bytes otherwise), so a server that declined our subprotocol
 * still works.
 */

import { SessionError, SUBPROTOCOLS } from "./errors.js";
import type { MsgpackCodec } from "./types.js";

export type Frame = { t: string; [key: string]: unknown };

/** A server message that is neither JSON nor MessagePack: a protocol violation, so the client reconnects. */
export class DecodeError extends Error {}

export class Codec {
  readonly subprotocol: string;

  constructor(
    readonly kind: "json" | "msgpack",
    private readonly msgpack: MsgpackCodec | null,
  ) {
    this.subprotocol = SUBPROTOCOLS[kind];
  }

  /** Encode with the format the server chose (`protocol` of the open socket; empty means it chose none: JSON). */
  encode(frame: Frame, negotiated: string): string | Uint8Array {
    if (negotiated === SUBPROTOCOLS.msgpack && this.msgpack !== null) return this.msgpack.encode(frame);
    return JSON.stringify(frame);
  }

  /** All frames of one message, skipping items that are not objects with a string `t`. Throws DecodeError. */
  decode(data: unknown): Frame[] {
    let value: unknown;
    if (typeof data === "string") {
      value = parseJson(data);
    } else {
      const bytes = toBytes(data);
      if (bytes === null) throw new DecodeError(`unsupported message type ${Object.prototype.toString.call(data)}`);
      if (this.msgpack !== null) {
        try {
          value = this.msgpack.decode(bytes);
        } catch (exc) {
          throw new DecodeError(`bad msgpack message: ${String(exc)}`);
        }
      } else {
        value = parseJson(utf8(bytes));
      }
    }
    const items = Array.isArray(value) ? value : [value];
    return items.filter(
      (item): item is Frame =>
        typeof item === "object" && item !== null && !Array.isArray(item) && typeof (item as Frame).t === "string",
    );
  }
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (exc) {
    throw new DecodeError(`bad json message: ${String(exc)}`);
  }
}

function toBytes(data: unknown): Uint8Array | null {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (Array.isArray(data)) {
    // `ws` with fragmented messages and binaryType "nodebuffer" hands over a list of chunks.
    const chunks = data.map(toBytes);
    if (chunks.some((c) => c === null)) return null;
    const size = chunks.reduce((n, c) => n + (c as Uint8Array).length, 0);
    const out = new Uint8Array(size);
    let at = 0;
    for (const c of chunks as Uint8Array[]) {
      out.set(c, at);
      at += c.length;
    }
    return out;
  }
  return null;
}

function utf8(bytes: Uint8Array): string {
  const Decoder = (globalThis as unknown as { TextDecoder?: new () => { decode(b: Uint8Array): string } }).TextDecoder;
  if (Decoder !== undefined) return new Decoder().decode(bytes);
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b); // ASCII fallback (no TextDecoder on this platform)
  return decodeURIComponent(escape(text));
}

/** The MessagePack codec for `codec: "msgpack"`: the one passed in, else the optional peer `@msgpack/msgpack`. */
export async function loadMsgpack(given: MsgpackCodec | undefined): Promise<MsgpackCodec> {
  if (given !== undefined) return given;
  // A variable specifier keeps bundlers from resolving (and requiring) the optional package at build time.
  const name = "@msgpack/msgpack";
  try {
    const mod = (await import(/* @vite-ignore */ /* webpackIgnore: true */ name)) as MsgpackCodec;
    return { encode: (v) => mod.encode(v), decode: (b) => mod.decode(b) };
  } catch (exc) {
    throw new SessionError(
      "msgpack_unavailable",
      `codec "msgpack" needs @msgpack/msgpack installed, or pass { msgpack: { encode, decode } } (${String(exc)})`,
    );
  }
}
