"""One websocket to ComfyUI for the worker's lifetime, reconnected with backoff.

The server sends a prompt's events only to the socket whose `clientId` equals the prompt's
`client_id`, so the id stays the same across reconnects. Text frames are JSON events
`{"type", "data"}`, handed to `on_event`; binary frames (previews, whose header layout depends on
feature flags) are skipped. `epoch` counts connections: a waiter that saw a lower epoch may have
missed events and checks the prompt's history instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from sdworker._structlog import structlog
from sdworker_comfyui.client import ComfyClient
from sdworker_comfyui.settings import ComfyUISettings

__all__ = ["EventHandler", "EventStream"]

EventHandler = Callable[[str, dict[str, Any]], None]
"""Called with each event's `type` and `data`."""

log = structlog.get_logger("sdworker.comfyui")


class EventStream:
    """Keeps a websocket open to `client`'s server and hands every event to `on_event`."""

    def __init__(
        self,
        client: ComfyClient,
        client_id: str,
        options: ComfyUISettings,
        on_event: EventHandler,
    ) -> None:
        self.url = _ws_url(client.url, client_id)
        self.client = client
        self.options = options
        self.on_event = on_event
        self.connected = False
        self.epoch = 0
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()

    async def start(self, wait_s: float) -> None:
        """Start listening; return once connected, or after `wait_s` (history covers the gap)."""
        self._task = asyncio.create_task(self._listen(), name="comfyui-websocket")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first.wait(), wait_s)

    async def close(self) -> None:
        """Stop listening; safe to call twice."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.connected = False

    async def _listen(self) -> None:
        """Connect, read until the socket ends, wait, connect again: forever."""
        delay = self.options.reconnect_min
        while True:
            try:
                await self._session()
                delay = self.options.reconnect_min
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                log.warning(
                    "ComfyUI websocket unavailable; completion is checked through history",
                    error=f"{type(error).__name__}: {error}",
                    retry_in_s=delay,
                )
            self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.options.reconnect_max)

    async def _session(self) -> None:
        """One connection: read its frames until it closes."""
        async with self.client.session.ws_connect(
            self.url, heartbeat=self.options.heartbeat, timeout=_ws_timeout(self.options)
        ) as socket:
            self.connected = True
            self.epoch += 1
            self._first.set()
            log.info("ComfyUI websocket connected", url=self.url, epoch=self.epoch)
            async for frame in socket:
                if frame.type == aiohttp.WSMsgType.TEXT:
                    self._dispatch(frame.data)
        log.warning("ComfyUI websocket closed; reconnecting", url=self.url)

    def _dispatch(self, text: str) -> None:
        """Hand one JSON event to `on_event`; anything else is logged and dropped."""
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            log.warning("ComfyUI sent a text frame that is not JSON", frame=text[:200])
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return
        data = event.get("data")
        try:
            self.on_event(event["type"], data if isinstance(data, dict) else {})
        except Exception:  # one bad event must not end the listener
            log.exception("handling a ComfyUI event failed", event=event["type"])


def _ws_url(http_url: str, client_id: str) -> str:
    """`ws(s)://host:port/ws?clientId=...` for a server at `http_url`."""
    scheme, rest = http_url.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={client_id}"


def _ws_timeout(options: ComfyUISettings) -> aiohttp.ClientWSTimeout:
    """Connecting may take a request's time; reading has no limit (heartbeats find dead peers)."""
    return aiohttp.ClientWSTimeout(ws_receive=None, ws_close=options.request_timeout)
