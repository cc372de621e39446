// Unit tests of tether.js's protocol code (frames, Session), under Node's test runner:
//   node --test tests/js/
// No WebSocket and no server: a fake transport records what the Session writes.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import {
  Kind, Session, encodeFrame, decodeFrame, errorFromBody, pageToken, connect,
  RemoteError, NoHandler, Forbidden, BadRequest, InvokeTimeout, PeerGone, ConnectionClosed,
  ProtocolError, PayloadTooLarge, Busy, RouteClosed, TetherError, CLOSE_PROTOCOL_ERROR, ValueError,
} from "../../src/tether/web/static/tether.js";

const enc = new TextEncoder();
const dec = new TextDecoder();

function hex(bytes) {
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join(" ");
}

function json(value) {
  return enc.encode(JSON.stringify(value));
}

const MAIN_HELLO = { protocol: "tether", version: 1, role: "main", max_frame_size: 67108864, encoding: "json" };

/** A Session over a recording transport; `frames()` decodes what it wrote. */
function session(options = {}) {
  const written = [];
  const closed = [];
  const s = new Session({ write: (b) => written.push(b), close: (code, reason) => closed.push([code, reason]) }, options);
  const frames = () => written.map((b) => {
    const f = decodeFrame(b);
    return { ...f, json: f.body.length ? JSON.parse(dec.decode(f.body)) : undefined };
  });
  return { s, written, closed, frames };
}

function opened(options) {
  const t = session(options);
  t.s.receive(encodeFrame(Kind.HELLO, 0, 0, "", json(MAIN_HELLO)));
  t.written.length = 0; // the page's HELLO
  return t;
}

test("frames match the hex examples of docs/protocol.md", () => {
  assert.equal(hex(encodeFrame(Kind.CANCEL, 7)), "10 00 00 00 06 00 00 00 07 00 00 00 00 00 00 00 00 00 00 00");
  assert.equal(hex(encodeFrame(Kind.PING, 0xdeadbeef)), "10 00 00 00 09 00 00 00 ef be ad de 00 00 00 00 00 00 00 00");
  assert.equal(hex(encodeFrame(Kind.ROUTE_CLOSE, 0, 9)), "10 00 00 00 08 00 00 00 00 00 00 00 09 00 00 00 00 00 00 00");
  // The worked example's INVOKE, with the JSON body instead of MessagePack's 91 ac ...
  const f = encodeFrame(Kind.INVOKE, 1, 0, "message-from-renderer", json(["Hola, mundo!"]));
  assert.equal(hex(f.subarray(0, 20)), "35 00 00 00 02 00 15 00 01 00 00 00 00 00 00 00 00 00 00 00");
  assert.equal(dec.decode(f.subarray(41)), '["Hola, mundo!"]');
  const back = decodeFrame(f);
  assert.deepEqual([back.kind, back.requestId, back.routeId, back.channel], [Kind.INVOKE, 1, 0, "message-from-renderer"]);
});

test("decodeFrame refuses what is not exactly one frame", () => {
  const good = encodeFrame(Kind.EVENT, 0, 0, "theme", json(["dark"]));
  const bad = {
    short: good.subarray(0, 10),
    trailing: new Uint8Array([...good, 0]),
    cut: good.subarray(0, good.length - 1),
    two: new Uint8Array([...good, ...good]),
    kind0: (() => { const b = good.slice(); b[4] = 0; return b; })(),
    kind14: (() => { const b = good.slice(); b[4] = 14; return b; })(),
    chanPastEnd: (() => { const b = good.slice(); b[6] = 0xff; return b; })(),
    attachment: (() => { const b = good.slice(); b[16] = 1; return b; })(),
    notUtf8: encodeFrame(Kind.EVENT, 0, 0, new Uint8Array([0xff, 0xfe]), json([])),
  };
  for (const [name, bytes] of Object.entries(bad)) {
    assert.throws(() => decodeFrame(bytes), ProtocolError, name);
  }
  assert.throws(() => decodeFrame(encodeFrame(Kind.EVENT, 0, 0, "x", new Uint8Array(5000)), 4096), /exceeds max_frame_size/);
});

