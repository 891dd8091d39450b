/**
 * A minimal ambient declaration of React Native's global WebSocket, with the constructor signature and members of
 * React Native's own typings (react-native/types/modules/globals.d.ts), which declare neither `protocol` nor
 * `binaryType`. Used instead of installing react-native (and its types) just to type-check one example: the
 * point is that the SDK accepts RN's WebSocket type WITHOUT the DOM lib.
 */

interface RNWebSocketMessageEvent {
  data?: unknown;
}
interface RNWebSocketCloseEvent {
  code?: number;
  reason?: string;
  message?: string;
}

interface WebSocket {
  readonly readyState: number;
  send(data: string | ArrayBuffer | ArrayBufferView): void;
  close(code?: number, reason?: string): void;
  onopen: (() => void) | null;
  onmessage: ((event: RNWebSocketMessageEvent) => void) | null;
  onerror: ((event: { message: string }) => void) | null;
  onclose: ((event: RNWebSocketCloseEvent) => void) | null;
}

declare var WebSocket: {
  prototype: WebSocket;
  new (
    uri: string,
    protocols?: string | string[] | null,
    options?: { headers: { [headerName: string]: string }; [optionName: string]: unknown } | null,
  ): WebSocket;
  readonly CLOSED: number;
  readonly CLOSING: number;
  readonly CONNECTING: number;
  readonly OPEN: number;
};
