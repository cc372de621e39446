// tether.js: a browser page as a tether peer. One ES module, no build step, no dependency.
//
//   import { connect } from "/tether.js";
//   const ipc = await connect();                 // same origin; the secret comes from the page URL
//   const text = await ipc.invoke("message-from-renderer", "Hola, mundo!", { timeout: 5000 });
//   ipc.send("log", "clicked");
//   const off = ipc.on("theme", (theme) => { ... });
//   ipc.handle("page.title", () => document.title);
//
// It implements the tether wire protocol, version 1 (docs/protocol.md), over a WebSocket with
// the subprotocol "tether.json": each binary message carries exactly one frame, and every body
// is JSON (section 1.1). The protocol code (frames, Session) does no I/O and runs under Node too;
// connect() wires it to a WebSocket. Timeouts here are in milliseconds.

export const PROTOCOL_VERSION = 1;
export const SUBPROTOCOL = "tether.json";
export const HEADER_SIZE = 20;
export const MIN_MAX_FRAME_SIZE = 4096;
export const DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024;
export const DEFAULT_TIMEOUT = 30000;
/** The WebSocket close code a page uses after the other side broke the protocol (1.1). */
export const CLOSE_PROTOCOL_ERROR = 4002;

/** Frame kinds (docs/protocol.md, section 5). */
export const Kind = Object.freeze({
  HELLO: 1, INVOKE: 2, RESULT: 3, ERROR: 4, EVENT: 5, CANCEL: 6, ROUTE_OPEN: 7,
  ROUTE_CLOSE: 8, PING: 9, PONG: 10, GOODBYE: 11, RELEASE: 12, AUTH: 13,
});

// -- errors: the Python names, so `err.name` reads the same on both sides ----------------

export class TetherError extends Error {
  constructor(message, options) { super(message, options); this.name = "TetherError"; }
}
/** The remote handler raised: `remoteType` is its exception type, `remoteTraceback` its traceback. */
export class RemoteError extends TetherError {
  constructor(remoteType, message, remoteTraceback = "") {
    super(`${remoteType}: ${message}`);
    this.name = "RemoteError";
    this.remoteType = remoteType;
    this.remoteMessage = message;
    this.remoteTraceback = remoteTraceback;
  }
}
export class NoHandler extends TetherError { constructor(m) { super(m); this.name = "NoHandler"; } }
export class Forbidden extends TetherError { constructor(m) { super(m); this.name = "Forbidden"; } }
/** The arguments failed validation; `path` names the bad one (`message`, `point.y`...). */
export class BadRequest extends TetherError {
  constructor(m, path = "") { super(m); this.name = "BadRequest"; this.path = path; }
}
export class InvokeTimeout extends TetherError { constructor(m) { super(m); this.name = "InvokeTimeout"; } }
export class PeerGone extends TetherError { constructor(m) { super(m); this.name = "PeerGone"; } }
export class ConnectionClosed extends TetherError {
  constructor(m) { super(m); this.name = "ConnectionClosed"; }
}
export class ProtocolError extends TetherError { constructor(m) { super(m); this.name = "ProtocolError"; } }
export class PayloadTooLarge extends TetherError {
  constructor(m) { super(m); this.name = "PayloadTooLarge"; }
}
export class Busy extends TetherError { constructor(m) { super(m); this.name = "Busy"; } }
/** The route the call was made on is closed (code `route_closed`). */
export class RouteClosed extends TetherError { constructor(m) { super(m); this.name = "RouteClosed"; } }
/** A bad value where tether.js was called (a second `handle` for a channel), as Python's. */
export class ValueError extends TetherError { constructor(m) { super(m); this.name = "ValueError"; } }

/** The error an ERROR body stands for (docs/protocol.md, 7.3); unknown codes are remote errors. */
export function errorFromBody(body) {
  const message = String(body.message ?? "");
  switch (body.code) {
    case "no_handler": return new NoHandler(message);
    case "forbidden": return new Forbidden(message);
    case "bad_request": return new BadRequest(message, String(body.path ?? ""));
    case "too_large": return new PayloadTooLarge(message);
    case "busy": return new Busy(message);
    case "route_closed": return new RouteClosed(message);
    default: return new RemoteError(String(body.type || body.code), message, String(body.traceback ?? ""));
  }
}

