#!/usr/bin/env python3
"""Interop check of the chat example with a client we did not write.

Usage: python3 tests/interop/chat_client.py HOST:PORT

Uses the `websockets` package (pip install websockets). Exits 0 and prints
"interop ok" when every check passes; otherwise prints what failed and exits 1.
"""

import asyncio
import json
import sys

try:  # websockets >= 13
    from websockets.asyncio.client import connect
except ImportError:  # websockets 12
    from websockets.client import connect  # type: ignore[no-redef]

from websockets.exceptions import ConnectionClosed

TIMEOUT = 10


async def recv(ws, what):
    try:
        return await asyncio.wait_for(ws.recv(), TIMEOUT)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


async def chat(base):
    room = f"{base}/ws/chat/interop"
    async with connect(room) as alice, connect(room) as bob:
        await alice.send(json.dumps({"message": "hello from python"}))
        got_alice = json.loads(await recv(alice, "alice's own message"))
        got_bob = json.loads(await recv(bob, "alice's message at bob"))
        check(got_alice["message"] == "hello from python", f"sender got {got_alice!r}")
        check(got_bob == got_alice, f"member got {got_bob!r}, sender {got_alice!r}")
        # Rooms keep a history: every message carries its position.
        check(isinstance(got_alice.get("offset"), int), f"no offset in {got_alice!r}")
        check(isinstance(got_alice.get("epoch"), str), f"no epoch in {got_alice!r}")

        await bob.send(json.dumps({"message": "ünïcödé ✓"}))
        for who, ws in (("alice", alice), ("bob", bob)):
            got = json.loads(await recv(ws, f"bob's message at {who}"))
            check(got["message"] == "ünïcödé ✓", f"{who} got {got!r}")
            check(got["offset"] == got_alice["offset"] + 1, f"{who}: offsets grow by one: {got!r}")
    print("chat ok")


async def echo(base):
    async with connect(f"{base}/ws/echo") as ws:
        await ws.send("text echo")
        got = await recv(ws, "the text echo")
        check(got == "text echo", f"text echo got {got!r}")
        await ws.send(b"\x00\x01binary\xff")
        got = await recv(ws, "the binary echo")
        check(got == b"\x00\x01binary\xff", f"binary echo got {got!r}")
        pong = await ws.ping(b"interop")
        await asyncio.wait_for(pong, TIMEOUT)
    print("echo ok")


async def bad_json(base):
    async with connect(f"{base}/ws/chat/interop") as ws:
        await ws.send("this is not json")
        try:
            got = await recv(ws, "the close after bad JSON")
        except ConnectionClosed:
            pass
        else:
            raise AssertionError(f"expected a close after bad JSON, got message {got!r}")
        check(ws.close_code == 1007, f"bad JSON closed with {ws.close_code}, expected 1007")
        check(
            (ws.close_reason or "").startswith("invalid JSON"),
            f"close reason {ws.close_reason!r} should start with 'invalid JSON'",
        )
    print("bad json ok")


def extensions(ws):
    headers = ws.response.headers if hasattr(ws, "response") else ws.response_headers
    return headers.get("Sec-WebSocket-Extensions", "")


async def compression(base):
    """permessage-deflate (websockets offers it by default): negotiated, and
    messages below and above the server's 256-byte threshold go both ways."""
    big_text = json.dumps({"message": "compressible " * 400})  # ~5 KB
    big_binary = bytes(range(256)) * 32  # 8 KiB
    async with connect(f"{base}/ws/echo") as ws:
        ext = extensions(ws)
        check("permessage-deflate" in ext, f"no permessage-deflate in {ext!r}")
        for payload in ("tiny", big_text, b"\x01\x02", big_binary):
            await ws.send(payload)
            got = await recv(ws, f"the echo of {len(payload)} bytes")
            check(got == payload, f"echo of {len(payload)} bytes differs")
    room = f"{base}/ws/chat/deflate"
    async with connect(room) as alice, connect(room) as bob:
        for text in ("short", "long " * 300):
            await alice.send(json.dumps({"message": text}))
            for who, ws in (("alice", alice), ("bob", bob)):
                got = await recv(ws, f"a {len(text)}-char group message at {who}")
                check(json.loads(got).get("message") == text, f"{who} got a different {len(text)}-char message")
    print("compression ok")


async def main(addr):
    base = f"ws://{addr}"
    await chat(base)
    await echo(base)
    await bad_json(base)
    await compression(base)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        asyncio.run(main(sys.argv[1]))
    except AssertionError as e:
        print(f"interop FAILED: {e}")
        sys.exit(1)
    print("interop ok")
