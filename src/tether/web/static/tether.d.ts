// Types of tether.js, the tether protocol for browser pages (served at /tether.d.ts).
//
//   import { connect } from "/tether.js";
//   const ipc = await connect();
//   const text: string = await ipc.invoke("message-from-renderer", "Hola, mundo!", { timeout: 5000 });
//
// `tether types --ts MODULE:ATTR` writes the channel types of one Main (its handlers for role
// "web"); with them, `invoke` is checked channel by channel through the `Channels` map below,
// which such a file fills by module augmentation (the specifier is however the page's
// TypeScript resolves tether.js):
//
//   declare module "/tether.js" {
//     interface Channels {
//       "message-from-renderer": [[message: string], string];   // [argument types, result type]
//     }
//   }

/** Any JSON value: what crosses a JSON connection. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/**
 * Channel name -> [argument types, result type]. Empty here: declaration merging with the
 * file `tether types --ts` writes fills it, and `invoke` then checks arguments and results.
 */
// eslint-disable-next-line @typescript-eslint/no-empty-interface
export interface Channels {}
/** Event channel name -> argument types of `send` (filled like Channels, from `WebEvents`). */
// eslint-disable-next-line @typescript-eslint/no-empty-interface
export interface Events {}
/**
 * Channel name -> true, for the channels whose last argument could be a plain object of only
 * `timeout`/`signal`. At run time `invoke` cannot know a channel's arity, so it takes such a
 * last argument for its options; for these channels `invoke` does not type-check and
 * `invokeWith(channel, args, options)` must be used. Filled from the generated `WebAmbiguous`.
 */
// eslint-disable-next-line @typescript-eslint/no-empty-interface
export interface InvokeWithOnly {}

type Args<C extends string> = C extends keyof Channels
  ? Channels[C] extends [infer A extends unknown[], unknown] ? A : unknown[]
  : unknown[];
type InvokeArgs<C extends string> = C extends keyof InvokeWithOnly
  ? [use_invokeWith_for_this_channel: never]
  : [...Args<C>] | [...Args<C>, InvokeOptions];
type EventArgs<C extends string> = C extends keyof Events
  ? Events[C] extends infer A extends unknown[] ? A : unknown[]
  : unknown[];
type Result<C extends string> = C extends keyof Channels
  ? Channels[C] extends [unknown[], infer R] ? R : unknown
  : unknown;

export const PROTOCOL_VERSION: 1;
export const SUBPROTOCOL: "tether.json";
export const HEADER_SIZE: 20;
export const MIN_MAX_FRAME_SIZE: 4096;
export const DEFAULT_MAX_FRAME_SIZE: number;
/** Default invoke timeout, in milliseconds. */
export const DEFAULT_TIMEOUT: number;
export const CLOSE_PROTOCOL_ERROR: 4002;

/** Frame kinds (docs/protocol.md, section 5). */
export const Kind: Readonly<{
  HELLO: 1; INVOKE: 2; RESULT: 3; ERROR: 4; EVENT: 5; CANCEL: 6; ROUTE_OPEN: 7;
  ROUTE_CLOSE: 8; PING: 9; PONG: 10; GOODBYE: 11; RELEASE: 12; AUTH: 13;
}>;

/** Base of every error tether.js rejects or throws with; `name` is the Python class name. */
export class TetherError extends Error {
  constructor(message?: string, options?: ErrorOptions);
}
/** The remote handler raised. */
export class RemoteError extends TetherError {
  name: "RemoteError";
  /** The exception's type on the other side (`ValueError`, `mymodule.Oops`). */
  remoteType: string;
  /** Its message, without the type. */
  remoteMessage: string;
  /** Its traceback, when the other side sends one (main sends none to pages by default). */
  remoteTraceback: string;
  constructor(remoteType: string, message: string, remoteTraceback?: string);
}
/** Nothing handles the channel on the other side. */
export class NoHandler extends TetherError { name: "NoHandler"; }
/** The channel is not exposed to pages (its handler does not name the role "web"). */
export class Forbidden extends TetherError { name: "Forbidden"; }
/** The arguments failed validation against the handler's type hints. */
export class BadRequest extends TetherError {
  name: "BadRequest";
  /** Where: `message`, `point.y`, `items[2]` (empty when the whole list was wrong). */
  path: string;
  constructor(message: string, path?: string);
}
/** No answer within the timeout; the call was cancelled on the other side. */
export class InvokeTimeout extends TetherError { name: "InvokeTimeout"; }
/** The other side went away (goodbye, closed socket, lost connection). */
export class PeerGone extends TetherError { name: "PeerGone"; }
/** This side closed the connection. */
export class ConnectionClosed extends TetherError { name: "ConnectionClosed"; }
/** The other side broke the protocol, or answered with a malformed body. */
export class ProtocolError extends TetherError { name: "ProtocolError"; }
/** A frame larger than the other side accepts: nothing was sent. */
export class PayloadTooLarge extends TetherError { name: "PayloadTooLarge"; }
/** The other side runs as many of this page's invokes as it allows. */
export class Busy extends TetherError { name: "Busy"; }
/** The route the call was made on is closed. */
export class RouteClosed extends TetherError { name: "RouteClosed"; }
/** A bad value where tether.js was called (a second `handle` for a channel), as Python's. */
export class ValueError extends TetherError { name: "ValueError"; }