// -- frames (docs/protocol.md, section 3) -------------------------------------------------

const utf8 = new TextEncoder();
const strictUtf8 = new TextDecoder("utf-8", { fatal: true });
const NO_BYTES = new Uint8Array(0);

/** One frame as bytes: the 20-byte header, the channel, the body (no attachments). */
export function encodeFrame(kind, requestId = 0, routeId = 0, channel = "", body = NO_BYTES) {
  const chan = typeof channel === "string" ? utf8.encode(channel) : channel;
  if (chan.length > 0xffff) throw new TypeError("channel longer than 65535 bytes");
  const size = 16 + chan.length + body.length;
  const out = new Uint8Array(4 + size);
  const v = new DataView(out.buffer);
  v.setUint32(0, size, true);
  v.setUint8(4, kind);
  v.setUint8(5, 0);
  v.setUint16(6, chan.length, true);
  v.setUint32(8, requestId >>> 0, true);
  v.setUint32(12, routeId >>> 0, true);
  v.setUint16(16, 0, true); // n_att
  v.setUint16(18, 0, true);
  out.set(chan, HEADER_SIZE);
  out.set(body, HEADER_SIZE + chan.length);
  return out;
}

/**
 * Parse one WebSocket message as exactly one frame; throws ProtocolError when it is not one.
 * `maxFrameSize` bounds the `size` field (section 4).
 */
export function decodeFrame(bytes, maxFrameSize = DEFAULT_MAX_FRAME_SIZE) {
  const n = bytes.length;
  if (n < HEADER_SIZE) throw new ProtocolError(`a message of ${n} bytes: shorter than a frame header`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, n);
  const size = v.getUint32(0, true);
  if (size > maxFrameSize) throw new ProtocolError(`frame of ${size} bytes exceeds max_frame_size ${maxFrameSize}`);
  if (size + 4 !== n) throw new ProtocolError(`a message of ${n} bytes holding a frame of ${size + 4}: each message carries exactly one frame`);
  const kind = v.getUint8(4);
  if (kind < 1 || kind > 13) throw new ProtocolError(`unknown frame kind ${kind}`);
  const chanLen = v.getUint16(6, true);
  if (HEADER_SIZE + chanLen > n) throw new ProtocolError("channel runs past the end of the frame");
  if (v.getUint16(16, true) !== 0) throw new ProtocolError("attachments on a JSON connection");
  let channel;
  try {
    channel = strictUtf8.decode(bytes.subarray(HEADER_SIZE, HEADER_SIZE + chanLen));
  } catch {
    throw new ProtocolError("channel is not UTF-8");
  }
  return {
    kind, requestId: v.getUint32(8, true), routeId: v.getUint32(12, true), channel,
    body: bytes.subarray(HEADER_SIZE + chanLen),
  };
}

function jsonBytes(value) {
  return utf8.encode(JSON.stringify(value === undefined ? null : value));
}

function parseJson(body) {
  return JSON.parse(strictUtf8.decode(body));
}

function checkChannel(channel) {
  if (typeof channel !== "string" || channel.length === 0) {
    throw new TypeError(`channel must be a non-empty string, not ${JSON.stringify(channel)}`);
  }
}

const MAX_TIMER = 2 ** 31 - 1; // setTimeout fires at once past this

/**
 * Throws unless `timeout` is a timeout in ms: a number from 0 to 2**31-1, or (`none` true)
 * Infinity, null or undefined for none. An invalid one would otherwise fire at once, as an
 * InvokeTimeout that hides the mistake.
 */
