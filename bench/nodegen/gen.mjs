#!/usr/bin/env node
// The bench's load generator on Node's `ws` (issue 9): the same workload and figures as bench/loadgen.py, whose
// trio-websocket clients saturate their core before a sessiond does.
//
//   node gen.mjs [JOB.json | -] [--procs N] [--events]
//
// The job (a file, or stdin when no file or `-` is given) is one JSON object:
//   {"url": "ws://127.0.0.1:8443/v1/ws",            every device's server unless the device names its own
//    "subprotocol": "sessiond.v1.json",            offered on the upgrade (null: offer none)
//    "token": "JWT",                                for devices without a token of their own (null: no token)
//    "devices": [{"session": SID, "device": DID, "token"?: JWT, "url"?: URL}, ...],
//    "rate": 10, "warmup": 2, "duration": 10,       ops/s per device (0: idle devices, connected and held); seconds
//    "drain": 3, "connect_concurrency": 200, "kind": "other", "bucket_s"?: 0.3, "samples"?: false,
//    "scenario"?: "fanout",                         or "handoff" (below; then `rate` is not used)
//    "handoff_ops"?: 3, "handoff_rate"?: 0}         handoff: acked ops between two handoffs; handoffs/s per session
//                                                   (0 or null: each pair as fast as it can, a closed loop)
//
// Each device opens a WebSocket, says hello, waits for its welcome, then sends `rate` set ops/s from a random phase,
// `{"op":"set","path":"/d/<device>","value":{"t":<ns>,"n":<seq>}}`, scheduled by one timer wheel (no drift; a late
// device catches up, and one more than 1 s behind skips ahead and counts a lag event, as loadgen.py does). `t` is
// process.hrtime.bigint() minus the job's epoch, so the other devices of the session, which live in the same
// process, measure delivery latency on the same clock. Only ops sent inside the window [warmup, warmup + duration)
// count towards latency and offered load; deliveries are counted by receive time (throughput) and by send time
// (delivered vs offered). After the window the generator waits up to `drain` s for missing acks and deliveries.
//
// "scenario": "handoff" is bench/scenarios.py's handoff, the same workload as loadgen.py's: every session has two
// devices; the one sorted first claims, then, until warmup + duration have passed (the window is the whole run:
// w0 = start), the active device sends `handoff_ops` ops one at a time, each awaited for its ack, pauses (acked),
// and the other claims (acked): one handoff, timed from the pause sent to the claim acked; the roles swap. Paced
// (`handoff_rate` > 0): each pair starts a handoff every 1/handoff_rate s from a random phase, without drift. A
// request answered by an error frame, unanswered in 10 s or cut by a closed socket ends that pair's loop (counted
// in errors). Each device logs (version, n) of its acked ops and (version, device, n) of the patches it gets;
// after the loops (and up to `drain` s for the patches still due) every pair is checked: lost (acked by one, never
// seen by the other), duplicated (seen twice), version gaps (holes in the versions both acked).
//
// stdout: one JSON result (counts, ack and delivery percentiles in ms, errors by code, lag events, this
// generator's CPU over the window from process.cpuUsage(); with "samples": true every latency sample in ns).
// handoff: handoffs (all, and those done inside the window), their latency in ms (and every sample in ns),
// changes_acked, lost, duplicated, version_gaps, errors and the CPU as for fanout.
// --events: progress as JSON lines on stderr: `{"event":"connecting","t_ns":..}` when the first connection opens,
// `{"event":"connected",..,"connect_s":..,"connect_cpu_s":..}` once every device has its welcome (the generator's
// own CPU over that phase), then `{"event":"start","w0_ns":..,"w1_ns":..}`, then `progress` (handoff: with the
// `handoffs` so far); instants are on CLOCK_MONOTONIC (what process.hrtime and Python's time.monotonic_ns read), so
// a driver can measure the server over exactly the same phase or window (bench capacity --generator node measures
// the connect rate over the first two).
// --procs N: N child processes, each with whole sessions (latency never crosses processes), started together on
// one shared clock; their results are merged (sums, every sample, CPU per process).

import { fork } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';

const HERE = fileURLToPath(import.meta.url);
const NS_PER_S = 1e9;
const LAG_LIMIT_NS = 1e9; // a sender this far behind its schedule skips ahead (a lag event)
const SLOT_NS = 1e6; // timer wheel: 1 ms slots...
const SLOTS = 1024; // ...over about 1 s; a longer interval waits whole turns of the wheel
const HELLO_TIMEOUT_MS = 15_000;
const CLOSE_TIMEOUT_MS = 2_000;
const REQUEST_TIMEOUT_NS = 10e9; // handoff: a request unanswered this long ends its pair (loadgen.py's timeout)
const PROGRESS_MS = 500;

let epoch = process.hrtime.bigint(); // ns on CLOCK_MONOTONIC; a worker takes its parent's
const now = () => Number(process.hrtime.bigint() - epoch); // ns since the epoch: exact in a double for 104 days

// ---- measurement ---------------------------------------------------------------------------------------------

/** Latency samples in ns, in a growing typed array: no per-sample object, cheap to sort and to pass on. */
class Samples {
  constructor(values) {
    this.buf = values ?? new Float64Array(1 << 14);
    this.n = values ? values.length : 0;
  }

