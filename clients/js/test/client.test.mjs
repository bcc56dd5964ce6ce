// The JavaScript client against the real chat example: transport choice and
// fallback, backoff, resume without gap or duplicate, and the POST rules of
// the HTTP transports (seq, retries, new session on 404/409).
//
//   cargo build --example chat --features redis
//   node --experimental-websocket --test clients/js/test/   (Node 20; 22+ needs no flag)
//
// The chat binary is $TOWER_CHANNELS_CHAT_BIN (tests/js_client.rs sets it)
// or target/debug/examples/chat. The restart tests need Redis at REDIS_URL.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { connect, backoff, parseId, positionOf, TRANSPORTS } from "../tower-channels.js";
import * as S from "./support.mjs";

const NO_BIN = "no chat example binary (cargo build --example chat, or TOWER_CHANNELS_CHAT_BIN)";
const NO_WS = "no WebSocket in this Node (Node 22+, or node --experimental-websocket)";
const NO_HTTP = "the chat example has no HTTP fallback";
const NativeWebSocket = globalThis.WebSocket;

/** A skip reason, or a failure when the environment says nothing may be skipped. */
function skip(t, why) {
  if (S.required("INTEROP")) assert.fail(`${why} and TOWER_CHANNELS_REQUIRE_INTEROP=1`);
  t.skip(why);
}

describe("pure logic", () => {
  test("backoff doubles from min up to max, jittered in the upper half", () => {
    for (let a = 0; a < 12; a++) {
      const cap = Math.min(2000, 100 * 2 ** a);
      assert.equal(backoff(a, 100, 2000, () => 0), cap / 2);
      assert.equal(backoff(a, 100, 2000, () => 1), cap);
    }
    const spread = new Set(Array.from({ length: 50 }, () => backoff(4, 100, 10000)));
    assert.ok(spread.size > 10, "jitter spreads the delays");
    for (const d of spread) assert.ok(d >= 800 && d <= 1600, `${d} within [800, 1600]`);
    assert.equal(backoff(1e6, 100, 2000, () => 1), 2000, "huge attempts stay at the cap");
  });

  test("positions come from event ids and from offset/epoch in JSON", () => {
    assert.deepEqual(parseId("E1:42"), { epoch: "E1", offset: 42 });
    assert.deepEqual(parseId("a:b:7"), { epoch: "a:b", offset: 7 });
    for (const bad of ["", "7", ":7", "e:", "e:-1", "e:1.5", "e:x", null]) assert.equal(parseId(bad), null, bad);
    assert.deepEqual(positionOf('{"message":"m","offset":3,"epoch":"E"}'), { epoch: "E", offset: 3 });
    for (const none of ['{"message":"m"}', '{"offset":3}', '{"offset":"3","epoch":"E"}', "offset", new ArrayBuffer(1)]) {
      assert.equal(positionOf(none), null);
    }
  });

  test("no usable transport is an error, not a silent hang", () => {
    assert.throws(() => connect("http://127.0.0.1:9/", { WebSocket: null, EventSource: null, fetch: null }), /no usable transport/);
    assert.deepEqual(TRANSPORTS, ["websocket", "sse", "stream", "poll"]);
  });
});