function checkTimeout(timeout, what = "timeout", none = true) {
  if (timeout === undefined || (none && (timeout === null || timeout === Infinity))) return;
  if (typeof timeout !== "number") {
    throw new TypeError(`${what} must be a number of milliseconds${none ? " or null" : ""}, not ${timeout === null ? "null" : typeof timeout} ${JSON.stringify(timeout) ?? ""}`.trimEnd());
  }
  if (!(timeout >= 0 && timeout <= MAX_TIMER)) {
    throw new RangeError(`${what} must be from 0 to ${MAX_TIMER} milliseconds${none ? " (or null: none)" : ""}, not ${timeout}`);
  }
}

// At run time invoke() cannot know a channel's arity, so a last argument that is a plain
// object of only these keys is always its options; invokeWith() is the way around, and the
// declarations `tether types --ts` writes make invoke() of such channels a type error.
const OPTION_KEYS = new Set(["timeout", "signal"]);

/** Whether the last argument of invoke() is its options: a plain object of only timeout/signal. */
function isOptions(x) {
  if (x === null || typeof x !== "object") return false;
  const proto = Object.getPrototypeOf(x);
  if (proto !== Object.prototype && proto !== null) return false;
  const keys = Object.keys(x);
  return keys.length > 0 && keys.every((k) => OPTION_KEYS.has(k));
}

function describeError(err) {
  if (err instanceof Error) {
    return { type: err.name || "Error", message: String(err.message), traceback: String(err.stack || "") };
  }
  return { type: "Error", message: String(err), traceback: "" };
}

// -- the connection, without I/O ----------------------------------------------------------

/**
 * One tether connection seen from a page: handshake, request ids, calls both ways, events,
 * ping, goodbye. It writes frames through `transport.write(bytes)`, ends the transport with
 * `transport.close(code, reason)`, and is fed each message with `receive(bytes)` and the end
 * of the transport with `transportClosed(why)`. It sends its HELLO at once (section 6).
 */
export class Session {
  constructor(transport, { name = "", role = "page", maxFrameSize = DEFAULT_MAX_FRAME_SIZE, timeout = DEFAULT_TIMEOUT } = {}) {
    if (maxFrameSize < MIN_MAX_FRAME_SIZE) throw new RangeError(`maxFrameSize must be at least ${MIN_MAX_FRAME_SIZE}`);
    checkTimeout(timeout);
    this.transport = transport;
    this.maxFrameSize = maxFrameSize;
    /** The default invoke timeout in ms (null: wait forever). */
    this.timeout = timeout;
    /** The other side's HELLO once it arrived. */
    this.remoteHello = null;
    this.sendLimit = maxFrameSize;
    this.state = "handshake"; // -> open -> closing -> closed
    this.closeReason = null;
    this._nextId = 0;
    this._pending = new Map(); // our request id -> {resolve, reject, timer, channel}
    this._serving = new Map(); // their request id -> true while our handler runs
    this._handlers = new Map();
    this._listeners = new Map();
    this._pings = new Map();
    this._nextPing = 0;
    this._theirGoodbye = false;
    this._ourGoodbye = false;
    this._helloWaiters = [];
    this._closeWaiters = [];
    const hello = { protocol: "tether", version: PROTOCOL_VERSION, role, max_frame_size: maxFrameSize, encoding: "json" };
    if (name) hello.name = name;
    this._write(encodeFrame(Kind.HELLO, 0, 0, "", jsonBytes(hello)));
  }

  /** Resolves once the other side's HELLO arrived; rejects if the connection ends first. */
  ready() {
    if (this.remoteHello) return Promise.resolve(this);
    if (this.closeReason) return Promise.reject(this.closeReason);
    return new Promise((resolve, reject) => this._helloWaiters.push({ resolve, reject }));
  }

  /** Resolves, with the error that ended it, once the connection is closed (by either side). */
  get closed() {
    if (this.closeReason) return Promise.resolve(this.closeReason);
    return new Promise((resolve) => this._closeWaiters.push(resolve));
  }

  // -- calling --------------------------------------------------------------------------

  /** invoke(channel, ...args, {timeout, signal}?): the handler's result, or a rejection. */
  invoke(channel, ...args) {
    const options = args.length && isOptions(args[args.length - 1]) ? args.pop() : {};
    return this.invokeWith(channel, args, options);
  }

