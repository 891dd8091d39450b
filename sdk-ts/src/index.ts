/**
 * @sessiond/client: the TypeScript client of sessiond's WebSocket protocol v1 (DESIGN §2–§5).
 *
 * `connect(opts)` returns a live, self-healing replica of one session for one device: it joins with `hello`,
 * keeps `state`/`version`/`devices`/`active` current from patches, resolves each request by its ack, refreshes the
 * token in band, and after a drop reconnects (full-jitter backoff), resumes from `epoch`+version and retransmits
 * unacked requests with their original ids, so an op is neither lost nor applied twice.
 * Only the standard WebSocket API is used: browsers, React Native and Electron run it unchanged.
 */

export type {
  ChangeInfo,
  ConnectOptions,
  Device,
  DeviceKind,
  Json,
  MsgpackCodec,
  Op,
  QueuedRequest,
  QueueStore,
  SessionClient,
  SessionEventName,
  SessionEvents,
  Status,
  WebSocketConstructor,
  WebSocketLike,
} from "./types.js";
export { FINAL_CLOSE_CODES, SessionError, SUBPROTOCOLS } from "./errors.js";
export { applyOps, checkOps, escapeToken, parsePointer } from "./ops.js";
export { backoffDelay, tokenExpiry } from "./util.js";
export { connect } from "./client.js";
