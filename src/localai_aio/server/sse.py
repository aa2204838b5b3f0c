"""Server-Sent Events exactly as the clients read them: ``data: {json}\\n\\n`` ... ``data: [DONE]`` for chat and
completions, named events (``event: <type>``) for the Responses and Messages APIs; and newline-delimited
JSON (``LineStream``) for Ollama's API."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from localai_aio.errors import APIError, failure
from localai_aio.server import keys

log = logging.getLogger(__name__)


async def write_or_drop(request: web.Request, response: web.StreamResponse, data: bytes,
                        patience: float | None) -> None:
    """Write ``data``; a client that takes none of it for ``patience`` seconds loses its connection."""
    try:
        await asyncio.wait_for(response.write(data), patience or None)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError(f"the client read nothing for {patience:g} s") from None


class EventStream:
    """An SSE response. A client that takes no data for ``write_timeout`` seconds is dropped: its
    buffered events are not worth a connection held open forever."""

    def __init__(self, request: web.Request, write_timeout: float | None = None):
        self.request = request
        self.write_timeout = write_timeout or None
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            "X-Request-ID": request.get(keys.REQUEST_ID, ""),
        })

    @property
    def started(self) -> bool:
        return self.response.prepared

    async def send(self, payload: Any, event: str | None = None) -> None:
        """One event; ``event`` names it (``event: <name>``), as the Responses and Messages APIs do."""
        if not self.response.prepared:
            await self.response.prepare(self.request)
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        named = f"event: {event}\n" if event else ""
        await write_or_drop(self.request, self.response, f"{named}data: {data}\n\n".encode(), self.write_timeout)

    async def close(self) -> web.StreamResponse:
        """End a stream whose protocol has no ``[DONE]`` marker (its last event says it is complete)."""
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write_eof()
        return self.response

    async def done(self) -> web.StreamResponse:
        await self.send("[DONE]")
        await self.response.write_eof()
        return self.response

    async def fail(self, body: dict[str, Any]) -> web.StreamResponse:
        """An error after the stream started: one ``data: {"error": ...}`` event, then the stream ends."""
        await self.send(body)
        await self.response.write_eof()
        return self.response


class LineStream(EventStream):
    """Newline-delimited JSON (``application/x-ndjson``): one object a line, as Ollama streams; the
    stream ends with its last object (``close``), an error with ``{"error": ...}`` (``fail``)."""

    def __init__(self, request: web.Request, write_timeout: float | None = None):
        super().__init__(request, write_timeout)
        self.response.headers["Content-Type"] = "application/x-ndjson"

    async def send(self, payload: Any, event: str | None = None) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        await write_or_drop(self.request, self.response, f"{data}\n".encode(), self.write_timeout)


def ending(stream: EventStream, exc: BaseException, what: str) -> APIError | None:
    """How a streamed answer that raised ``exc`` ends, for every streaming protocol alike.

    Re-raises what the stream cannot answer (cancellation; any failure before the stream started, which
    becomes a plain error response). None: the client left, so there is nothing more to send and nothing
    went wrong here. Otherwise the error to send as the stream's last event.
    """
    if isinstance(exc, (ConnectionResetError, asyncio.CancelledError)):
        log.info("client left during %s; generation stopped", what)
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        return None
    if not stream.started:
        raise exc
    return failure(exc, what, stream.request.get(keys.REQUEST_ID))