  /** invoke() with the arguments as an array, for a last argument that looks like options. */
  invokeWith(channel, args, { timeout = this.timeout, signal } = {}) {
    return new Promise((resolve, reject) => {
      checkChannel(channel);
      checkTimeout(timeout);
      if (!Array.isArray(args)) throw new TypeError("invokeWith takes the arguments as an array");
      this._checkOpen();
      if (signal?.aborted) throw signal.reason;
      let rid = this._nextId;
      do { rid = rid >= 0xffffffff ? 1 : rid + 1; } while (this._pending.has(rid));
      this._nextId = rid;
      this._emit(Kind.INVOKE, rid, channel, jsonBytes(args));
      const call = { resolve, reject, timer: null, channel, signal, onAbort: null };
      this._pending.set(rid, call);
      if (timeout != null && timeout !== Infinity) {
        call.timer = setTimeout(() => this._giveUp(rid, new InvokeTimeout(`no answer on ${JSON.stringify(channel)} within ${timeout} ms`)), timeout);
      }
      if (signal) {
        call.onAbort = () => this._giveUp(rid, signal.reason);
        signal.addEventListener("abort", call.onAbort, { once: true });
      }
    });
  }

  /** A one-way event; throws (synchronously) if it cannot be sent. */
  send(channel, ...args) {
    checkChannel(channel);
    this._checkOpen();
    this._emit(Kind.EVENT, 0, channel, jsonBytes(args));
  }

  /** PING the other side; resolves with the round trip in ms once its PONG arrives. */
  ping({ timeout = this.timeout } = {}) {
    return new Promise((resolve, reject) => {
      checkTimeout(timeout);
      this._checkOpen();
      const nonce = this._nextPing = (this._nextPing + 1) >>> 0;
      const started = Date.now();
      const timer = timeout == null || timeout === Infinity ? null : setTimeout(() => {
        this._pings.delete(nonce);
        reject(new InvokeTimeout(`no PONG within ${timeout} ms`));
      }, timeout);
      this._pings.set(nonce, { resolve: () => resolve(Date.now() - started), reject, timer });
      this._emit(Kind.PING, nonce, "", NO_BYTES);
    });
  }

  /** Listen to events on `channel`: fn(...args). Returns the function that stops listening. */
  on(channel, fn) {
    checkChannel(channel);
    if (typeof fn !== "function") throw new TypeError("listener must be a function");
    const list = this._listeners.get(channel) ?? [];
    list.push(fn);
    this._listeners.set(channel, list);
    return () => {
      const now = this._listeners.get(channel);
      const i = now ? now.indexOf(fn) : -1;
      if (i >= 0) now.splice(i, 1);
    };
  }

  /** Answer invokes of `channel` with fn(...args) (its value, or a promise). One per channel. */
  handle(channel, fn) {
    checkChannel(channel);
    if (typeof fn !== "function") throw new TypeError("handler must be a function");
    if (this._handlers.has(channel)) {
      throw new ValueError(`attempted to register a second handler for ${JSON.stringify(channel)}`);
    }
    this._handlers.set(channel, fn);
  }

  removeHandler(channel) {
    this._handlers.delete(channel);
  }

  /** Say goodbye and close (section 8.4); pending invokes reject with ConnectionClosed. */
  close(reason = "closed") {
    if (this.state === "closed") return;
    if (!this._ourGoodbye && !this._theirGoodbye) {
      this._emit(Kind.GOODBYE, 0, "", jsonBytes(reason ? { reason } : {}), true);
      this._ourGoodbye = true;
    }
    this._end(new ConnectionClosed(`connection closed: ${reason}`), 1000, reason);
  }

  // -- receiving ------------------------------------------------------------------------

