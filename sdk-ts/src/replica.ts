/**
 * The client's local copy of a session, kept exact by version discipline (DESIGN §3, §5.1); no sockets here.
 * Mirrors client/replica.py.
 *
 * Every change moves `version` by exactly one. A patch that skips a version is a gap (drop and resume); our own op
 * is applied when its ack says it is the next version (the server sends the sender no patch for it); an ack that
 * overtakes a not-yet-received patch is held until the gap fills. A replay that does not line up, or ops that do
 * not apply, mean our copy diverged: resync from a full welcome.
 */

import type { Frame } from "./codec.js";
import { applyOps } from "./ops.js";
import type { ChangeInfo, Device, Json, Op } from "./types.js";

export const MAX_HELD = 1024;

/** The local copy cannot follow the stream: reconnect, with `resume` (replay) or without (full state). */
export class ResyncNeeded extends Error {
  constructor(
    readonly resume: boolean,
    readonly why: string,
  ) {
    super(why);
  }
}

const isInt = (value: unknown): value is number => typeof value === "number" && Number.isInteger(value);

function devicesOf(value: unknown): Device[] {
  if (!Array.isArray(value)) return [];
  return value.filter(
    (d): d is Device => typeof d === "object" && d !== null && typeof (d as Device).device === "string",
  );
}

export class Replica {
  state: Record<string, Json> = {};
  version = 0;
  epoch: string | null = null;
  active: string | null = null;
  devices: Device[] = [];
  haveState = false;
  /** Acked own changes that arrived ahead of a missing patch, by version. */
  readonly held = new Map<number, Op[]>();
  heldSince: number | null = null;

  constructor(
    readonly device: string,
    private readonly onChange: (info: ChangeInfo) => void,
    private readonly now: () => number = () => Date.now(),
  ) {}

  onWelcome(frame: Frame): void {
    // Who is here first, so listeners of the change events below read them current.
    this.epoch = typeof frame.epoch === "string" ? frame.epoch : null;
    this.active = typeof frame.active === "string" ? frame.active : null;
    this.devices = devicesOf(frame.devices);
    if (frame.mode === "replay") {
      const patches = Array.isArray(frame.patches) ? frame.patches : [];
      for (const patch of patches) {
        const p = (typeof patch === "object" && patch !== null ? patch : {}) as Record<string, unknown>;
        if (p.version !== this.version + 1) {
          throw new ResyncNeeded(false, `replay gap: got ${String(p.version)} at ${this.version}`);
        }
        const device = typeof p.device === "string" ? p.device : null;
        this.apply((p.ops as Op[]) ?? [], p.version as number, device, "welcome");
      }
      const version = frame.version ?? this.version;
      if (version !== this.version) {
        throw new ResyncNeeded(false, `replay ends at ${this.version}, welcome says ${String(frame.version)}`);
      }
    } else {
      const { state, version } = frame;
      if (typeof state !== "object" || state === null || Array.isArray(state) || !isInt(version)) {
        throw new ResyncNeeded(false, "full welcome without state/version");
      }
      this.state = state as Record<string, Json>;
      this.version = version;
      this.onChange({ source: "welcome" });
    }
    this.haveState = true;
    this.drainHeld();
  }

  onPatch(frame: Frame): void {
    const version = frame.version;
    if (!isInt(version) || version <= this.version) return; // a duplicate (already in a welcome we got)
    if (version !== this.version + 1) throw new ResyncNeeded(true, `gap: patch ${version} at version ${this.version}`);
    const device = typeof frame.device === "string" ? frame.device : null;
    this.apply((frame.ops as Op[]) ?? [], version, device, "patch");
    this.drainHeld();
  }

  /** Our own change was acked at `version`: apply it in order (or hold it until the stream catches up). */
  onOwnAck(version: number, ops: Op[]): void {
    if (version === this.version + 1) {
      this.apply(ops, version, this.device, "ack");
      this.drainHeld();
    } else if (version > this.version + 1) {
      this.held.set(version, ops);
      if (this.heldSince === null) this.heldSince = this.now();
      if (this.held.size > MAX_HELD) throw new ResyncNeeded(true, "too many acks ahead of the stream");
    }
    // version <= this.version: already part of a welcome we received.
  }

  onHandoff(frame: Frame): void {
    this.active = typeof frame.active === "string" ? frame.active : null;
  }

  onPresence(frame: Frame): void {
    this.devices = devicesOf(frame.devices);
    if ("active" in frame) this.active = typeof frame.active === "string" ? frame.active : null;
  }

  private apply(ops: Op[], version: number, device: string | null, source: ChangeInfo["source"]): void {
    let next: Record<string, Json>;
    try {
      next = applyOps(this.state, ops);
    } catch (exc) {
      throw new ResyncNeeded(false, `local state diverged at version ${version}: ${String(exc)}`);
    }
    this.state = next;
    this.version = version;
    const own = device === this.device;
    this.onChange({ source: source === "welcome" || !own ? source : "ack", device, ops });
  }

  private drainHeld(): void {
    if (this.held.size === 0) return;
    for (const version of [...this.held.keys()]) if (version <= this.version) this.held.delete(version);
    while (this.held.has(this.version + 1)) {
      const version = this.version + 1;
      const ops = this.held.get(version) as Op[];
      this.held.delete(version);
      this.apply(ops, version, this.device, "ack");
    }
    if (this.held.size === 0) this.heldSince = null;
  }
}
