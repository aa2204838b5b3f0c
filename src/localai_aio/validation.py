"""Turn marshmallow validation errors into one clear OpenAI-style 400 naming the field."""

from __future__ import annotations

from typing import Any, NoReturn

from marshmallow import ValidationError

from localai_aio.errors import InvalidRequest

_LOCATIONS = {"json", "form", "query", "querystring", "match_info", "files", "headers"}


def first_error(messages: Any, path: tuple[str, ...] = (), *, top: bool = True) -> tuple[str, str]:
    """The dotted path and message of the first error in marshmallow's nested messages. Only the outermost
    key can be webargs' location: a body field may be called ``query`` (rerank's is)."""
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        key = str(key)
        if top and key in _LOCATIONS:
            return first_error(value, path, top=False)
        return first_error(value, path if key == "_schema" else (*path, key), top=False)
    if isinstance(messages, list) and messages:
        return first_error(messages[0], path, top=top)
    return ".".join(path), str(messages)


def raise_validation_error(error: ValidationError, *_: Any, **__: Any) -> NoReturn:
    param, message = first_error(error.messages)
    message = message.rstrip(".")
    if message == "Unknown field":
        message = "unknown field"
    raise InvalidRequest(f"Invalid value for '{param}': {message}" if param else message, param=param or None)