test("the HELLO goes out first, JSON, and the peer's opens the session", async () => {
  const { s, frames } = session({ name: "tab" });
  const [hello] = frames();
  assert.equal(hello.kind, Kind.HELLO);
  assert.deepEqual(hello.json, { protocol: "tether", version: 1, role: "page", max_frame_size: 67108864, encoding: "json", name: "tab" });
  assert.equal(s.state, "handshake");
  const ready = s.ready();
  s.receive(encodeFrame(Kind.HELLO, 0, 0, "", json(MAIN_HELLO)));
  assert.equal(await ready, s);
  assert.equal(s.state, "open");
  assert.equal(s.remoteHello.role, "main");
});

test("a bad HELLO is a protocol error that closes the session", async () => {
  const cases = [
    encodeFrame(Kind.INVOKE, 1, 0, "x", json([])),
    encodeFrame(Kind.HELLO, 0, 0, "", json({ ...MAIN_HELLO, protocol: "other" })),
    encodeFrame(Kind.HELLO, 0, 0, "", json({ ...MAIN_HELLO, version: 2 })),
    encodeFrame(Kind.HELLO, 0, 0, "", json({ ...MAIN_HELLO, max_frame_size: 100 })),
    encodeFrame(Kind.HELLO, 0, 0, "", json({ ...MAIN_HELLO, encoding: undefined })),
    encodeFrame(Kind.HELLO, 0, 0, "", enc.encode("{not json")),
    encodeFrame(Kind.HELLO, 0, 0, "", json([1, 2])),
  ];
  for (const bytes of cases) {
    const { s, closed } = session();
    const ready = s.ready();
    s.receive(bytes);
    await assert.rejects(ready, ProtocolError);
    assert.deepEqual(closed, [[CLOSE_PROTOCOL_ERROR, "tether protocol error"]]);
    assert.equal(s.state, "closed");
  }
});

test("invoke: request ids, JSON arguments, the result", async () => {
  const { s, frames } = opened();
  const a = s.invoke("add", 1, 2);
  const b = s.invoke("message-from-renderer", "Hola, mundo!", { timeout: 5000 });
  const [fa, fb] = frames();
  assert.deepEqual([fa.kind, fa.requestId, fa.channel, fa.json], [Kind.INVOKE, 1, "add", [1, 2]]);
  assert.deepEqual([fb.requestId, fb.json], [2, ["Hola, mundo!"]]);
  s.receive(encodeFrame(Kind.RESULT, 2, 0, "", json("Received: Hola, mundo!")));
  s.receive(encodeFrame(Kind.RESULT, 1, 0, "", json(3)));
  assert.equal(await b, "Received: Hola, mundo!");
  assert.equal(await a, 3);
  s.receive(encodeFrame(Kind.RESULT, 1, 0, "", json(4))); // answered already: dropped
});

test("a plain object that is not only options is an argument; invokeWith is explicit", async () => {
  const { s, frames } = opened();
  const calls = [
    s.invoke("save", { timeout: 5, name: "x" }),
    s.invoke("save", {}),
    s.invokeWith("save", [{ timeout: 5 }], { timeout: 1000 }),
  ];
  assert.deepEqual(frames().map((f) => f.json), [[{ timeout: 5, name: "x" }], [{}], [{ timeout: 5 }]]);
  s.close();
  for (const c of calls) await assert.rejects(c, ConnectionClosed);
});

test("request ids wrap from 2**32-1 to 1 and skip ids still pending", async () => {
  const { s, frames } = opened({ timeout: null });
  const calls = [s.invoke("a")]; // 1, still pending
  s._nextId = 0xffffffff - 1;
  calls.push(s.invoke("b"), s.invoke("c"));
  assert.deepEqual(frames().map((f) => f.requestId), [1, 0xffffffff, 2]);
  s.close();
  for (const c of calls) await assert.rejects(c, ConnectionClosed);
});

