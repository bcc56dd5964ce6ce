// Helpers for the client's tests: the real chat example (examples/chat) on
// 127.0.0.1, a free port, and waits that end on an event or fail after a
// bounded time (no sleeps).
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

/** How long one wait may take. */
export const TIMEOUT = 10000;

const ROOT = fileURLToPath(new URL("../../../", import.meta.url));

/** The chat example binary: $TOWER_CHANNELS_CHAT_BIN, else target/debug/examples/chat. */
export function chatBinary() {
  const bin = process.env.TOWER_CHANNELS_CHAT_BIN || ROOT + "target/debug/examples/chat";
  return existsSync(bin) ? bin : null;
}

/** Whether a test needing `what` must fail instead of skipping. */
export const required = (what) => process.env["TOWER_CHANNELS_REQUIRE_" + what] === "1";

/** A port nothing listens on now (bound on 127.0.0.1:0, then closed). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** A TCP listener that accepts and never answers (a "silent" server). */
export async function silentServer() {
  const sockets = new Set();
  const s = createServer((sock) => {
    sockets.add(sock);
    sock.on("error", () => {});
  });
  await new Promise((resolve) => s.listen(0, "127.0.0.1", resolve));
  return {
    port: s.address().port,
    close() {
      for (const sock of sockets) sock.destroy();
      s.close();
    },
  };
}

/**
 * Starts the chat example with `args` (`--addr 127.0.0.1:0` unless `addr`
 * is given) and waits for its "listening on" line.
 */
export function startChat(args = [], addr = "127.0.0.1:0") {
  const bin = chatBinary();
  if (!bin) throw new Error("no chat example binary: set TOWER_CHANNELS_CHAT_BIN or `cargo build --example chat`");
  const child = spawn(bin, ["--addr", addr, ...args], {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const exited = new Promise((resolve) => child.on("exit", resolve));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`chat example not listening after ${TIMEOUT} ms`));
    }, TIMEOUT);
    let out = "";
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk) => {
      if (out === null) return; // drained
      out += chunk;
      const m = /listening on (\S+)/.exec(out);
      if (m) {
        out = null;
        clearTimeout(timer);
        resolve({
          addr: m[1],
          url: `http://${m[1]}`,
          async kill() {
            child.kill("SIGKILL");
            await exited;
          },
        });
      }
    });
    child.on("exit", (code) => reject(new Error(`chat example exited (${code}) before listening`)));
  });
}

/**
 * Records what a connection tells the app: `messages` (the chat `message`
 * field of each message frame, others in `other`), `states` (`state:transport`).
 * `until(pred, what)` resolves once `pred()` holds, checked after every
 * callback, and rejects after TIMEOUT.
 */
export function recorder() {
  const r = {
    messages: [],
    other: [],
    states: [],
    changes: [],
    errors: [],
    waiters: [],
    onmessage(data) {
      const v = typeof data === "string" ? JSON.parse(data) : data;
      if (v && v.type === undefined && typeof v.message === "string") r.messages.push(v.message);
      else r.other.push(v);
      r.check();
    },
    onstate(s) {
      r.states.push(`${s.state}:${s.transport}`);
      r.changes.push(s);
      r.last = s;
      r.check();
    },
    onerror(e) {
      r.errors.push(e);
      r.check();
    },
    check() {
      r.waiters = r.waiters.filter((w) => {
        if (!w.pred()) return true;
        clearTimeout(w.timer);
        w.resolve();
        return false;
      });
    },
    until(pred, what) {
      if (pred()) return Promise.resolve();
      return new Promise((resolve, reject) => {
        const w = { pred, resolve };
        w.timer = setTimeout(() => {
          r.waiters = r.waiters.filter((x) => x !== w);
          reject(new Error(`timed out waiting for ${what}; states ${r.states.join(" ")}; messages ${JSON.stringify(r.messages)}`));
        }, TIMEOUT);
        r.waiters.push(w);
      });
    },
  };
  r.callbacks = { onmessage: r.onmessage, onstate: r.onstate, onerror: r.onerror };
  return r;
}

/** Sends `text` to `room` through the chat example's `POST /rooms/{room}/messages`. */
export async function postToRoom(base, room, text) {
  const res = await fetch(`${base}/rooms/${encodeURIComponent(room)}/messages`, { method: "POST", body: text });
  if (!res.ok) throw new Error(`POST to the room: ${res.status} ${await res.text()}`);
}

/** Whether the server answers the HTTP fallback (a long-poll open). */
export async function hasHttpFallback(base) {
  try {
    const res = await fetch(`${base}/ws/chat/probe?transport=poll`);
    const ok = res.ok && /json/.test(res.headers.get("content-type") || "");
    const frames = ok ? await res.json() : null;
    if (Array.isArray(frames) && frames[0] && frames[0].type === "open") {
      await fetch(`${base}/ws/chat/probe?session=${encodeURIComponent(frames[0].session)}&token=${encodeURIComponent(frames[0].token)}`, { method: "DELETE" });
      return true;
    }
    await res.body?.cancel();
  } catch {
    // not answering
  }
  return false;
}

/** A unique room name per test. */
let rooms = 0;
export const room = (name) => `${name}${process.pid}x${++rooms}`;