/** The error an ERROR body stands for. */
export function errorFromBody(body: { code: string; message: string; type?: string; traceback?: string; path?: string }): TetherError;

export interface Frame {
  kind: number;
  requestId: number;
  routeId: number;
  channel: string;
  body: Uint8Array;
}
export function encodeFrame(kind: number, requestId?: number, routeId?: number, channel?: string, body?: Uint8Array): Uint8Array;
/** Parse one message as exactly one frame; throws ProtocolError when it is not one. */
export function decodeFrame(bytes: Uint8Array, maxFrameSize?: number): Frame;

export interface InvokeOptions {
  /** Milliseconds to wait for the answer (default: the connection's, 30000); null waits forever. */
  timeout?: number | null;
  /** Aborting it cancels the call (the promise rejects with the signal's reason). */
  signal?: AbortSignal;
}

export interface Transport {
  write(bytes: Uint8Array): void;
  close(code: number, reason: string): void;
}

export interface SessionOptions {
  name?: string;
  role?: string;
  maxFrameSize?: number;
  timeout?: number | null;
}

/** One connection to main: what `connect()` resolves to. */
export class Session {
  constructor(transport: Transport, options?: SessionOptions);
  /** Main's HELLO. */
  readonly remoteHello: { protocol: "tether"; version: 1; role: string; name?: string; pid?: number; max_frame_size?: number; encoding?: "json" } | null;
  readonly state: "handshake" | "open" | "closed";
  /** Default invoke timeout in ms (null: none). */
  timeout: number | null;
  /** Resolves with the error that ended the connection (PeerGone, ConnectionClosed, ProtocolError). */
  readonly closed: Promise<TetherError>;
  readonly closeReason: TetherError | null;
  ready(): Promise<Session>;

  /**
   * Invoke `channel` on main with JSON arguments; a last argument that is a plain object of
   * only `timeout`/`signal` is the options, whatever the channel (use `invokeWith` to pass such
   * an object as data; channels typed in InvokeWithOnly refuse `invoke` at compile time).
   * Throws TypeError/RangeError (as a rejection) for a timeout that is not a number >= 0.
   */
  invoke<C extends string>(channel: C, ...args: InvokeArgs<C>): Promise<Result<C>>;
  /** invoke() with the arguments as one array: never mistakes an argument for the options. */
  invokeWith<C extends string>(channel: C, args: Args<C>, options?: InvokeOptions): Promise<Result<C>>;
  /** A one-way event; throws if it cannot be sent (closed, too large, not JSON). */
  send<C extends string>(channel: C, ...args: EventArgs<C>): void;
  /** Listen to main's events on `channel`; returns the function that stops listening. */
  on(channel: string, listener: (...args: any[]) => void | Promise<void>): () => void;
  /** Answer main's invokes of `channel` (one handler per channel: a second throws ValueError). */
  handle(channel: string, handler: (...args: any[]) => unknown): void;
  removeHandler(channel: string): void;
  /** PING main; resolves with the round trip in ms. */
  ping(options?: { timeout?: number | null }): Promise<number>;
  /** Say goodbye and close; pending invokes reject with ConnectionClosed. */
  close(reason?: string): void;

  receive(message: Uint8Array | ArrayBuffer | string): void;
  transportClosed(why?: string): void;
}

export interface ConnectOptions {
  /** The WebSocket endpoint (default: this page's origin, path /tether). */
  url?: string;
  /** The secret (default: the page's, from its path `/t/<secret>/`, `?token=` or `#token=`). */
  token?: string | null;
  /** Default invoke timeout in ms (default 30000); null: none. */
  timeout?: number | null;
  /** Milliseconds to wait for the socket and main's HELLO (default 10000). */
  connectTimeout?: number;
  name?: string;
  maxFrameSize?: number;
  /** A WebSocket class (default: the global one). */
  WebSocket?: typeof WebSocket;
}

/** The secret the page was opened with (path `/t/<secret>/`, `?token=` or `#token=`), or null. */
export function pageToken(location?: { pathname?: string; search?: string; hash?: string }): string | null;

/** Connect this page to the main that served it; resolves once main said hello. */
export function connect(options?: ConnectOptions): Promise<Session>;