  /** Feed one WebSocket message (a Uint8Array or ArrayBuffer, or a string: an error). */
  receive(message) {
    if (this.state === "closed" || this._theirGoodbye) return;
    try {
      if (typeof message === "string") throw new ProtocolError("a text message: frames travel in binary ones");
      const bytes = message instanceof Uint8Array ? message : new Uint8Array(message);
      this._dispatch(decodeFrame(bytes, this.maxFrameSize));
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      this._end(err, CLOSE_PROTOCOL_ERROR, "tether protocol error");
    }
  }

  /** The transport closed (or failed) under us. */
  transportClosed(why = "connection lost") {
    if (this.state === "closed") return;
    this._end(new PeerGone(why), null);
  }

  _dispatch(f) {
    if (!this.remoteHello) {
      if (f.kind !== Kind.HELLO) throw new ProtocolError(`expected HELLO, got frame kind ${f.kind}`);
      return this._hello(f);
    }
    switch (f.kind) {
      case Kind.RESULT: case Kind.ERROR: return this._answer(f);
      case Kind.INVOKE: return this._invoked(f);
      case Kind.EVENT: return this._event(f);
      case Kind.CANCEL: this._serving.delete(f.requestId); return;
      case Kind.PING: if (!this._ourGoodbye) this._emit(Kind.PONG, f.requestId, "", NO_BYTES, true); return;
      case Kind.PONG: {
        const p = this._pings.get(f.requestId);
        if (p) { this._pings.delete(f.requestId); clearTimeout(p.timer); p.resolve(); }
        return;
      }
      case Kind.ROUTE_OPEN: return this._routeOpen(f);
      case Kind.GOODBYE: return this._goodbye(f);
      case Kind.HELLO: throw new ProtocolError("second HELLO");
      case Kind.AUTH: throw new ProtocolError("AUTH on a connection without a secret");
      default: return; // ROUTE_CLOSE, RELEASE: nothing to do
    }
  }

  _hello(f) {
    let h;
    try { h = parseJson(f.body); } catch { throw new ProtocolError("malformed HELLO"); }
    if (h === null || typeof h !== "object" || Array.isArray(h)) throw new ProtocolError("malformed HELLO");
    if (h.protocol !== "tether") throw new ProtocolError(`peer speaks ${JSON.stringify(h.protocol)}, not "tether"`);
    if (h.version !== PROTOCOL_VERSION) throw new ProtocolError(`peer speaks protocol version ${h.version}`);
    const limit = h.max_frame_size ?? 0;
    if (!Number.isInteger(limit) || limit < 0 || (limit > 0 && limit < MIN_MAX_FRAME_SIZE)) {
      throw new ProtocolError(`peer's max_frame_size ${limit} is below the floor of ${MIN_MAX_FRAME_SIZE}`);
    }
    if ((h.encoding || "msgpack") !== "json") throw new ProtocolError(`peer's bodies are ${JSON.stringify(h.encoding || "msgpack")}, not "json"`);
    if (h.nonce) throw new ProtocolError("the peer requires a shared secret");
    if (limit && limit < this.sendLimit) this.sendLimit = limit;
    this.remoteHello = h;
    if (this.state === "handshake") this.state = "open";
    for (const w of this._helloWaiters.splice(0)) w.resolve(this);
  }

  _routeOpen(f) {
    // A page hosts no routes. A ROUTE_OPEN without a request id (version 1, 8.2) is refused
    // with a ROUTE_CLOSE; one with a request id is answered as an INVOKE of a kind nothing
    // handles, so that no route ever exists (8.2 of the routes revision).
    if (this._ourGoodbye) return;
    if (f.requestId === 0) return this._write(encodeFrame(Kind.ROUTE_CLOSE, 0, f.routeId));
    this._error(f.requestId, { code: "no_handler", message: `a page hosts no routes (kind ${JSON.stringify(f.channel)})` });
  }

  _answer(f) {
    const call = this._pending.get(f.requestId);
    if (!call) return; // timed out, cancelled or answered: dropped (7.2)
    this._forget(f.requestId, call);
    let body;
    try { body = parseJson(f.body); } catch {
      call.reject(new ProtocolError(`malformed ${f.kind === Kind.RESULT ? "result" : "error"} body`));
      return;
    }
    if (f.kind === Kind.RESULT) call.resolve(body);
    else if (body === null || typeof body !== "object") call.reject(new ProtocolError("malformed error body"));
    else call.reject(errorFromBody(body));
  }

