// Types for tower-channels.js (the tower-channels JavaScript client).

/** A way to reach the server. */
export type Transport = "websocket" | "sse" | "stream" | "poll";

/** Every transport, in the default order. */
export const TRANSPORTS: readonly Transport[];

/** A position in a group's history: the last message the app saw. */
export interface Position {
  epoch: string;
  offset: number;
}

/** What `onstate` is told. */
export interface StateChange {
  /** `connecting` (trying `transport`), `open`, or `closed`. */
  state: "connecting" | "open" | "closed";
  /** The transport tried, open, or that just closed. */
  transport: Transport | null;
  /** On `closed`: the close code (1006 when the transport just dropped). */
  code?: number;
  /** On `closed`: the close reason. */
  reason?: string;
  /** On `closed`: milliseconds until the next attempt, null after `close()`. */
  retryIn?: number | null;
}

/** A message the server refused (400, 403, 413): it is not retried. */
export interface SendError {
  status: number;
  reason: string;
  data: Message;
}

/** A message: text is a string, binary an ArrayBuffer. */
export type Message = string | ArrayBuffer;

export interface Options {
  /** Transports to try, in order (default `TRANSPORTS`); unusable ones are left out. */
  transports?: readonly Transport[];
  /** Give up on a transport that has not opened after this many ms (5000). */
  openTimeout?: number;
  /** Stream: reconnect after this many ms without any data, pings included (60000). */
  idleTimeout?: number;
  /** Long-poll: abort one poll request after this many ms (40000). */
  pollTimeout?: number;
  /** Reconnect backoff: first delay and cap in ms (250, 10000), with jitter. */
  backoffMin?: number;
  backoffMax?: number;
  /** Messages `send` may queue while not connected (1000). */
  maxQueue?: number;
  /** Stream: bytes one unfinished line may take (16 MiB). */
  maxFrame?: number;
  /** Reopen with `?offset=&epoch=` and drop messages at or before the last position (true). */
  resume?: boolean;
  /** Start from this position. */
  position?: Position | null;
  /** Base for a relative `url` (default `location.href`). */
  base?: string | URL;
  /** Implementations to use instead of the globals; `null` means unavailable. */
  WebSocket?: typeof WebSocket | null;
  EventSource?: typeof EventSource | null;
  fetch?: typeof fetch | null;
  onmessage?: ((data: Message) => void) | null;
  onstate?: ((change: StateChange) => void) | null;
  onerror?: ((error: SendError) => void) | null;
}

/** One logical connection that survives transport drops. */
export class Connection {
  constructor(url: string | URL, options?: Options);
  readonly url: URL;
  readonly transports: Transport[];
  readonly state: "connecting" | "open" | "closed";
  /** The transport in use, being tried, or that closed last (null before the first try). */
  readonly transport: Transport | null;
  /** The last position seen. */
  readonly position: Position | null;
  /** The WebSocket extensions negotiated ("" on other transports). */
  readonly extensions: string;
  onmessage: ((data: Message) => void) | null;
  onstate: ((change: StateChange) => void) | null;
  onerror: ((error: SendError) => void) | null;
  /** Queues a message; false when closed or the queue is full. */
  send(data: string | ArrayBuffer | ArrayBufferView | Blob): boolean;
  /** Drops the current transport and reconnects at once, resuming. */
  reconnect(): void;
  /** Closes for good. */
  close(): void;
}

/** `new Connection(url, options)`. */
export function connect(url: string | URL, options?: Options): Connection;

/** The reconnect delay for `attempt` (0-based): exponential with equal jitter. */
export function backoff(attempt: number, min?: number, max?: number, random?: () => number): number;

/** A position from an event id `<epoch>:<offset>`. */
export function parseId(id: string | null | undefined): Position | null;

/** The top-level `offset`/`epoch` of a JSON object text message. */
export function positionOf(text: Message): Position | null;
