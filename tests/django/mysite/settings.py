"""Settings of the Django Channels tutorial chat app that tests/django.rs runs.

The channel layer comes from the environment, so one test can run
channels_redis' core layer and another its pubsub layer:

* CHANNELS_BACKEND: "core" (channels_redis.core.RedisChannelLayer, default)
  or "pubsub" (channels_redis.pubsub.RedisPubSubChannelLayer);
* CHANNELS_HOSTS: comma-separated Redis URLs (default redis://127.0.0.1:6379);
* CHANNELS_PREFIX: the key prefix (default "asgi");
* CHANNELS_CAPACITY, CHANNELS_GROUP_EXPIRY: optional core-layer settings;
* CHANNELS_SYMMETRIC_KEY: optional, one symmetric_encryption_keys entry.
"""

import os

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["channels", "chat"]
ROOT_URLCONF = "mysite.urls"
ASGI_APPLICATION = "mysite.asgi.application"
DATABASES = {}
USE_TZ = True

_backend = os.environ.get("CHANNELS_BACKEND", "core")
_config = {
    "hosts": os.environ.get("CHANNELS_HOSTS", "redis://127.0.0.1:6379").split(","),
    "prefix": os.environ.get("CHANNELS_PREFIX", "asgi"),
}
if os.environ.get("CHANNELS_SYMMETRIC_KEY"):
    _config["symmetric_encryption_keys"] = [os.environ["CHANNELS_SYMMETRIC_KEY"]]
if _backend == "core":
    for _env, _key in (("CHANNELS_CAPACITY", "capacity"), ("CHANNELS_GROUP_EXPIRY", "group_expiry")):
        if os.environ.get(_env):
            _config[_key] = int(os.environ[_env])

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": {
            "core": "channels_redis.core.RedisChannelLayer",
            "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
        }[_backend],
        "CONFIG": _config,
    }
}