describe("against the chat example", () => {
  let server = null;
  let http = false;
  let closedPort = 0;
  const conns = [];

  before(async () => {
    if (!S.chatBinary()) return;
    server = await S.startChat();
    http = await S.hasHttpFallback(server.url);
    closedPort = await S.freePort();
  });
  after(async () => {
    for (const c of conns) c.close();
    if (server) await server.kill();
  });

  /** Skips (or fails) unless the server and, as needed, WebSocket and the HTTP fallback are there. */
  function needs(t, { ws = false, fallback = false } = {}) {
    if (!server) return skip(t, NO_BIN), false;
    if (ws && !NativeWebSocket) return skip(t, NO_WS), false;
    if (fallback && !http) return skip(t, NO_HTTP), false;
    return true;
  }

  /** A connection to `room` recorded by a fresh recorder. */
  function open(room, options = {}, base = server.url) {
    const r = S.recorder();
    const conn = connect(`${base}/ws/chat/${room}`, { EventSource: null, ...r.callbacks, ...options });
    conns.push(conn);
    return { conn, r };
  }

  /** fetch and WebSocket that can be taken offline (a refused port). */
  function gate() {
    const g = { online: true, urls: [] };
    g.fetch = (url, init) => {
      g.urls.push(String(url));
      return g.online ? fetch(url, init) : Promise.reject(new TypeError("offline"));
    };
    g.WebSocket = class extends NativeWebSocket {
      constructor(url, protocols) {
        g.urls.push(String(url));
        super(g.online ? url : `ws://127.0.0.1:${closedPort}/`, protocols);
      }
    };
    return g;
  }

  test("WebSocket first when it works; close() ends it for good", async (t) => {
    if (!needs(t, { ws: true })) return;
    const room = S.room("ws");
    const { conn, r } = open(room);
    const sent = ["one", "two", "three"];
    for (const m of sent) conn.send(JSON.stringify({ message: m })); // queued until open
    await r.until(() => r.messages.length === 3, "3 messages");
    assert.deepEqual(r.messages, sent);
    assert.deepEqual(r.states.slice(0, 2), ["connecting:websocket", "open:websocket"]);
    conn.close();
    assert.equal(r.last.state, "closed");
    assert.equal(r.last.retryIn, null);
    assert.equal(conn.send("x"), false);
  });

  for (const transport of ["websocket", "stream", "poll"]) {
    test(`${transport}: 30 messages each way, in order, none twice`, async (t) => {
      if (!needs(t, { ws: transport === "websocket", fallback: transport !== "websocket" })) return;
      const room = S.room(transport);
      const { conn, r } = open(room, { transports: [transport] });
      await r.until(() => conn.state === "open", "open");
      const mine = Array.from({ length: 30 }, (_, i) => `${transport} ${i}`);
      const theirs = Array.from({ length: 30 }, (_, i) => `posted ${i}`);
      for (const m of mine) conn.send(JSON.stringify({ message: m }));
      for (const m of theirs) await S.postToRoom(server.url, room, m);
      await r.until(() => r.messages.length >= 60, "60 messages");
      assert.deepEqual(r.messages.filter((m) => m.startsWith(transport)), mine);
      assert.deepEqual(r.messages.filter((m) => m.startsWith("posted")), theirs);
      assert.equal(r.messages.length, 60);
      assert.deepEqual(r.states, [`connecting:${transport}`, `open:${transport}`]);
    });
  }

  test("falls back to HTTP-streaming when WebSocket is undefined", async (t) => {
    if (!needs(t, { fallback: true })) return;
    const { conn, r } = open(S.room("nows"), { WebSocket: null });
    assert.deepEqual(conn.transports, ["stream", "poll"]);
    conn.send(JSON.stringify({ message: "hi" }));
    await r.until(() => r.messages.length === 1, "the message");
    assert.deepEqual(r.states.slice(0, 2), ["connecting:stream", "open:stream"]);
  });

  test("falls back when the WebSocket is refused", async (t) => {
    if (!needs(t, { ws: true, fallback: true })) return;
    const refused = class extends NativeWebSocket {
      constructor() {
        super(`ws://127.0.0.1:${closedPort}/`);
      }
    };
    const { conn, r } = open(S.room("refused"), { WebSocket: refused });
    conn.send(JSON.stringify({ message: "hi" }));
    await r.until(() => r.messages.length === 1, "the message");
    assert.deepEqual(r.states.slice(0, 3), ["connecting:websocket", "connecting:stream", "open:stream"]);
  });

  test("falls back when the WebSocket is silent past openTimeout", async (t) => {
    if (!needs(t, { ws: true, fallback: true })) return;
    const silent = await S.silentServer();
    t.after(() => silent.close());
    const Silent = class extends NativeWebSocket {
      constructor() {
        super(`ws://127.0.0.1:${silent.port}/`);
      }
    };
    const started = Date.now();
    const { conn, r } = open(S.room("silent"), { WebSocket: Silent, openTimeout: 300 });
    await r.until(() => conn.state === "open", "open");
    assert.deepEqual(r.states, ["connecting:websocket", "connecting:stream", "open:stream"]);
    assert.ok(Date.now() - started >= 300, "waited openTimeout for the WebSocket");
  });

  test("a stream that is given up is aborted, not left holding a connection", async (t) => {
    if (!needs(t, { fallback: true })) return;
    const streams = [];
    const tracking = (url, init) => {
      if (String(url).includes("transport=stream")) streams.push(init.signal);
      return fetch(url, init);
    };
    const { conn, r } = open(S.room("abort"), { transports: ["stream"], fetch: tracking });
    await r.until(() => conn.state === "open", "open");
    conn.reconnect();
    await r.until(() => r.states.filter((s) => s === "open:stream").length === 2, "the second stream");
    assert.equal(streams.length, 2);
    assert.equal(streams[0].aborted, true, "the first stream's fetch is aborted");
    conn.close();
    assert.equal(streams[1].aborted, true, "close() aborts the second");
  });

  test("falls back to long-poll when streaming fails", async (t) => {
    if (!needs(t, { fallback: true })) return;
    const noStream = (url, init) =>
      String(url).includes("transport=stream") ? Promise.reject(new TypeError("blocked")) : fetch(url, init);
    const { conn, r } = open(S.room("nostream"), { WebSocket: null, fetch: noStream });
    conn.send(JSON.stringify({ message: "hi" }));
    await r.until(() => r.messages.length === 1, "the message");
    assert.deepEqual(r.states.slice(0, 3), ["connecting:stream", "connecting:poll", "open:poll"]);
  });

  test("backs off with growing jittered delays while nothing connects, then connects", async (t) => {
    if (!needs(t, { ws: true })) return;
    const g = gate();
    g.online = false;
    const { conn, r } = open(S.room("backoff"), {
      WebSocket: g.WebSocket,
      fetch: g.fetch,
      backoffMin: 40,
      backoffMax: 200,
    });
    const delays = () => r.changes.filter((s) => s.state === "closed").map((s) => s.retryIn);
    await r.until(() => delays().length >= 4, "4 failed rounds");
    delays().slice(0, 4).forEach((d, i) => {
      const cap = Math.min(200, 40 * 2 ** i);
      assert.ok(d >= cap / 2 && d <= cap, `delay ${i} = ${d} within [${cap / 2}, ${cap}]`);
    });
    g.online = true;
    await r.until(() => conn.state === "open", "open once online");
    assert.equal(conn.transport, "websocket", "the first transport again once the network is back");
  });

  test("connections that die right after opening keep backing off", async (t) => {
    if (!needs(t, { ws: true })) return;
    // Opens (the real server accepts), then is killed at once, as by a proxy.
    const Dying = class extends NativeWebSocket {
      constructor(url, protocols) {
        super(url, protocols);
        this.addEventListener("open", () => this.close());
      }
    };
    const { r } = open(S.room("dying"), { transports: ["websocket"], WebSocket: Dying, backoffMin: 40, backoffMax: 400 });
    const delays = () => r.changes.filter((s) => s.state === "closed").map((s) => s.retryIn);
    await r.until(() => delays().length >= 4, "4 drops");
    assert.equal(r.states.filter((s) => s === "open:websocket").length >= 4, true, "each attempt opened");
    delays().slice(0, 4).forEach((d, i) => {
      const cap = Math.min(400, 40 * 2 ** i);
      assert.ok(d >= cap / 2 && d <= cap, `delay ${i} = ${d} within [${cap / 2}, ${cap}]`);
    });
  });

  for (const transport of ["websocket", "stream", "poll"]) {
    test(`${transport}: resumes after a drop, no gap, no duplicate`, async (t) => {
      if (!needs(t, { ws: true, fallback: transport !== "websocket" })) return;
      const room = S.room("resume" + transport);
      const g = gate();
      const { conn, r } = open(room, { transports: [transport], WebSocket: g.WebSocket, fetch: g.fetch, backoffMin: 50, backoffMax: 200 });
      await r.until(() => conn.state === "open", "open");
      await S.postToRoom(server.url, room, "m1");
      await r.until(() => r.messages.length === 1, "m1");
      g.online = false;
      conn.reconnect();
      await r.until(() => conn.state === "closed", "the reconnect to fail");
      for (const m of ["m2", "m3", "m4"]) await S.postToRoom(server.url, room, m);
      const urls = g.urls.length;
      g.online = true;
      await r.until(() => r.messages.length === 4, "m2..m4 recovered");
      await S.postToRoom(server.url, room, "m5");
      await r.until(() => r.messages.length === 5, "m5");
      assert.deepEqual(r.messages, ["m1", "m2", "m3", "m4", "m5"]);
      const reopen = new URL(g.urls.slice(urls).find((u) => !u.includes("session=")));
      assert.equal(reopen.searchParams.get("offset"), String(conn.position.offset - 4));
      assert.equal(reopen.searchParams.get("epoch"), conn.position.epoch);
    });
  }

  test("a message delivered twice reaches the app once (resume: false shows both)", async (t) => {
    if (!needs(t, { ws: true })) return;
    const Twice = class extends NativeWebSocket {
      set onmessage(f) {
        super.onmessage = f && ((e) => (f(e), f(e)));
      }
      get onmessage() {
        return super.onmessage;
      }
    };
    const room = S.room("twice");
    const a = open(room, { WebSocket: Twice });
    const b = open(room, { WebSocket: Twice, resume: false });
    await a.r.until(() => a.conn.state === "open", "a open");
    await b.r.until(() => b.conn.state === "open", "b open");
    for (const m of ["x", "y", "z"]) await S.postToRoom(server.url, room, m);
    await b.r.until(() => b.r.messages.length === 6, "b: each twice");
    await a.r.until(() => a.r.messages.length === 3, "a: 3");
    assert.deepEqual(a.r.messages, ["x", "y", "z"]);
    assert.deepEqual(b.r.messages, ["x", "x", "y", "y", "z", "z"]);
  });

  /** A fetch that lets `onPost(url, init, n)` handle the nth POST (from 1); `posts` lists POST URLs. */
  function postHook(onPost) {
    const h = { posts: [] };
    h.fetch = (url, init = {}) => {
      if (init.method !== "POST") return fetch(url, init);
      h.posts.push(new URL(url));
      return onPost(String(url), init, h.posts.length);
    };
    return h;
  }
  const seqs = (h) => h.posts.map((u) => u.searchParams.get("seq")).join(",");

  test("a POST whose answer is lost is retried with the same seq and delivered once", async (t) => {
    if (!needs(t, { fallback: true })) return;
    const h = postHook(async (url, init, n) => {
      const res = await fetch(url, init);
      if (n === 1) throw new TypeError(`answer lost (the server said ${res.status})`);
      return res;
    });
    const { conn, r } = open(S.room("lost"), { transports: ["poll"], fetch: h.fetch });
    conn.send(JSON.stringify({ message: "a" }));
    conn.send(JSON.stringify({ message: "b" }));
    await r.until(() => r.messages.length === 2, "a and b");
    assert.deepEqual(r.messages, ["a", "b"]);
    assert.equal(seqs(h), "1,1,2");
  });

  test("429 and 503 are retried with the same seq", async (t) => {
    if (!needs(t, { fallback: true })) return;
    const h = postHook(async (url, init, n) =>
      n === 1 ? new Response("busy", { status: 503 }) : n === 2 ? new Response("slow down", { status: 429 }) : fetch(url, init),
    );
    const { conn, r } = open(S.room("busy"), { transports: ["stream"], fetch: h.fetch, backoffMin: 20 });
    conn.send(JSON.stringify({ message: "a" }));
    conn.send(JSON.stringify({ message: "b" }));
    await r.until(() => r.messages.length === 2, "a and b");
    assert.deepEqual(r.messages, ["a", "b"]);
    assert.equal(seqs(h), "1,1,1,2");
  });

  test("404 (session gone) opens a new session that sends the message again", async (t) => {
    if (!needs(t, { fallback: true })) return;
    const h = postHook(async (url, init, n) => {
      if (n === 1) {
        const u = new URL(url);
        u.searchParams.delete("seq");
        const del = await fetch(u, { method: "DELETE" });
        assert.equal(del.status, 204, "DELETE of the session");
      }
      return fetch(url, init);
    });
    const { conn, r } = open(S.room("gone"), { transports: ["poll"], fetch: h.fetch, backoffMin: 20 });
    conn.send(JSON.stringify({ message: "again" }));
    await r.until(() => r.messages.length === 1, "the message");
    assert.deepEqual(r.messages, ["again"]);
    assert.equal(r.states.filter((s) => s === "open:poll").length, 2, "a second session");
    assert.notEqual(h.posts[0].searchParams.get("session"), h.posts[1].searchParams.get("session"));
    assert.equal(seqs(h), "1,1");
  });

  test("409 (seq gap) opens a new session that sends the message again", async (t) => {
    if (!needs(t, { fallback: true })) return;
    const h = postHook(async (url, init, n) => {
      const u = new URL(url);
      if (n === 1) u.searchParams.set("seq", "3");
      return fetch(u, init);
    });
    const { conn, r } = open(S.room("gap"), { transports: ["stream"], fetch: h.fetch, backoffMin: 20 });
    conn.send(JSON.stringify({ message: "after the gap" }));
    await r.until(() => r.messages.length === 1, "the message");
    assert.deepEqual(r.messages, ["after the gap"]);
    assert.equal(r.states.filter((s) => s === "open:stream").length, 2, "a second session");
  });

  test("413: reported, not retried, and the next message reuses the seq", async (t) => {
    if (!needs(t, { fallback: true })) return;
    const h = postHook((url, init) => fetch(url, init));
    const { conn, r } = open(S.room("big"), { transports: ["poll"], fetch: h.fetch });
    conn.send(JSON.stringify({ message: "x".repeat(2 << 20) }));
    conn.send(JSON.stringify({ message: "small" }));
    await r.until(() => r.messages.length === 1, "the small message");
    assert.deepEqual(r.messages, ["small"]);
    assert.deepEqual(r.errors.map((e) => e.status), [413]);
    assert.equal(seqs(h), "1,1");
  });
});

