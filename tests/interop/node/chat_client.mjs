// Interop check of the chat example with Node's `ws` client and
// permessage-deflate (perMessageDeflate: true).
//
// Usage: node tests/interop/node/chat_client.mjs HOST:PORT
// Prints "interop ok" and exits 0 when every check passes.

import WebSocket from "ws";

const TIMEOUT = 10_000;
const base = `ws://${process.argv[2]}`;

function open(url) {
  return new Promise((resolve, reject) => {
    // Compress everything we send, so the server inflates small frames too.
    const ws = new WebSocket(url, { perMessageDeflate: { threshold: 0 } });
    const timer = setTimeout(() => reject(new Error(`timed out opening ${url}`)), TIMEOUT);
    ws.once("open", () => {
      clearTimeout(timer);
      resolve(ws);
    });
    ws.once("error", reject);
  });
}

function next(ws, what) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), TIMEOUT);
    ws.once("message", (data, isBinary) => {
      clearTimeout(timer);
      resolve({ data, isBinary });
    });
  });
}

function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

async function echo() {
  const ws = await open(`${base}/ws/echo`);
  check(
    ws.extensions.includes("permessage-deflate"),
    `permessage-deflate not negotiated: ${JSON.stringify(ws.extensions)}`,
  );
  const bigText = JSON.stringify({ message: "compressible ".repeat(400) });
  const bigBinary = Buffer.alloc(8192, 7);
  for (const [payload, binary] of [
    ["tiny", false],
    [bigText, false],
    [Buffer.from([1, 2]), true],
    [bigBinary, true],
  ]) {
    ws.send(payload, { binary });
    const { data, isBinary } = await next(ws, `the echo of ${payload.length} bytes`);
    check(isBinary === binary, `echo of ${payload.length} bytes changed type`);
    check(Buffer.compare(Buffer.from(data), Buffer.from(payload)) === 0, `echo of ${payload.length} bytes differs`);
  }
  ws.close(1000);
  console.log("echo ok");
}

async function chat() {
  const room = `${base}/ws/chat/node`;
  const alice = await open(room);
  const bob = await open(room);
  for (const text of ["short", "long ".repeat(300)]) {
    const expected = JSON.stringify({ message: text });
    const got = [next(alice, "alice's copy"), next(bob, "bob's copy")];
    alice.send(expected);
    for (const { data } of await Promise.all(got)) {
      check(JSON.parse(data.toString()).message === text, `a ${text.length}-char group message differs`);
    }
  }
  alice.close(1000);
  bob.close(1000);
  console.log("chat ok");
}

try {
  await echo();
  await chat();
  console.log("interop ok");
  process.exit(0);
} catch (e) {
  console.log(`interop FAILED: ${e.message}`);
  process.exit(1);
}