  add(ns) {
    if (this.n === this.buf.length) {
      const bigger = new Float64Array(this.buf.length * 2);
      bigger.set(this.buf);
      this.buf = bigger;
    }
    this.buf[this.n++] = ns;
  }

  values() {
    return this.buf.subarray(0, this.n);
  }
}

/** Nearest-rank percentile of an ascending array (q in 0..100), as bench/stats.py computes it; null when empty. */
function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  const rank = Math.max(1, Math.ceil((q / 100) * sorted.length));
  return sorted[rank - 1];
}

/** count, mean, p50, p90, p99, max in ms: the shape of bench/stats.py's Latency.summary(). */
function summary(values) {
  const sorted = Float64Array.from(values).sort();
  const ms = (v) => (v === null ? null : v * 1e-6);
  let sum = 0;
  for (const v of sorted) sum += v;
  return {
    count: sorted.length,
    mean_ms: sorted.length ? (sum / sorted.length) * 1e-6 : null,
    p50_ms: ms(percentile(sorted, 50)),
    p90_ms: ms(percentile(sorted, 90)),
    p99_ms: ms(percentile(sorted, 99)),
    max_ms: ms(sorted.length ? sorted[sorted.length - 1] : null),
  };
}

/** Events per time bucket from the start of the schedule: throughput over time. */
class Timeline {
  constructor(bucketS) {
    this.bucketNs = bucketS * NS_PER_S;
    this.t0 = Infinity;
    this.counts = [];
  }

  add(t) {
    const i = Math.floor((t - this.t0) / this.bucketNs);
    if (!(i >= 0)) return; // before the start (or no start yet)
    while (this.counts.length <= i) this.counts.push(0);
    this.counts[i] += 1;
  }
}

/** Everything the devices of this process observe; the window is [w0, w1) in ns since the epoch. */
class Recorder {
  constructor(bucketS) {
    this.w0 = Infinity;
    this.w1 = Infinity;
    this.ack = new Samples();
    this.delivery = new Samples();
    this.sentTotal = 0;
    this.sentInWindow = 0;
    this.ackedInWindow = 0;
    this.deliveredTotal = 0;
    this.deliveredInWindow = 0; // received inside the window (throughput, server CPU per message)
    this.deliveredOfWindowOps = 0; // of ops sent inside the window, whenever received (vs offered)
    this.errors = new Map();
    this.lagEvents = 0;
    this.deliveries = new Timeline(bucketS);
    this.sends = new Timeline(bucketS);
    this.handoff = new Samples(); // handoff: pause sent -> claim acked, every handoff (no warm-up, as loadgen.py)
    this.handoffs = 0;
    this.handoffsInWindow = 0; // done before w1: what the server's CPU over the window is divided by
  }

  inWindow(t) {
    return this.w0 <= t && t < this.w1;
  }

  error(code, n = 1) {
    this.errors.set(code, (this.errors.get(code) ?? 0) + n);
  }

  errorCount() {
    let n = 0;
    for (const v of this.errors.values()) n += v;
    return n;
  }
}

// ---- one device ----------------------------------------------------------------------------------------------

/** What a handoff device saw: (version, n) of its own acked ops, (version, device, n) of the patches it got. */
class HandoffLog {
  constructor() {
    this.ackedVersion = [];
    this.ackedN = [];
    this.patchVersion = [];
    this.patchDevice = [];
    this.patchN = [];
    this.nOf = new Map(); // op id -> n, until its ack (or error)
  }
}

/** One connection: sends ops, records acks and patches (single frames or batched as arrays). */
class Device {
  constructor(spec, job, rec, sessionSize) {
    this.session = String(spec.session);
    this.device = String(spec.device);
    this.token = spec.token ?? job.token ?? null;
    this.url = spec.url ?? job.url;
    this.rec = rec;
    this.sessionSize = sessionSize;
    this.path = JSON.stringify(`/d/${this.device}`);
    this.ws = null;
    this.nextId = 0;
    this.seq = 0;
    this.pending = new Map(); // op id -> send time
    this.lastVersion = -1;
    this.sentInWindow = 0;
    this.closed = false;
    this.closing = false;
    this.due = 0; // next send, ns since the epoch (the timer wheel's)
    this.log = job.scenario === 'handoff' ? new HandoffLog() : null;
    this.waiting = null; // handoff: the one request awaited, {id, kind, sent, resolve}
  }