test("ERROR bodies reject with the Python class names", async () => {
  const { s } = opened();
  const bodies = [
    [{ code: "remote", message: "boom", type: "ValueError", traceback: "Traceback..." }, RemoteError],
    [{ code: "no_handler", message: "no handler" }, NoHandler],
    [{ code: "forbidden", message: "not for pages" }, Forbidden],
    [{ code: "bad_request", message: "bad argument `x`", path: "x" }, BadRequest],
    [{ code: "too_large", message: "big" }, PayloadTooLarge],
    [{ code: "busy", message: "busy" }, Busy],
    [{ code: "route_closed", message: "closed" }, RouteClosed],
    [{ code: "something_new", message: "?" }, RemoteError],
  ];
  for (const [body, cls] of bodies) {
    const p = s.invoke("ch");
    s.receive(encodeFrame(Kind.ERROR, s._nextId, 0, "", json(body)));
    const err = await p.catch((e) => e);
    assert.ok(err instanceof cls && err instanceof TetherError && err instanceof Error);
    assert.equal(err.name, cls.name);
  }
  const p = s.invoke("ch");
  s.receive(encodeFrame(Kind.ERROR, s._nextId, 0, "", json(bodies[0][0])));
  const err = await p.catch((e) => e);
  assert.equal(err.remoteType, "ValueError");
  assert.equal(err.remoteTraceback, "Traceback...");
  assert.equal(errorFromBody({ code: "bad_request", message: "m", path: "p.y" }).path, "p.y");
  assert.equal(errorFromBody({ code: "weird", message: "m" }).remoteType, "weird");
});

test("a timeout rejects with InvokeTimeout and sends CANCEL; a late answer is dropped", async () => {
  const { s, frames } = opened();
  const err = await s.invoke("slow", 1, { timeout: 20 }).catch((e) => e);
  assert.ok(err instanceof InvokeTimeout);
  assert.equal(err.name, "InvokeTimeout");
  const [inv, cancel] = frames();
  assert.deepEqual([cancel.kind, cancel.requestId, cancel.body.length], [Kind.CANCEL, inv.requestId, 0]);
  s.receive(encodeFrame(Kind.RESULT, inv.requestId, 0, "", json(1))); // ignored
  assert.equal(s.state, "open");
});

test("an AbortSignal cancels the call", async () => {
  const { s, frames } = opened();
  const ac = new AbortController();
  const p = s.invoke("slow", { signal: ac.signal });
  ac.abort(new Error("user left"));
  await assert.rejects(p, /user left/);
  assert.equal(frames()[1].kind, Kind.CANCEL);
});

test("main invokes the page: handle, async handlers, errors, no handler, bad arguments", async () => {
  const { s, frames } = opened();
  s.handle("page.title", () => "tether page");
  s.handle("add", async (a, b) => a + b);
  s.handle("fail", () => { throw new TypeError("nope"); });
  assert.throws(() => s.handle("add", () => 0), (e) => e instanceof ValueError && e instanceof TetherError
    && e.name === "ValueError" && /second handler for "add"/.test(e.message));
  s.receive(encodeFrame(Kind.INVOKE, 1, 0, "page.title", json([])));
  s.receive(encodeFrame(Kind.INVOKE, 2, 0, "add", json([2, 3])));
  s.receive(encodeFrame(Kind.INVOKE, 3, 0, "fail", json([])));
  s.receive(encodeFrame(Kind.INVOKE, 4, 0, "missing", json([])));
  s.receive(encodeFrame(Kind.INVOKE, 5, 0, "add", enc.encode("[1,")));
  s.receive(encodeFrame(Kind.INVOKE, 6, 0, "add", json({ a: 1 })));
  await new Promise((r) => setTimeout(r, 10));
  const byId = Object.fromEntries(frames().map((f) => [f.requestId, f]));
  assert.deepEqual([byId[1].kind, byId[1].json], [Kind.RESULT, "tether page"]);
  assert.deepEqual([byId[2].kind, byId[2].json], [Kind.RESULT, 5]);
  assert.equal(byId[3].kind, Kind.ERROR);
  assert.deepEqual([byId[3].json.code, byId[3].json.type, byId[3].json.message], ["remote", "TypeError", "nope"]);
  assert.equal(byId[4].json.code, "no_handler");
  assert.equal(byId[5].json.code, "bad_request");
  assert.equal(byId[6].json.code, "bad_request");
  s.removeHandler("add");
  s.receive(encodeFrame(Kind.INVOKE, 7, 0, "add", json([1, 2])));
  assert.equal(frames().at(-1).json.code, "no_handler");
});

