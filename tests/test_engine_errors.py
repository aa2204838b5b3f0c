"""Engines raise only their own errors; ``errors.from_engine`` is the one place they become API errors."""

from __future__ import annotations

import pytest

from localai_aio.backends.base import (
    BackendError,
    ConstraintError,
    EngineBusy,
    InputRefused,
    PromptTooLong,
    Unsupported,
)
from localai_aio.errors import from_engine


@pytest.mark.parametrize(("exc", "status", "code", "param", "headers"), [
    (ConstraintError("no token fits", "response_format"), 400, "constraint_unsatisfiable", "response_format", {}),
    (InputRefused("no alignment graph", "timestamp_granularities"), 400, None, "timestamp_granularities", {}),
    (PromptTooLong("too long", "documents"), 400, "context_length_exceeded", "documents", {}),
    (Unsupported("does not rerank", "model"), 400, "unsupported_for_model", "model", {}),
    (EngineBusy("no room", retry_after=2), 503, "server_overloaded", None, {"Retry-After": "2"}),
])
def test_engine_errors_map_to_their_api_error(exc: BackendError, status: int, code: str, param: str | None,
                                              headers: dict[str, str]) -> None:
    err = from_engine(exc)
    assert err is not None
    assert (err.status, err.code, err.param, err.message, err.headers) == (status, code, param, str(exc), headers)


def test_other_engine_failures_are_not_the_clients_business() -> None:
    assert from_engine(BackendError("decode failed")) is None
    assert from_engine(RuntimeError("bug")) is None