  /** Open, say hello, resolve on the welcome; rejects on an error frame, a close or the timeout. */
  connect(subprotocol, kind) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url, subprotocol ? [subprotocol] : undefined, {
        perMessageDeflate: false, // as trio-websocket: none
        maxPayload: 16 << 20,
        skipUTF8Validation: true, // JSON.parse rejects what it cannot read
        handshakeTimeout: HELLO_TIMEOUT_MS,
      });
      this.ws = ws;
      let welcomed = false;
      const timer = setTimeout(() => fail(new Error('no welcome in time')), HELLO_TIMEOUT_MS);
      const fail = (err) => {
        if (welcomed) return;
        welcomed = true;
        clearTimeout(timer);
        this.closed = true;
        ws.terminate();
        reject(err);
      };
      ws.on('error', (err) => fail(err));
      ws.on('open', () => {
        const hello = { t: 'hello', session: this.session, device: this.device, kind };
        if (this.token) hello.token = this.token;
        ws.send(JSON.stringify(hello));
      });
      ws.on('close', () => {
        if (!welcomed) fail(new Error('closed before the welcome'));
        else if (!this.closed) {
          this.closed = true;
          if (!this.closing) this.rec.error('disconnected');
        }
        this.answer(null);
        if (this.onClosed) this.onClosed();
      });
      ws.on('message', (data) => {
        if (welcomed) {
          this.onMessage(data);
          return;
        }
        let frames;
        try {
          frames = JSON.parse(data);
        } catch {
          fail(new Error('unreadable first frame'));
          return;
        }
        frames = Array.isArray(frames) ? frames : [frames];
        if (frames.some((f) => f.t === 'welcome')) {
          welcomed = true;
          clearTimeout(timer);
          resolve(this);
        } else if (frames.some((f) => f.t === 'error')) {
          fail(new Error(`hello refused: ${JSON.stringify(frames)}`));
        }
      });
    });
  }

  /** One small `set` op stamped with its send time; returns its id. */
  sendOp() {
    const id = ++this.nextId;
    const n = ++this.seq;
    const t = now();
    const rec = this.rec;
    this.pending.set(id, t);
    if (this.log) this.log.nOf.set(id, n);
    rec.sentTotal += 1;
    rec.sends.add(t);
    if (rec.inWindow(t)) {
      rec.sentInWindow += 1;
      this.sentInWindow += 1;
    }
    this.ws.send(`{"t":"op","id":${id},"ops":[{"op":"set","path":${this.path},"value":{"t":${t},"n":${n}}}]}`);
    return id;
  }

  /**
   * handoff: send an op, `pause` or `claim` and resolve with its answer (the ack, or an error frame with its id),
   * or null when the socket closed or nothing came in REQUEST_TIMEOUT_NS (see expire). One request at a time.
   */
  request(kind) {
    if (this.closed) return Promise.resolve(null);
    return new Promise((resolve) => {
      let id;
      if (kind === 'op') {
        id = this.sendOp();
      } else {
        id = ++this.nextId;
        this.pending.set(id, now());
        this.ws.send(`{"t":"${kind}","id":${id}}`);
      }
      this.waiting = { id, kind, sent: now(), resolve };
    });
  }

  /** Resolve the request awaited with `frame` (null: no answer will come). */
  answer(frame) {
    const waiting = this.waiting;
    if (waiting === null || (frame !== null && frame.id !== waiting.id)) return;
    this.waiting = null;
    waiting.resolve(frame);
  }

  /** A request unanswered since before `t - REQUEST_TIMEOUT_NS` ends (`<kind>_timeout`, as loadgen.py counts it). */
  expire(t) {
    if (this.waiting !== null && t - this.waiting.sent > REQUEST_TIMEOUT_NS) {
      this.rec.error(`${this.waiting.kind}_timeout`);
      this.answer(null);
    }
  }

  onMessage(data) {
    const t = now();
    let frames;
    try {
      frames = JSON.parse(data);
    } catch {
      this.rec.error('bad_frame_received');
      return;
    }
    if (Array.isArray(frames)) {
      for (const frame of frames) this.onFrame(frame, t);
    } else {
      this.onFrame(frames, t);
    }
  }

  onFrame(frame, t) {
    const rec = this.rec;
    switch (frame.t) {
      case 'patch': {
        rec.deliveredTotal += 1;
        rec.deliveries.add(t);
        if (rec.inWindow(t)) rec.deliveredInWindow += 1;
        const version = frame.version ?? 0;
        if (version <= this.lastVersion) rec.error('patch_out_of_order');
        if (version > this.lastVersion) this.lastVersion = version;
        const log = this.log;
        for (const op of frame.ops ?? []) {
          const value = op.value;
          if (value !== null && typeof value === 'object' && typeof value.t === 'number' && rec.inWindow(value.t)) {
            rec.deliveredOfWindowOps += 1;
            rec.delivery.add(t - value.t);
          }
          if (log && value !== null && typeof value === 'object' && 't' in value) {
            log.patchVersion.push(version);
            log.patchDevice.push(frame.device ?? '');
            log.patchN.push(value.n ?? -1);
          }
        }
        break;
      }
      case 'ack': {
        const sent = this.pending.get(frame.id);
        if (sent === undefined) {
          rec.error('unexpected_ack');
          return;
        }
        this.pending.delete(frame.id);
        if (rec.inWindow(sent)) {
          rec.ackedInWindow += 1;
          rec.ack.add(t - sent);
        }
        if (this.log) {
          const n = this.log.nOf.get(frame.id);
          if (n !== undefined) {
            this.log.nOf.delete(frame.id);
            this.log.ackedVersion.push(frame.version ?? -1);
            this.log.ackedN.push(n);
          }
          this.answer(frame);
        }
        break;
      }
      case 'error':
        rec.error(String(frame.code ?? 'error'));
        if (frame.id !== undefined && frame.id !== null) {
          this.pending.delete(frame.id);
          if (this.log) {
            this.log.nOf.delete(frame.id);
            this.answer(frame);
          }
        }
        break;
      case 'welcome':
        rec.error('resync_welcome'); // a welcome after the first one: the server made us catch up
        break;
      case 'ended':
        rec.error('ended');
        break;
      default: // presence, handoff: not measured
    }
  }

  /** Close with 1000; resolves once closed or after CLOSE_TIMEOUT_MS (then the socket is destroyed). */
  close() {
    this.closing = true;
    const ws = this.ws;
    if (!ws || ws.readyState === WebSocket.CLOSED) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        ws.terminate();
        resolve();
      }, CLOSE_TIMEOUT_MS);
      this.onClosed = () => {
        clearTimeout(timer);
        resolve();
      };
      ws.close(1000);
    });
  }
}