test("a CANCEL drops the handler's answer", async () => {
  const { s, frames } = opened();
  let finish;
  s.handle("slow", () => new Promise((r) => { finish = r; }));
  s.receive(encodeFrame(Kind.INVOKE, 9, 0, "slow", json([])));
  s.receive(encodeFrame(Kind.CANCEL, 9));
  finish("late");
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(frames(), []);
});

test("a result too large for main becomes a too_large ERROR", async () => {
  const { s, frames } = session();
  s.receive(encodeFrame(Kind.HELLO, 0, 0, "", json({ ...MAIN_HELLO, max_frame_size: 4096 })));
  s.handle("big", () => "x".repeat(5000));
  s.receive(encodeFrame(Kind.INVOKE, 1, 0, "big", json([])));
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(frames().at(-1).json.code, "too_large");
  // ...and the page cannot send main more than it accepts: nothing goes out.
  const before = frames().length;
  await assert.rejects(s.invoke("x", "y".repeat(5000)), PayloadTooLarge);
  assert.throws(() => s.send("x", "y".repeat(5000)), PayloadTooLarge);
  assert.equal(frames().length, before);
});

test("events: send, on, off", () => {
  const { s, frames } = opened();
  s.send("log", "clicked", 1);
  assert.deepEqual(frames()[0], { ...frames()[0], kind: Kind.EVENT, requestId: 0, channel: "log", json: ["clicked", 1] });
  const seen = [];
  const off = s.on("theme", (t) => seen.push(["a", t]));
  s.on("theme", (t) => seen.push(["b", t]));
  s.on("theme", () => { throw new Error("a listener that fails does not stop the others"); });
  const quiet = console.error;
  console.error = () => {};
  try {
    s.receive(encodeFrame(Kind.EVENT, 0, 0, "theme", json(["dark"])));
    off();
    s.receive(encodeFrame(Kind.EVENT, 0, 0, "theme", json(["light"])));
  } finally {
    console.error = quiet;
  }
  assert.deepEqual(seen, [["a", "dark"], ["b", "dark"], ["b", "light"]]);
  assert.throws(() => s.send("", 1), TypeError);
  assert.throws(() => s.send("x", 1n), TypeError); // BigInt is not JSON
});

test("PING is answered with PONG, ROUTE_OPEN with ROUTE_CLOSE; ping() measures", async () => {
  const { s, frames } = opened();
  s.receive(encodeFrame(Kind.PING, 0xdeadbeef));
  s.receive(encodeFrame(Kind.ROUTE_OPEN, 0, 9));
  const [pong, routeClose] = frames();
  assert.deepEqual([pong.kind, pong.requestId], [Kind.PONG, 0xdeadbeef]);
  assert.deepEqual([routeClose.kind, routeClose.routeId], [Kind.ROUTE_CLOSE, 9]);
  const rtt = s.ping();
  const ping = frames()[2];
  assert.equal(ping.kind, Kind.PING);
  s.receive(encodeFrame(Kind.PONG, ping.requestId));
  assert.ok((await rtt) >= 0);
});

test("main's GOODBYE fails pending calls with PeerGone and closes", async () => {
  const { s, closed } = opened();
  const p = s.invoke("x");
  const ended = s.closed;
  s.receive(encodeFrame(Kind.GOODBYE, 0, 0, "", json({ reason: "main closing" })));
  const err = await p.catch((e) => e);
  assert.ok(err instanceof PeerGone);
  assert.match(err.message, /main closing/);
  assert.equal(await ended, err);
  assert.deepEqual(closed, [[1000, "goodbye"]]);
  s.receive(encodeFrame(Kind.PING, 1)); // ignored
  assert.throws(() => s.send("x"), PeerGone);
});

