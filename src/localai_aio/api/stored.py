"""Calls into the store for the routes that keep objects (assistants, files, stored responses): off the
event loop, as the request's principal, a missing object a 404 naming it; and OpenAI's list pages."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from localai_aio.api.common import storage_call
from localai_aio.errors import InvalidRequest, NotFound
from localai_aio.server import keys
from localai_aio.store.base import Page, StoreNotFound


async def store_call(app: web.Application, method: str, *args: Any, **kwargs: Any) -> Any:
    """Run a store method off the event loop (``storage_call``); a missing object is a 404 naming it."""
    try:
        return await storage_call(app, getattr(app[keys.STORE], method), *args, **kwargs)
    except StoreNotFound as exc:
        raise NotFound(str(exc), param=f"{exc.kind}_id" if exc.kind != "file" else "file_id") from None


async def call_store(request: web.Request, method: str, *args: Any, **kwargs: Any) -> Any:
    """``store_call`` as the request's principal: what it creates is recorded as its own, and it reads and
    changes only what it may see (another key's objects are 404s, as if they did not exist)."""
    return await store_call(request.app, method, *args, who=request[keys.PRINCIPAL], **kwargs)


def list_params(request: web.Request, *, default_limit: int = 20, max_limit: int = 100) -> dict[str, Any]:
    """OpenAI's list parameters (``limit``, ``order``, ``after``, ``before``) from the query string."""
    query = request.query
    try:
        limit = int(query.get("limit", str(default_limit)))
    except ValueError:
        raise InvalidRequest("Invalid value for 'limit': must be an integer", param="limit") from None
    if not 1 <= limit <= max_limit:
        raise InvalidRequest(f"Invalid value for 'limit': must be between 1 and {max_limit}", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("Invalid value for 'order': must be 'asc' or 'desc'", param="order")
    return {"limit": limit, "order": order, "after": query.get("after"), "before": query.get("before")}


def list_body(page: Page) -> dict[str, Any]:
    return {"object": "list", "data": page.data, "first_id": page.data[0]["id"] if page.data else None,
            "last_id": page.data[-1]["id"] if page.data else None, "has_more": page.has_more}
