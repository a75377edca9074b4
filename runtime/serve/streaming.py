"""Server-sent events, client disconnects and merging several engine streams into one.

A client that goes away must abort its engine requests. ``watch_disconnect`` cancels the handling
task when the ASGI server reports ``http.disconnect``; cancellation runs the generators' ``finally``
blocks, and ``AsyncEngine.generate`` aborts a request whose generator closes early.
``SSEResponse`` also closes its generator explicitly, whichever way the response ends.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class ClientDisconnected(Exception):
    pass


@contextlib.asynccontextmanager
async def watch_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Cancels the body of the ``async with`` when the client disconnects; raises ClientDisconnected then."""
    task = asyncio.current_task()
    state = {"active": True, "disconnected": False}

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if state["active"]:
                    state["disconnected"] = True
                    task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not state["disconnected"]:
            raise
        task.uncancel()
        raise ClientDisconnected() from None
    finally:
        state["active"] = False
        watcher.cancel()


class SSEResponse(Response):
    """Streams ``data: ...`` events from an async generator of bytes; a disconnect closes the generator."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with watch_disconnect(receive):
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientDisconnected, OSError):
            pass  # the client left; closing the generator below aborts its requests
        finally:
            await self.events.aclose()


_END = object()


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as (stream index, item) in arrival order; closing stops them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((index, item))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TextDeltas:
    """Per-choice streaming state: what has been sent, holding back text a stop string may still remove."""

    def __init__(self, stop: list[str]) -> None:
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.sent_chars: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    def text(self, index: int, text: str, finished: bool) -> str:
        start = self.sent_chars.get(index, 0)
        end = len(text) if finished else max(start, len(text) - self.holdback)
        self.sent_chars[index] = end
        return text[start:end]

    def tokens(self, index: int, count: int) -> tuple[int, int]:
        """(first, end) of the tokens not sent yet."""
        start = self.sent_tokens.get(index, 0)
        self.sent_tokens[index] = count
        return start, count