// ---- the schedule: one timer wheel for every device --------------------------------------------------------------

/**
 * Sends `rate` ops/s per device from a random phase until `until` (ns since the epoch), without drift: each device
 * keeps its own next due time (+= interval after every send), so a late timer never shifts the schedule, it only
 * makes the device catch up. One setTimeout drives the whole wheel; resolves once every device is past `until`.
 */
function schedule(devices, rate, start, until, rec) {
  const interval = NS_PER_S / rate;
  const slots = Array.from({ length: SLOTS }, () => []);
  let cursor = Math.floor(start / SLOT_NS); // the next slot to process
  let live = 0;
  const add = (device) => {
    const slot = Math.max(Math.floor(device.due / SLOT_NS), cursor);
    slots[slot % SLOTS].push(device);
    live += 1;
  };
  for (const device of devices) {
    device.due = start + Math.random() * interval;
    if (device.due < until) add(device);
  }
  return new Promise((resolve) => {
    const tick = () => {
      const t = now();
      const last = Math.floor(t / SLOT_NS);
      while (cursor <= last) {
        const index = cursor % SLOTS;
        const due = slots[index];
        slots[index] = [];
        const slotEnd = (cursor + 1) * SLOT_NS;
        for (const device of due) {
          live -= 1;
          if (device.closed) continue;
          if (device.due >= slotEnd) {
            add(device); // a later turn of the wheel
            continue;
          }
          while (device.due < slotEnd && device.due < until && !device.closed) {
            device.sendOp();
            device.due += interval;
            const lag = t - device.due;
            if (lag > LAG_LIMIT_NS) {
              rec.lagEvents += 1;
              device.due += lag;
            }
          }
          if (device.due < until && !device.closed) add(device); // due >= slotEnd: a later slot
        }
        cursor += 1;
      }
      if (live === 0) {
        resolve();
        return;
      }
      let next = cursor;
      while (next < cursor + SLOTS && slots[next % SLOTS].length === 0) next += 1;
      setTimeout(tick, Math.max(0, (next * SLOT_NS - now()) / 1e6));
    };
    setTimeout(tick, Math.max(0, (start - now()) / 1e6));
  });
}

// ---- one process's share of the job ------------------------------------------------------------------------------

function numberOr(value, fallback) {
  return typeof value === 'number' && Number.isFinite(value) ? value : fallback;
}

/** The job with its defaults filled in; throws on what cannot run. */
function normalise(job) {
  if (!job || typeof job !== 'object') throw new Error('the job must be a JSON object');
  if (!Array.isArray(job.devices) || job.devices.length === 0) throw new Error('job.devices: a non-empty list');
  const rate = numberOr(job.rate, 10);
  const warmup = numberOr(job.warmup, 2);
  const duration = numberOr(job.duration, 10);
  if (!(rate >= 0) || warmup < 0 || !(duration > 0)) throw new Error('duration must be > 0, rate and warmup >= 0');
  for (const d of job.devices) {
    if (d.session === undefined || d.device === undefined) throw new Error('every device needs session and device');
    if (!(d.url ?? job.url)) throw new Error(`no url for device ${d.session}/${d.device}`);
  }
  const scenario = job.scenario ?? 'fanout';
  if (scenario !== 'fanout' && scenario !== 'handoff') throw new Error(`job.scenario: fanout or handoff (${scenario})`);
  const handoffOps = numberOr(job.handoff_ops, 3);
  const handoffRate = numberOr(job.handoff_rate, 0); // null: a closed loop
  if (!Number.isInteger(handoffOps) || handoffOps < 0 || !(handoffRate >= 0)) {
    throw new Error('handoff_ops must be a whole number >= 0, handoff_rate >= 0');
  }
  if (scenario === 'handoff') {
    const sizes = new Map();
    for (const d of job.devices) sizes.set(String(d.session), (sizes.get(String(d.session)) ?? 0) + 1);
    if ([...sizes.values()].some((n) => n !== 2)) throw new Error('handoff: every session needs exactly two devices');
  }
  return {
    ...job,
    scenario,
    handoff_ops: handoffOps,
    handoff_rate: handoffRate,
    rate,
    warmup,
    duration,
    drain: numberOr(job.drain, 3),
    connect_concurrency: Math.max(1, numberOr(job.connect_concurrency, 200)),
    kind: job.kind ?? 'other',
    subprotocol: job.subprotocol === undefined ? 'sessiond.v1.json' : job.subprotocol,
    // about 40 points over the run, between 0.1 s and 1 s each (as bench/loadgen.py)
    bucket_s: numberOr(job.bucket_s, Math.max(0.1, Math.min(1.0, Math.round(((warmup + duration) / 40) * 10) / 10))),
  };
}

/** The window as [its start after `start`, its length] in s: after the warm-up for fanout; the whole run for
 * handoff, whose every handoff counts (as in loadgen.py's handoff). */