describe("server restarted mid-chat (two processes on Redis)", () => {
  const redis = process.env.REDIS_URL;
  for (const transport of ["websocket", "stream", "poll"]) {
    test(`${transport}: reconnects to the restarted process and resumes, no gap`, async (t) => {
      if (!S.chatBinary()) return skip(t, NO_BIN);
      if (!redis) {
        if (S.required("REDIS")) assert.fail("REDIS_URL unset and TOWER_CHANNELS_REQUIRE_REDIS=1");
        return t.skip("no REDIS_URL");
      }
      if (transport === "websocket" && !NativeWebSocket) return skip(t, NO_WS);
      const port = await S.freePort();
      let a = await S.startChat(["--redis", redis], `127.0.0.1:${port}`);
      const b = await S.startChat(["--redis", redis]);
      t.after(async () => {
        await a.kill();
        await b.kill();
      });
      if (transport !== "websocket" && !(await S.hasHttpFallback(a.url))) return skip(t, NO_HTTP);
      const room = S.room("restart" + transport);
      const r = S.recorder();
      const conn = connect(`${a.url}/ws/chat/${room}`, { transports: [transport], backoffMin: 50, backoffMax: 500, ...r.callbacks });
      t.after(() => conn.close());
      await r.until(() => conn.state === "open", "open");
      await S.postToRoom(b.url, room, "before");
      await r.until(() => r.messages.length === 1, "before");
      await a.kill();
      await r.until(() => conn.state !== "open", "the drop");
      for (const m of ["missed 1", "missed 2", "missed 3"]) await S.postToRoom(b.url, room, m);
      a = await S.startChat(["--redis", redis], `127.0.0.1:${port}`);
      await r.until(() => r.messages.length === 4, "the missed messages");
      await S.postToRoom(b.url, room, "after");
      await r.until(() => r.messages.length === 5, "after");
      assert.deepEqual(r.messages, ["before", "missed 1", "missed 2", "missed 3", "after"]);
    });
  }
});
