"""Publishing turn events: the worker's direct PUBLISH reaches the channel layer's subscribers."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from channels.layers import get_channel_layer

from agents.runtime import events


def _receive_published(group: str, publish: Any) -> dict[str, Any]:
    """Subscribe a channel to ``group`` through the layer, run ``publish()`` on a thread (as a
    worker does), and return the message the subscriber received."""
    layer = get_channel_layer()

    async def scenario() -> dict[str, Any]:
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        try:
            await asyncio.to_thread(publish)
            return await asyncio.wait_for(layer.receive(channel), timeout=5)
        finally:
            await layer.group_discard(group, channel)

    return asyncio.run(scenario())


def test_a_delta_reaches_subscribers_after_its_snapshot_without_the_loop_thread(monkeypatch: Any) -> None:
    def no_loop_thread() -> None:
        raise AssertionError("the event loop thread was used")

    monkeypatch.setattr(events, "_loop_thread", no_loop_thread)
    group, turn_id = f"chat.test.{uuid.uuid4().hex[:8]}", 424242
    event = {"event": "token.delta", "turn_id": turn_id, "offset": 0, "text": "Hello"}
    assert events._direct_channel(get_channel_layer(), group) is not None
    try:
        received = _receive_published(
            group, lambda: events.publish(group, event, snapshot=("t_events", turn_id, "Hello")))
        assert received == {"type": events.EVENT_TYPE, "event": event}
        assert events.text_snapshot("t_events", turn_id) == "Hello"
        # A second delta appends to the snapshot.
        events.publish(group, {**event, "offset": 5, "text": " world"}, snapshot=("t_events", turn_id, " world"))
        assert events.text_snapshot("t_events", turn_id) == "Hello world"
    finally:
        events.redis_client().delete(events.snapshot_key("t_events", turn_id))


def test_a_layer_on_another_redis_is_published_to_through_its_own_group_send(settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:6379/15"  # no longer the layer's host
    group = f"chat.test.{uuid.uuid4().hex[:8]}"
    assert events._direct_channel(get_channel_layer(), group) is None
    turn_id = 434343
    event = {"event": "token.delta", "turn_id": turn_id, "offset": 0, "text": "Hi"}
    try:
        received = _receive_published(
            group, lambda: events.publish(group, event, snapshot=("t_events", turn_id, "Hi")))
        assert received == {"type": events.EVENT_TYPE, "event": event}
        assert events.text_snapshot("t_events", turn_id) == "Hi"
    finally:
        events.redis_client().delete(events.snapshot_key("t_events", turn_id))


@pytest.mark.parametrize("layer", [None, object()])
def test_no_pubsub_layer_means_no_direct_channel(layer: Any) -> None:
    assert events._direct_channel(layer, "chat.x.1") is None
