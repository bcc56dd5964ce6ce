import json

from channels.generic.websocket import AsyncWebsocketConsumer


class ChatConsumer(AsyncWebsocketConsumer):
    """The Django Channels tutorial's chat consumer (part 3, asynchronous)."""

    async def connect(self):
        self.room_name = self.scope["url_route"]["kwargs"]["room_name"]
        self.room_group_name = f"chat_{self.room_name}"

        # Join room group
        await self.channel_layer.group_add(self.room_group_name, self.channel_name)

        await self.accept()

    async def disconnect(self, close_code):
        # Leave room group
        await self.channel_layer.group_discard(self.room_group_name, self.channel_name)

    # Receive message from WebSocket
    async def receive(self, text_data):
        text_data_json = json.loads(text_data)
        message = text_data_json["message"]

        # Send message to room group
        await self.channel_layer.group_send(
            self.room_group_name, {"type": "chat.message", "message": message}
        )

    # Receive message from room group
    async def chat_message(self, event):
        message = event["message"]

        # Send message to WebSocket
        await self.send(text_data=json.dumps({"message": message}))


class InboxConsumer(AsyncWebsocketConsumer):
    """Not in the tutorial: tells the client its channel name, then forwards
    every `chat.message` sent to that channel, with the whole event, so a
    test can send to a Django consumer directly and check the dict."""

    async def connect(self):
        await self.accept()
        await self.send(text_data=json.dumps({"channel_name": self.channel_name}))

    async def chat_message(self, event):
        await self.send(text_data=json.dumps({"event": event}, sort_keys=True))