test("close() says goodbye; pending calls reject with ConnectionClosed", async () => {
  const { s, frames, closed } = opened();
  const p = s.invoke("x");
  s.close("bye");
  await assert.rejects(p, ConnectionClosed);
  const last = frames().at(-1);
  assert.deepEqual([last.kind, last.json], [Kind.GOODBYE, { reason: "bye" }]);
  assert.deepEqual(closed, [[1000, "bye"]]);
  await assert.rejects(s.invoke("y"), ConnectionClosed);
});

test("a malformed frame from main closes with 4002; a lost transport is PeerGone", async () => {
  const { s, closed } = opened();
  const p = s.invoke("x");
  s.receive("text");
  await assert.rejects(p, ProtocolError);
  assert.deepEqual(closed, [[CLOSE_PROTOCOL_ERROR, "tether protocol error"]]);
  const t = opened();
  const q = t.s.invoke("x");
  t.s.transportClosed("gone (code 1006)");
  await assert.rejects(q, PeerGone);
  assert.deepEqual(t.closed, []);
});

test("pageToken reads the secret from the path /t/<secret>/", () => {
  assert.equal(pageToken({ pathname: "/t/abc_-9/", search: "", hash: "" }), "abc_-9");
  assert.equal(pageToken({ pathname: "/t/abc/sub/page.html", search: "?token=zz" }), "abc");
  assert.equal(pageToken({ pathname: "/t/abc", search: "" }), null);
  assert.equal(pageToken({ pathname: "/x/t/abc/", search: "" }), null);
});

test("pageToken reads ?token= or #token=", () => {
  assert.equal(pageToken({ search: "?token=abc&x=1", hash: "" }), "abc");
  assert.equal(pageToken({ search: "", hash: "#token=def" }), "def");
  assert.equal(pageToken({ search: "", hash: "" }), null);
  assert.equal(pageToken(undefined), null);
});

test("connect() opens /tether with the token and the subprotocol, and waits for HELLO", async () => {
  const sockets = [];
  class FakeWebSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.sent = [];
      sockets.push(this);
      setTimeout(() => this.onopen(), 0);
    }
    send(b) { this.sent.push(b); }
    close(code, reason) { this.closedWith = [code, reason]; }
  }
  const pending = connect({ url: "http://127.0.0.1:8080/tether", token: "s3cret", WebSocket: FakeWebSocket });
  await new Promise((r) => setTimeout(r, 5));
  const ws = sockets[0];
  assert.equal(ws.url, "ws://127.0.0.1:8080/tether?token=s3cret");
  assert.deepEqual(ws.protocols, ["tether.json"]);
  assert.equal(decodeFrame(ws.sent[0]).kind, Kind.HELLO);
  ws.onmessage({ data: encodeFrame(Kind.HELLO, 0, 0, "", json(MAIN_HELLO)).buffer });
  const ipc = await pending;
  assert.equal(ipc.state, "open");
  ipc.close();
  assert.deepEqual(ws.closedWith, [1000, "closed"]);

  const refused = connect({ url: "ws://127.0.0.1:8080/tether", WebSocket: class {
    constructor() { setTimeout(() => this.onclose({ code: 1006, reason: "" }), 0); }
  } });
  await assert.rejects(refused, (e) => e instanceof PeerGone && /refused/.test(e.message));
});