function windowOf(job) {
  return job.scenario === 'handoff' ? [0, job.warmup + job.duration] : [job.warmup, job.duration];
}

/** Run `fn` at `t` (ns since the epoch). */
function at(t, fn) {
  return setTimeout(fn, Math.max(0, (t - now()) / 1e6));
}

const sleepUntil = (t) => new Promise((resolve) => at(t, resolve));

/**
 * One pair's handoffs until the window ends, as loadgen.py's handoff loop: the device sorted first claims, then
 * (paced: at its due time) the active one sends `handoff_ops` acked ops, pauses, the other claims; swap. The first
 * request without an ack (an error frame, a timeout, a closed socket: counted where it happened) ends the pair.
 */
async function handoffPair(pair, job, rec) {
  let [active, other] = pair;
  const acked = (reply) => reply !== null && reply.t === 'ack';
  if (!acked(await active.request('claim'))) return;
  const period = job.handoff_rate > 0 ? NS_PER_S / job.handoff_rate : 0;
  let due = now() + Math.random() * period; // pairs spread over the period
  while (now() < rec.w1) {
    if (period) { // paced: a handoff's latency, not the queue of a saturated server
      await sleepUntil(due);
      due += period;
    }
    for (let i = 0; i < job.handoff_ops; i++) if (!acked(await active.request('op'))) return;
    const t = now();
    if (!acked(await active.request('pause')) || !acked(await other.request('claim'))) return;
    const done = now();
    rec.handoff.add(done - t);
    rec.handoffs += 1;
    if (done < rec.w1) rec.handoffsInWindow += 1;
    [active, other] = [other, active];
  }
}

/** loadgen.py's _check_logs over pairs: acked ops the other device never saw (lost), patches seen more than once
 * (duplicated), holes in the versions the two devices had acked (gaps). */
function checkLogs(pairs) {
  let acked = 0;
  let lost = 0;
  let duplicated = 0;
  let gaps = 0;
  for (const pair of pairs) {
    const versions = new Set();
    for (const [sender, receiver] of [pair, [pair[1], pair[0]]]) {
      const got = receiver.log;
      const seen = new Map(); // "version:n" -> times seen
      for (let i = 0; i < got.patchN.length; i++) {
        if (got.patchDevice[i] !== sender.device) continue;
        const key = `${got.patchVersion[i]}:${got.patchN[i]}`;
        seen.set(key, (seen.get(key) ?? 0) + 1);
      }
      for (const count of seen.values()) if (count > 1) duplicated += count - 1;
      const sent = sender.log;
      for (let i = 0; i < sent.ackedN.length; i++) {
        acked += 1;
        versions.add(sent.ackedVersion[i]);
        if (!seen.has(`${sent.ackedVersion[i]}:${sent.ackedN[i]}`)) lost += 1;
      }
    }
    if (versions.size > 0) {
      let lo = Infinity;
      let hi = -Infinity;
      for (const v of versions) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
      gaps += hi - lo + 1 - versions.size;
    }
  }
  return { changes_acked: acked, lost, duplicated, version_gaps: gaps };
}

/** Connects this process's devices, then runs the schedule (or the handoffs) from `start` when told to, and returns
 * a mergeable raw result. `onProgress(deliveredTotal, errors, handoffs)` is called every PROGRESS_MS meanwhile. */
class Runner {
  constructor(job) {
    this.job = job;
    this.rec = new Recorder(job.bucket_s);
    const sizes = new Map();
    for (const d of job.devices) sizes.set(String(d.session), (sizes.get(String(d.session)) ?? 0) + 1);
    this.devices = job.devices.map((d) => new Device(d, job, this.rec, sizes.get(String(d.session))));
    this.connected = [];
  }

  async connect() {
    let next = 0;
    const worker = async () => {
      while (next < this.devices.length) {
        const device = this.devices[next++];
        try {
          await device.connect(this.job.subprotocol, this.job.kind);
          this.connected.push(device);
        } catch (err) {
          this.rec.error('connect_failed');
          if (!this.firstConnectError) this.firstConnectError = String(err?.message ?? err);
        }
      }
    };
    const workers = Math.min(this.job.connect_concurrency, this.devices.length);
    await Promise.all(Array.from({ length: workers }, worker));
    return { connected: this.connected.length, failed: this.devices.length - this.connected.length };
  }

  /** The whole run from `start` (ns since the epoch): warm-up, window, drain, close. */
  async run(start, onProgress) {
    const { job, rec } = this;
    const [offset, length] = windowOf(job);
    rec.w0 = start + offset * NS_PER_S;
    rec.w1 = rec.w0 + length * NS_PER_S;
    rec.deliveries.t0 = rec.sends.t0 = start;
    const cpu = {};
    at(rec.w0, () => {
      cpu.t0 = now();
      cpu.u0 = process.cpuUsage();
    });
    at(rec.w1, () => {
      cpu.t1 = now();
      cpu.used = process.cpuUsage(cpu.u0);
    });
    const ticker = onProgress
      ? setInterval(() => onProgress(rec.deliveredTotal, rec.errorCount(), rec.handoffs), PROGRESS_MS) : null;
    const figures = job.scenario === 'handoff' ? await this.handoffs(start) : await this.fanout(start);
    if (ticker) clearInterval(ticker);
    await Promise.all(this.connected.map((d) => d.close()));
    const used = cpu.used ?? process.cpuUsage(cpu.u0);
    return {
      pid: process.pid,
      devices: this.devices.length,
      connected: this.connected.length,
      first_connect_error: this.firstConnectError ?? null,
      ...figures,
      errors: Object.fromEntries(rec.errors),
      cpu: { pid: process.pid, user_s: used.user / 1e6, system_s: used.system / 1e6,
             wall_s: ((cpu.t1 ?? now()) - (cpu.t0 ?? rec.w0)) / NS_PER_S },
    };
  }

