#!/usr/bin/env python3
"""Fan-out through channels_redis between Django and tower-channels.

Starts the Django tutorial chat app (tests/django, daphne, channels_redis'
core layer) and the crate's chat example with `--django` on the same Redis
and key prefix, then for each scenario connects SUBS WebSocket clients
(Python `websockets`, split over --procs processes) to one room, sends a burst of MSGS `chat.message`
events and counts what arrives:

* django -> django: clients on daphne, burst from plain Python
  (`channel_layer.group_send`, as a view or Celery task does);
* django -> rust: clients on the Rust chat example, same publisher;
* rust -> django: clients on daphne, burst from a WebSocket client of the
  Rust chat example (its consumer calls `group_send`);
* rust -> rust, one process: clients and publisher on the Rust chat example
  (delivered in-process, no Redis): what these Python clients can read at
  most on this machine, so the figures above are read against it.

Deliveries/s is what arrived divided by the time from the first send to the
last arrival; lost is what had not arrived when nothing more came for
--idle seconds. The publisher's burst time and how long after its last send
the last delivery came show which side is the bottleneck: a Django
publisher's `group_send` costs O(members) (it reads the group and writes the
member list into each message), so the receiving side can only be as fast as
the burst; a short tail means the receiver kept up. Prints a markdown table and one JSON line per scenario.

    cargo build --release --features django --example chat
    python3 bench/django/fanout.py [--redis redis://127.0.0.1:6379] [--subs 1000] [--msgs 20]

`--smoke` runs 20 clients and 5 messages and exits non-zero on any loss.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "django"
ROOM = "bench"
GROUP = f"chat_{ROOM}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def django_env(args, prefix):
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="mysite.settings",
        CHANNELS_BACKEND="core",
        CHANNELS_HOSTS=args.redis,
        CHANNELS_PREFIX=prefix,
        PYTHONPATH=str(APP),
    )
    return env


async def wait_port(port, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not start on port {port}")
            await asyncio.sleep(0.05)


async def start_daphne(args, prefix):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port),
         "mysite.asgi:application"],
        cwd=APP, env=django_env(args, prefix), stdin=subprocess.DEVNULL,
    )
    await wait_port(port, "daphne")
    return proc, f"ws://127.0.0.1:{port}/ws/chat/{ROOM}/"


async def start_rust(args, prefix):
    proc = subprocess.Popen(
        [args.chat_bin, "--addr", "127.0.0.1:0", "--django", args.redis, "--prefix", prefix],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"},
    )
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    addr = line.decode().strip().removeprefix("listening on ")
    return proc, f"ws://{addr}/ws/chat/{ROOM}"


class Tally:
    def __init__(self, subs, msgs):
        self.msgs = msgs
        self.seen = [set() for _ in range(subs)]
        self.total = 0
        self.bad = 0
        self.last = 0.0
        self.progress = asyncio.Event()


async def reader(ws, i, tally):
    import websockets

    try:
        async for text in ws:
            now = time.time()
            try:
                seq = int(json.loads(text)["message"].split()[1])
            except (ValueError, KeyError, IndexError):
                tally.bad += 1
                continue
            if seq in tally.seen[i] or not 0 <= seq < tally.msgs:
                tally.bad += 1
                continue
            tally.seen[i].add(seq)
            tally.total += 1
            tally.last = now
            tally.progress.set()
    except websockets.ConnectionClosed:
        pass


async def connect_all(url, n):
    import websockets

    clients = []
    # channels_redis takes a pooled Redis connection per joining consumer;
    # redis-py 8 caps the pool, so join a few at a time.
    sem = asyncio.Semaphore(10)

    async def one():
        async with sem:
            return await websockets.connect(url, max_queue=None, ping_interval=None,
                                            open_timeout=60)

    clients = await asyncio.gather(*(one() for _ in range(n)))
    return clients


async def publish_django(args, prefix):
    """Runs this script's --publish mode in its own process (Django set up
    before the clock starts); returns the wall-clock time of the first send."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--publish", str(args.msgs), cwd=APP,
        env=django_env(args, prefix), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert (await proc.stdout.readline()).strip() == b"ready"
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    start = float((await proc.stdout.readline()).split()[1])
    end = float((await proc.stdout.readline()).split()[1])
    await proc.wait()
    return start, end


async def publish_rust(url, msgs):
    import websockets

    async with websockets.connect(url, ping_interval=None) as ws:
        start = time.time()
        for n in range(msgs):
            await ws.send(json.dumps({"message": f"d {n}"}))
        end = time.time()
        # Our own copies confirm the server handled every send.
        got = 0
        while got < msgs:
            await ws.recv()
            got += 1
    return start, end