test("the page's frames are docs/protocol.md 12.8, byte for byte", async () => {
  const doc = readFileSync(new URL("../../docs/protocol.md", import.meta.url), "utf8");
  const blocks = {};
  for (const m of doc.matchAll(/^```hex-json name=([\w-]+)\n([\s\S]*?)^```/gm)) {
    blocks[m[1]] = m[2].split(/\s+/).filter(Boolean).join(" ");
  }
  assert.deepEqual(Object.keys(blocks).sort(), ["page-hello", "page-invoke", "page-result"]);
  const { s, written } = session();
  const call = s.invoke("message-from-renderer", "Hola, mundo!", { timeout: 5000 });
  assert.equal(hex(written[0]), blocks["page-hello"]);
  assert.equal(hex(written[1]), blocks["page-invoke"]);
  s.receive(encodeFrame(Kind.HELLO, 0, 0, "", json(MAIN_HELLO)));
  const result = Uint8Array.from(blocks["page-result"].split(" ").map((h) => parseInt(h, 16)));
  s.receive(result);
  assert.equal(await call, "Received: Hola, mundo!");
});

test("a page hosts no routes: ROUTE_OPEN is refused, frames on a route are not dispatched", () => {
  const { s, frames } = opened();
  const seen = [];
  s.handle("ch", () => seen.push("handler"));
  s.on("ch", () => seen.push("listener"));
  s.receive(encodeFrame(Kind.ROUTE_OPEN, 0, 9)); // version 1: no request id -> ROUTE_CLOSE
  s.receive(encodeFrame(Kind.ROUTE_OPEN, 5, 3, "counter", json([1]))); // with one: an answer
  s.receive(encodeFrame(Kind.INVOKE, 6, 3, "ch", json([])));
  s.receive(encodeFrame(Kind.EVENT, 0, 3, "ch", json([])));
  const [close, refused, onRoute] = frames();
  assert.deepEqual([close.kind, close.routeId], [Kind.ROUTE_CLOSE, 9]);
  assert.deepEqual([refused.kind, refused.requestId, refused.json.code], [Kind.ERROR, 5, "no_handler"]);
  assert.deepEqual([onRoute.kind, onRoute.requestId, onRoute.json.code], [Kind.ERROR, 6, "route_closed"]);
  assert.equal(frames().length, 3);
  assert.deepEqual(seen, []);
});

test("an invalid timeout is a TypeError or RangeError up front, not an instant InvokeTimeout", async () => {
  const { s, frames } = opened();
  for (const [bad, cls] of [["abc", TypeError], [-1, RangeError], [NaN, RangeError], [2 ** 31, RangeError]]) {
    await assert.rejects(s.invoke("ch", 1, { timeout: bad }), cls);
    await assert.rejects(s.invokeWith("ch", [1], { timeout: bad }), cls);
    await assert.rejects(s.ping({ timeout: bad }), cls);
    assert.throws(() => session({ timeout: bad }), cls);
    await assert.rejects(connect({ timeout: bad, WebSocket: class { constructor() { throw new Error("opened"); } } }), cls);
    await assert.rejects(connect({ connectTimeout: bad, WebSocket: class { constructor() { throw new Error("opened"); } } }), cls);
  }
  await assert.rejects(connect({ connectTimeout: null, WebSocket: class { constructor() { throw new Error("opened"); } } }), TypeError);
  await assert.rejects(s.invokeWith("ch", "not an array"), TypeError);
  assert.deepEqual(frames(), []); // nothing was sent
  // null and Infinity still mean no timeout; 0 and finite numbers are timeouts
  const forever = [s.invoke("ch", { timeout: null }), s.invokeWith("ch", [], { timeout: Infinity })];
  await assert.rejects(s.invoke("ch", { timeout: 0 }), InvokeTimeout);
  assert.equal(frames().length, 4); // two INVOKEs pending, an INVOKE and its CANCEL
  s.close();
  for (const c of forever) await assert.rejects(c, ConnectionClosed);
});

test("a socket closed before it opened: nothing listening, or refused, in the message", async () => {
  const refused = connect({ url: "ws://127.0.0.1:9/tether", WebSocket: class {
    constructor() { setTimeout(() => this.onclose({ code: 1006, reason: "" }), 0); }
  } });
  await assert.rejects(refused, (e) => e instanceof PeerGone
    && e.message === "could not connect to ws://127.0.0.1:9/tether (nothing listening, or refused: wrong secret or origin)");
});