  _invoked(f) {
    const rid = f.requestId;
    if (rid === 0) throw new ProtocolError("INVOKE with request id 0");
    if (this._ourGoodbye) return;
    if (f.routeId !== 0) {
      return this._error(rid, { code: "route_closed", message: `no route ${f.routeId} on this page` });
    }
    const fn = this._handlers.get(f.channel);
    if (!fn) return this._error(rid, { code: "no_handler", message: `no handler for channel ${JSON.stringify(f.channel)}` });
    let args;
    try { args = parseJson(f.body); } catch (err) {
      return this._error(rid, { code: "bad_request", message: `malformed arguments: ${err.message}` });
    }
    if (!Array.isArray(args)) return this._error(rid, { code: "bad_request", message: "the arguments are not an array" });
    this._serving.set(rid, true);
    new Promise((resolve) => resolve(fn(...args))).then(
      (value) => {
        if (!this._serving.delete(rid) || this.state !== "open") return; // cancelled, or closing
        let body;
        try { body = jsonBytes(value); } catch (err) {
          return this._error(rid, { code: "remote", ...describeError(err) });
        }
        if (16 + body.length > this.sendLimit) {
          return this._error(rid, { code: "too_large", message: `result too large: ${body.length} bytes` });
        }
        this._emit(Kind.RESULT, rid, "", body, true);
      },
      (err) => {
        if (!this._serving.delete(rid) || this.state !== "open") return;
        this._error(rid, { code: "remote", ...describeError(err) });
      },
    );
  }

  _error(rid, info) {
    if (this._ourGoodbye || this.state === "closed") return;
    let body = jsonBytes(info);
    if (16 + body.length > this.sendLimit) { // cut down: it must fit (7.3)
      body = jsonBytes({ code: info.code, message: String(info.message).slice(0, 1024), type: info.type || "" });
    }
    this._emit(Kind.ERROR, rid, "", body, true);
  }

  _event(f) {
    if (f.routeId !== 0) return; // a page has no routes: dropped
    const list = this._listeners.get(f.channel);
    if (!list || list.length === 0) return;
    let args;
    try { args = parseJson(f.body); } catch { console.warn(`tether: dropped event ${f.channel}: malformed arguments`); return; }
    if (!Array.isArray(args)) { console.warn(`tether: dropped event ${f.channel}: arguments are not an array`); return; }
    for (const fn of [...list]) {
      try {
        const r = fn(...args);
        if (r && typeof r.catch === "function") r.catch((err) => console.error(`tether: listener for ${f.channel} failed`, err));
      } catch (err) {
        console.error(`tether: listener for ${f.channel} failed`, err);
      }
    }
  }

  _goodbye(f) {
    let reason = "";
    try { reason = String(parseJson(f.body).reason ?? ""); } catch { /* tolerated: reason "" (8.4) */ }
    this._theirGoodbye = true;
    this._end(new PeerGone(`main said goodbye: ${reason || "no reason given"}`), 1000, "goodbye");
  }

  // -- sending and ending ---------------------------------------------------------------

  _checkOpen() {
    if (this.closeReason) throw this.closeReason;
    if (this._ourGoodbye || this._theirGoodbye) throw new ConnectionClosed("the connection is closing or closed");
  }

  _emit(kind, rid, channel, body, quiet = false) {
    const frame = encodeFrame(kind, rid, 0, channel, body);
    if (frame.length - 4 > this.sendLimit) {
      if (quiet) return;
      throw new PayloadTooLarge(`frame of ${frame.length - 4} bytes exceeds the limit of ${this.sendLimit} bytes`);
    }
    this._write(frame);
  }

  _write(frame) {
    if (this.state !== "closed") this.transport.write(frame);
  }

