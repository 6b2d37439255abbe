"""ASGI entry point: HTTP through Django, WebSockets through Channels (served by daphne)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from config.telemetry import telemetry_setup  # noqa: E402

# Before Django builds its middleware chain: the instrumentation adds its own (off by default).
telemetry_setup(service="portal-web")
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from config.routing import websocket_urlpatterns  # noqa: E402
from knowledge.embeddings import embedder_warm  # noqa: E402

# The first search of this process should not wait for the model to load.
embedder_warm()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # The session cookie gives the user. The consumer checks the Origin against the tenant's
        # own origins (channels' AllowedHostsOriginValidator would let any *.BASE_DOMAIN page in)
        # and the tenant membership itself.
        "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
    }
)
