"""The Django app's channel layer from plain Python, as a view or a Celery
task uses it (`async_to_sync(get_channel_layer().group_send)(...)`).

    python3 layer.py group_send GROUP[,GROUP...] MESSAGE [COUNT]
    python3 layer.py send CHANNEL MESSAGE        # prints "ok" or "ChannelFull"
    python3 layer.py receive CHANNEL COUNT       # prints each event as JSON

Events are the tutorial's {"type": "chat.message", "message": MESSAGE}
(MESSAGE gets " <n>" appended when COUNT > 1). Settings come from
mysite.settings (CHANNELS_* environment variables).
"""

import json
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

import django  # noqa: E402

django.setup()

from asgiref.sync import async_to_sync  # noqa: E402
from channels.exceptions import ChannelFull  # noqa: E402
from channels.layers import get_channel_layer  # noqa: E402


def event(message):
    return {"type": "chat.message", "message": message}


async def receive(layer, channel, count):
    for _ in range(count):
        print(json.dumps(await layer.receive(channel), sort_keys=True), flush=True)


def main():
    layer = get_channel_layer()
    command = sys.argv[1]
    if command == "group_send":
        groups, message = sys.argv[2].split(","), sys.argv[3]
        count = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        for n in range(count):
            text = message if count == 1 else f"{message} {n}"
            for group in groups:
                async_to_sync(layer.group_send)(group, event(text))
        print("sent", count * len(groups), flush=True)
    elif command == "send":
        try:
            async_to_sync(layer.send)(sys.argv[2], event(sys.argv[3]))
            print("ok", flush=True)
        except ChannelFull:
            print("ChannelFull", flush=True)
    elif command == "receive":
        async_to_sync(receive)(layer, sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