  _giveUp(rid, err) {
    const call = this._pending.get(rid);
    if (!call) return;
    this._forget(rid, call);
    if (this.state !== "closed") this._write(encodeFrame(Kind.CANCEL, rid)); // 7.4
    call.reject(err);
  }

  _forget(rid, call) {
    this._pending.delete(rid);
    clearTimeout(call.timer);
    if (call.onAbort) call.signal.removeEventListener("abort", call.onAbort);
  }

  _end(err, code, reason = "") {
    if (this.state === "closed") return;
    this.state = "closed";
    this.closeReason = err;
    for (const [rid, call] of [...this._pending]) { this._forget(rid, call); call.reject(err); }
    for (const p of this._pings.values()) { clearTimeout(p.timer); p.reject(err); }
    this._pings.clear();
    this._serving.clear();
    for (const w of this._helloWaiters.splice(0)) w.reject(err);
    for (const w of this._closeWaiters.splice(0)) w(err);
    if (code !== null) this.transport.close(code, reason);
  }
}

// -- the WebSocket ------------------------------------------------------------------------

/**
 * The secret the page was opened with: the `<secret>` of its path `/t/<secret>/...` (where
 * tether serves pages), else `?token=` or `#token=` in its URL.
 */
export function pageToken(loc = globalThis.location) {
  if (!loc) return null;
  const m = /^\/t\/([^/]+)\//.exec(loc.pathname || "");
  if (m) return decodeURIComponent(m[1]);
  const q = new URLSearchParams(loc.search || "").get("token");
  if (q) return q;
  return new URLSearchParams((loc.hash || "").replace(/^#/, "")).get("token");
}

/**
 * Connect this page to the main that served it; resolves once main's HELLO arrived.
 *
 * Options: `url` (default: this origin's /tether), `token` (default: the page URL's, see
 * pageToken), `timeout` (default invoke timeout, ms;
 * null: none), `connectTimeout` (ms, default 10000), `name`, `maxFrameSize`, `WebSocket` (a
 * WebSocket class, e.g. for Node).
 */
export function connect(options = {}) {
  try { checkTimeout(options.timeout); checkTimeout(options.connectTimeout, "connectTimeout", false); } catch (err) { return Promise.reject(err); }
  const {
    url, token = pageToken(), timeout = DEFAULT_TIMEOUT, connectTimeout = 10000, name = "",
    maxFrameSize = DEFAULT_MAX_FRAME_SIZE, WebSocket: WS = globalThis.WebSocket,
  } = options;
  const loc = globalThis.location;
  const target = new URL(url ?? "/tether", loc ? loc.href : undefined);
  if (target.protocol === "http:" || target.protocol === "https:") {
    target.protocol = target.protocol === "https:" ? "wss:" : "ws:";
  }
  if (token) target.searchParams.set("token", token);
  return new Promise((resolve, reject) => {
    const ws = new WS(target.href, [SUBPROTOCOL]);
    ws.binaryType = "arraybuffer";
    let session = null;
    const where = `${target.origin}${target.pathname}`;
    const timer = setTimeout(() => {
      const err = new PeerGone(`${where}: no HELLO within ${connectTimeout} ms`);
      if (session) session._end(err, 1000, "timeout"); else ws.close();
      reject(err);
    }, connectTimeout);
    ws.onopen = () => {
      session = new Session({
        write: (bytes) => ws.send(bytes),
        close: (code, reason) => ws.close(code, utf8.encode(reason).length > 123 ? "" : reason),
      }, { name, maxFrameSize, timeout });
      session.ready().then((s) => { clearTimeout(timer); resolve(s); }, (err) => { clearTimeout(timer); reject(err); });
    };
    ws.onmessage = (ev) => session?.receive(ev.data);
    ws.onclose = (ev) => {
      clearTimeout(timer);
      const why = ev.code === 1006 && !session
        ? `could not connect to ${where} (nothing listening, or refused: wrong secret or origin)`
        : `${where}: connection lost (code ${ev.code}${ev.reason ? `, ${ev.reason}` : ""})`;
      if (session) session.transportClosed(why); else reject(new PeerGone(why));
    };
  });
}