  /** Every device sends at `rate` until the window ends; then up to `drain` s for missing acks and deliveries. */
  async fanout(start) {
    const { job, rec } = this;
    if (job.rate > 0) await schedule(this.connected, job.rate, start, rec.w1, rec); // rate 0: idle devices
    await sleepUntil(rec.w1 + 1e6); // the CPU read at w1 has run
    const expected = () => this.connected.reduce((n, d) => n + d.sentInWindow * (d.sessionSize - 1), 0);
    const drainUntil = now() + job.drain * NS_PER_S;
    while (now() < drainUntil) {
      const pending = this.connected.some((d) => !d.closed && d.pending.size > 0);
      if (rec.deliveredOfWindowOps >= expected() && !pending) break;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const ackMissing = this.connected.reduce((n, d) => n + d.pending.size, 0);
    if (ackMissing) rec.error('ack_missing', ackMissing);
    return {
      sent_total: rec.sentTotal,
      sent_in_window: rec.sentInWindow,
      acked_in_window: rec.ackedInWindow,
      delivered_total: rec.deliveredTotal,
      delivered_in_window: rec.deliveredInWindow,
      delivered_of_window_ops: rec.deliveredOfWindowOps,
      expected_deliveries: expected(),
      lag_events: rec.lagEvents,
      ack: rec.ack.values(),
      delivery: rec.delivery.values(),
      deliveries: rec.deliveries.counts,
      sends: rec.sends.counts,
    };
  }

  /** Every pair whose two devices connected hands off until the window ends; then up to `drain` s until each device
   * has seen as many patches as the other had acked ops (loadgen.py's _wait_logs), and the logs are checked. */
  async handoffs(start) {
    const { job, rec } = this;
    const sessions = new Map();
    for (const d of this.connected) {
      if (!sessions.has(d.session)) sessions.set(d.session, []);
      sessions.get(d.session).push(d);
    }
    const byDevice = (x, y) => (x.device < y.device ? -1 : x.device > y.device ? 1 : 0);
    const pairs = [...sessions.values()].filter((p) => p.length === 2).map((p) => p.sort(byDevice));
    const sweeper = setInterval(() => {
      const t = now();
      for (const d of this.connected) d.expire(t);
    }, 1000);
    await sleepUntil(start);
    await Promise.all(pairs.map((pair) => handoffPair(pair, job, rec)));
    clearInterval(sweeper);
    await sleepUntil(rec.w1 + 1e6); // the CPU read at w1 has run
    const seen = ([x, y]) => x.log.ackedN.length <= y.log.patchN.length && y.log.ackedN.length <= x.log.patchN.length;
    const drainUntil = now() + job.drain * NS_PER_S;
    while (now() < drainUntil && !pairs.every(seen)) await new Promise((resolve) => setTimeout(resolve, 50));
    return {
      pairs: pairs.length,
      handoffs: rec.handoffs,
      handoffs_in_window: rec.handoffsInWindow,
      ...checkLogs(pairs),
      sent_total: rec.sentTotal,
      delivered_total: rec.deliveredTotal,
      handoff: rec.handoff.values(),
      ack: rec.ack.values(),
      delivery: rec.delivery.values(),
    };
  }
}

// ---- results: merge the processes' raw results, summarise ---------------------------------------------------------

const COUNTS = ['devices', 'connected', 'sent_total', 'sent_in_window', 'acked_in_window', 'delivered_total',
  'delivered_in_window', 'delivered_of_window_ops', 'expected_deliveries', 'lag_events'];
const HANDOFF_COUNTS = ['devices', 'connected', 'pairs', 'sent_total', 'delivered_total', 'handoffs',
  'handoffs_in_window', 'changes_acked', 'lost', 'duplicated', 'version_gaps'];

function concat(arrays) {
  const out = new Float64Array(arrays.reduce((n, a) => n + a.length, 0));
  let pos = 0;
  for (const a of arrays) {
    out.set(a, pos);
    pos += a.length;
  }
  return out;
}

function addBuckets(lists) {
  const out = [];
  for (const list of lists) list.forEach((v, i) => { out[i] = (out[i] ?? 0) + v; });
  return out;
}

/** One JSON result from the raw results of every process. */
function finish(job, raws, startAbs, selfCpu) {
  const handoff = job.scenario === 'handoff';
  const out = { generator: 'node', node: process.version, ws: wsVersion(), procs: raws.length, pid: process.pid,
                scenario: job.scenario };
  for (const key of handoff ? HANDOFF_COUNTS : COUNTS) out[key] = raws.reduce((n, r) => n + r[key], 0);
  const errors = {};
  for (const r of raws) for (const [k, v] of Object.entries(r.errors)) errors[k] = (errors[k] ?? 0) + v;
  const [offset, window] = windowOf(job);
  const ack = concat(raws.map((r) => r.ack));
  const delivery = concat(raws.map((r) => r.delivery));
  const procs = raws.map((r) => ({ ...r.cpu, util: (r.cpu.user_s + r.cpu.system_s) / r.cpu.wall_s }));
  if (selfCpu) procs.push({ ...selfCpu, role: 'parent', util: (selfCpu.user_s + selfCpu.system_s) / selfCpu.wall_s });
  const user = procs.reduce((n, p) => n + p.user_s, 0);
  const system = procs.reduce((n, p) => n + p.system_s, 0);
  const wall = Math.max(...raws.map((r) => r.cpu.wall_s)); // the window as the workers' clocks saw it
  const w0 = startAbs + BigInt(Math.round(offset * NS_PER_S));
  Object.assign(out, {
    first_connect_error: raws.map((r) => r.first_connect_error).find((e) => e) ?? null,
    window: { warmup_s: job.warmup, duration_s: job.duration, start_ns: String(startAbs), w0_ns: String(w0),
              w1_ns: String(w0 + BigInt(Math.round(window * NS_PER_S))) },
  });
  const errorCount = Object.values(errors).reduce((n, v) => n + v, 0);
  const cpu = { user_s: user, system_s: system, wall_s: wall, util: (user + system) / wall,
                max_proc_util: Math.max(...procs.map((p) => p.util)), procs };
  if (handoff) {
    const handoffs = concat(raws.map((r) => r.handoff));
    return Object.assign(out, {
      handoff_ops: job.handoff_ops,
      handoff_rate: job.handoff_rate,
      handoff: summary(handoffs),
      ack: summary(ack), // ops, pauses and claims
      delivery: summary(delivery),
      errors,
      error_count: errorCount,
      cpu,
      series: job.samples ? { handoff_ns: Array.from(handoffs, Math.round) } : {},
    });
  }
  Object.assign(out, {
    rate: job.rate,
    offered_ops_per_s: out.sent_in_window / window,
    offered_deliveries_per_s: out.expected_deliveries / window,
    delivered_per_s: out.delivered_in_window / window,
    delivered_ratio: out.expected_deliveries ? out.delivered_of_window_ops / out.expected_deliveries : null,
    acked_ratio: out.sent_in_window ? out.acked_in_window / out.sent_in_window : null,
    ack: summary(ack),
    delivery: summary(delivery),
    errors,
    error_count: errorCount,
    cpu,
    series: {
      bucket_s: job.bucket_s,
      deliveries: addBuckets(raws.map((r) => r.deliveries)),
      sends: addBuckets(raws.map((r) => r.sends)),
      ...(job.samples ? { ack_ns: Array.from(ack, Math.round), delivery_ns: Array.from(delivery, Math.round) } : {}),
    },
  });
  return out;
}

function wsVersion() {
  try {
    return JSON.parse(readFileSync(new URL('./node_modules/ws/package.json', import.meta.url), 'utf8')).version;
  } catch {
    return null;
  }
}

// ---- processes ------------------------------------------------------------------------------------------------

function emit(events, event) {
  if (events) process.stderr.write(`${JSON.stringify(event)}\n`);
}

function progressEmitter(events, job, startAbs) {
  return (delivered, errors, handoffs) => emit(events, {
    event: 'progress', elapsed_s: Number(process.hrtime.bigint() - startAbs) / NS_PER_S,
    delivered_total: delivered, errors, ...(job.scenario === 'handoff' ? { handoffs } : {}),
  });
}

const START_DELAY_NS = 20e6; // between "every device connected" and the first send: time to tell the workers

/** One process: connect everything, start, finish. */
async function runSingle(job, events) {
  const runner = new Runner(job);
  const c0 = now();
  const u0 = process.cpuUsage();
  emit(events, { event: 'connecting', t_ns: String(epoch + BigInt(Math.round(c0))) });
  const { connected, failed } = await runner.connect();
  const used = process.cpuUsage(u0);
  const cpuS = (used.user + used.system) / 1e6; // one process: its share is the whole
  emit(events, { event: 'connected', connected, failed, connect_s: (now() - c0) / NS_PER_S,
                 connect_cpu_s: cpuS, connect_max_proc_cpu_s: cpuS });
  const start = now() + START_DELAY_NS;
  const startAbs = epoch + BigInt(Math.round(start));
  emitStart(events, job, startAbs);
  const raw = await runner.run(start, progressEmitter(events, job, startAbs));
  return finish(job, [raw], startAbs, null);
}

function emitStart(events, job, startAbs) {
  const [offset, length] = windowOf(job);
  const w0 = startAbs + BigInt(Math.round(offset * NS_PER_S));
  emit(events, { event: 'start', start_ns: String(startAbs), w0_ns: String(w0),
                 w1_ns: String(w0 + BigInt(Math.round(length * NS_PER_S))) });
}

/** N child processes, each with whole sessions; the parent starts them together and merges their results. */
async function runParent(job, procs, events) {
  const bySession = new Map();
  for (const d of job.devices) {
    const key = String(d.session);
    if (!bySession.has(key)) bySession.set(key, []);
    bySession.get(key).push(d);
  }
  const shares = Array.from({ length: procs }, () => []);
  [...bySession.values()].forEach((devices, i) => shares[i % procs].push(...devices));
  const used = shares.filter((s) => s.length > 0);
  const c0 = now();
  emit(events, { event: 'connecting', t_ns: String(epoch + BigInt(Math.round(c0))) });
  const children = used.map((devices) => {
    const child = fork(HERE, ['--worker'], { serialization: 'advanced', stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
    const state = { child, progress: [0, 0, 0] };
    state.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    state.message = (type) => new Promise((resolve, reject) => {
      const onMessage = (m) => {
        if (m.type === 'progress') state.progress = [m.delivered_total, m.errors, m.handoffs];
        else if (m.type === type) {
          child.off('message', onMessage);
          resolve(m);
        }
      };
      child.on('message', onMessage);
      state.exited.then(({ code, signal }) => reject(new Error(`worker ${child.pid} exited (${code ?? signal})`)));
    });
    child.send({ type: 'job', epoch: String(epoch), job: { ...job, devices } });
    return state;
  });
  try {
    const ready = await Promise.all(children.map((c) => c.message('connected')));
    emit(events, { event: 'connected', connected: ready.reduce((n, m) => n + m.connected, 0),
                   failed: ready.reduce((n, m) => n + m.failed, 0), connect_s: (now() - c0) / NS_PER_S,
                   connect_cpu_s: ready.reduce((n, m) => n + m.cpu_s, 0),
                   connect_max_proc_cpu_s: Math.max(...ready.map((m) => m.cpu_s)) });
    const start = now() + START_DELAY_NS;
    const startAbs = epoch + BigInt(Math.round(start));
    emitStart(events, job, startAbs);
    const [offset, length] = windowOf(job);
    const w0 = start + offset * NS_PER_S;
    const cpu = {}; // the parent's own share over the window: it only relays messages, but it is counted
    at(w0, () => { cpu.t0 = now(); cpu.u0 = process.cpuUsage(); });
    at(w0 + length * NS_PER_S, () => { cpu.t1 = now(); cpu.used = process.cpuUsage(cpu.u0); });
    const results = children.map((c) => c.message('raw'));
    for (const c of children) c.child.send({ type: 'start', start });
    const progress = progressEmitter(events, job, startAbs);
    const sum = (i) => children.reduce((n, c) => n + c.progress[i], 0);
    const ticker = setInterval(() => progress(sum(0), sum(1), sum(2)), PROGRESS_MS);
    const raws = (await Promise.all(results)).map((m) => m.raw);
    clearInterval(ticker);
    const own = cpu.used ?? process.cpuUsage(cpu.u0);
    const selfCpu = { pid: process.pid, user_s: own.user / 1e6, system_s: own.system / 1e6,
                      wall_s: ((cpu.t1 ?? now()) - (cpu.t0 ?? w0)) / NS_PER_S };
    return finish(job, raws, startAbs, selfCpu);
  } finally {
    for (const c of children) if (c.child.exitCode === null) c.child.kill();
  }
}

/** A child of runParent: its share of the job over IPC, its raw result back. */
function runWorker() {
  let runner;
  process.on('message', async (m) => {
    try {
      if (m.type === 'job') {
        epoch = BigInt(m.epoch);
        runner = new Runner(m.job);
        const u0 = process.cpuUsage();
        const { connected, failed } = await runner.connect();
        const used = process.cpuUsage(u0);
        process.send({ type: 'connected', connected, failed, cpu_s: (used.user + used.system) / 1e6 });
      } else if (m.type === 'start') {
        const raw = await runner.run(m.start, (delivered, errors, handoffs) =>
          process.send({ type: 'progress', delivered_total: delivered, errors, handoffs }));
        process.send({ type: 'raw', raw }, () => process.exit(0));
      }
    } catch (err) {
      process.stderr.write(`nodegen worker ${process.pid}: ${err?.stack ?? err}\n`);
      process.exit(1);
    }
  });
  process.on('disconnect', () => process.exit(1)); // the parent is gone
}

async function readJob(path) {
  if (path && path !== '-') return JSON.parse(readFileSync(path, 'utf8'));
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

function parseArgs(argv) {
  const args = { file: null, procs: 1, events: false, worker: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--events') args.events = true;
    else if (a === '--worker') args.worker = true;
    else if (a === '--procs') args.procs = Number(argv[++i]);
    else if (a.startsWith('--procs=')) args.procs = Number(a.slice('--procs='.length));
    else if (a === '-h' || a === '--help') args.help = true;
    else if (!a.startsWith('--') && args.file === null) args.file = a;
    else throw new Error(`unknown argument ${a}`);
  }
  if (!Number.isInteger(args.procs) || args.procs < 1) throw new Error('--procs wants a whole number >= 1');
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.help) {
    process.stdout.write('usage: node gen.mjs [JOB.json | -] [--procs N] [--events]  (the job format: see the head '
      + 'of gen.mjs)\n');
    return;
  }
  if (args.worker) {
    runWorker();
    return;
  }
  const job = normalise(await readJob(args.file));
  const result = args.procs > 1 ? await runParent(job, args.procs, args.events) : await runSingle(job, args.events);
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
}

main().catch((err) => {
  process.stderr.write(`nodegen: ${err?.stack ?? err}\n`);
  process.exit(2);
});