async def count(sub_url, n, msgs, idle, go):
    """Connects n clients, awaits `go()`, then counts until every message
    arrived or nothing came for `idle` seconds."""
    clients = await connect_all(sub_url, n)
    tally = Tally(n, msgs)
    readers = [asyncio.create_task(reader(ws, i, tally)) for i, ws in enumerate(clients)]
    start = await go()
    while tally.total < n * msgs:
        tally.progress.clear()
        try:
            await asyncio.wait_for(tally.progress.wait(), idle)
        except asyncio.TimeoutError:
            break
    for ws in clients:
        await ws.close()
    for r in readers:
        r.cancel()
    return start, tally


def worker_main(url, n, msgs, idle):
    """--worker: one share of the subscribers in its own process (one Python
    process reads ~5-10k messages/s, less than the Rust side delivers)."""

    async def go():
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        return 0.0

    async def run():
        _, tally = await count(url, n, msgs, idle, go)
        print(json.dumps({"delivered": tally.total, "bad": tally.bad, "last": tally.last}), flush=True)

    asyncio.run(run())


async def scenario(name, sub_url, publish, args):
    expected = args.subs * args.msgs
    shares = [args.subs // args.procs + (i < args.subs % args.procs) for i in range(args.procs)]
    workers = []
    for share in shares:
        w = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--worker", sub_url, str(share), str(args.msgs), str(args.idle),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        workers.append(w)
    for w in workers:
        line = await w.stdout.readline()
        if line.strip() != b"ready":
            raise SystemExit(f"a client process failed to connect: {line!r}")
    for w in workers:
        w.stdin.write(b"go\n")
        await w.stdin.drain()
    start, end = await publish()
    delivered = bad = 0
    last = 0.0
    for w in workers:
        r = json.loads(await w.stdout.readline())
        delivered += r["delivered"]
        bad += r["bad"]
        last = max(last, r["last"])
        await w.wait()
    elapsed = max(last - start, 1e-9)
    result = {
        "scenario": name, "subs": args.subs, "msgs": args.msgs, "client_procs": args.procs,
        "expected": expected, "delivered": delivered, "lost": expected - delivered, "bad": bad,
        "seconds": round(elapsed, 3), "deliveries_per_s": round(delivered / elapsed, 1),
        "publisher_s": round(end - start, 3), "tail_ms": round(1000 * (last - end), 1),
    }
    print(json.dumps(result), flush=True)
    return result


async def bench(args):
    prefix = f"bench-django-{os.getpid()}-{int(time.time())}."
    daphne, django_url = await start_daphne(args, prefix)
    rust, rust_url = await start_rust(args, prefix)
    try:
        results = [
            await scenario("django -> django", django_url, lambda: publish_django(args, prefix), args),
            await scenario("django -> rust", rust_url, lambda: publish_django(args, prefix), args),
            await scenario("rust -> django", django_url, lambda: publish_rust(rust_url, args.msgs), args),
            # No Redis on the way: the ceiling of these Python clients.
            await scenario("rust -> rust, one process (client ceiling)", rust_url,
                           lambda: publish_rust(rust_url, args.msgs), args),
        ]
    finally:
        for p in (daphne, rust):
            p.terminate()
            p.wait()
    base = results[0]["deliveries_per_s"] or 1e-9
    print()
    print("| scenario | subscribers × messages | delivered | lost | deliveries/s | vs django -> django "
          "| publisher burst s | last delivery after burst ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        lost = f'{r["lost"]} ({100 * r["lost"] / r["expected"]:.1f}%)'
        print(f'| {r["scenario"]} | {r["subs"]} × {r["msgs"]} | {r["delivered"]} | {lost} '
              f'| {r["deliveries_per_s"]:,.0f} | {r["deliveries_per_s"] / base:.1f}x '
              f'| {r["publisher_s"]:.2f} | {r["tail_ms"]:,.0f} |')
    if args.smoke and any(r["lost"] or r["bad"] for r in results):
        raise SystemExit("smoke run lost or corrupted messages")


def publish_main(msgs):
    """--publish: a burst of group_send calls from plain Python."""
    sys.path.insert(0, str(APP))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    import django

    django.setup()
    from channels.layers import get_channel_layer

    layer = get_channel_layer()

    async def burst():
        start = time.time()
        print("start", start, flush=True)
        for n in range(msgs):
            await layer.group_send(GROUP, {"type": "chat.message", "message": f"d {n}"})
        print("end", time.time(), flush=True)

    print("ready", flush=True)
    sys.stdin.readline()
    asyncio.run(burst())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--chat-bin", default=str(ROOT / "target" / "release" / "examples" / "chat"))
    p.add_argument("--subs", type=int, default=1000)
    p.add_argument("--msgs", type=int, default=20)
    p.add_argument("--idle", type=float, default=10.0, help="seconds without progress before counting the rest lost")
    p.add_argument("--procs", type=int, default=4, help="client processes the subscribers are split over")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--publish", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.publish is not None:
        return publish_main(args.publish)
    if args.worker is not None:
        url, n, msgs, idle = args.worker
        return worker_main(url, int(n), int(msgs), float(idle))
    if args.smoke:
        args.subs, args.msgs, args.procs = 20, 5, 2
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
