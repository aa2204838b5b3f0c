"""Turn marshmallow validation errors into one clear OpenAI-style 400 naming the field."""

from __future__ import annotations

from typing import Any, NoReturn

from marshmallow import ValidationError

from localai_aio.errors import InvalidRequest


def first_error(messages: Any, path: tuple[str, ...] = ()) -> tuple[str, str]:
    """The dotted path and message of the first error in marshmallow's nested messages."""
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        key = str(key)
        return first_error(value, path if key == "_schema" else (*path, key))
    if isinstance(messages, list) and messages:
        return first_error(messages[0], path)
    return ".".join(path), str(messages)


def raise_validation_error(error: ValidationError) -> NoReturn:
    param, message = first_error(error.messages)
    message = message.rstrip(".")
    if message == "Unknown field":
        message = "unknown field"
    raise InvalidRequest(f"Invalid value for '{param}': {message}" if param else message, param=param or None)
