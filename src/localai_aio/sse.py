"""Server-Sent Events exactly as OpenAI's clients read them: ``data: {json}\\n\\n`` ... ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from localai_aio import keys


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

    async def send(self, payload: Any) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        await write_or_drop(self.request, self.response, f"data: {data}\n\n".encode(), self.write_timeout)

    async def done(self) -> web.StreamResponse:
        await self.send("[DONE]")
        await self.response.write_eof()
        return self.response

    async def fail(self, body: dict[str, Any]) -> web.StreamResponse:
        """An error after the stream started: one ``data: {"error": ...}`` event, then the stream ends."""
        await self.send(body)
        await self.response.write_eof()
        return self.response
