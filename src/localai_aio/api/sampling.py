"""Request fields -> ``GenParams``: the one parser of the sampling fields every text route shares, on
the HTTP side of the seam (engines take the dataclass and never read a request).

A model YAML's ``parameters`` give the defaults and the request overrides them; the merged values are
checked here against the bounds the API spec declares (``server.schemas.BOUNDS``), so a bad default in a YAML
is refused as clearly as a bad request field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from localai_aio.backends.text import GenParams
from localai_aio.errors import InvalidRequest
from localai_aio.server.schemas import BOUNDS

MAX_STOP_SEQUENCES = 16
MAX_LOGIT_BIAS = 300


def _number(body: Mapping[str, Any], key: str, default: Any) -> Any:
    lo, hi = BOUNDS[key]
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidRequest(f"Invalid value for '{key}': must be a number", param=key)
    if not lo <= value <= hi:
        raise InvalidRequest(f"Invalid value for '{key}': {value} is not within [{lo:g}, {hi:g}]", param=key)
    return value


def _integer(body: Mapping[str, Any], key: str, default: Any, bounds: str | None = None) -> Any:
    lo, hi = BOUNDS[bounds or key]
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"Invalid value for '{key}': must be an integer", param=key)
    if value < lo or (hi is not None and value > hi):
        bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise InvalidRequest(f"Invalid value for '{key}': must be {bound}, got {value}", param=key)
    return value


def parse_stop(value: Any, extra: Sequence[str] = ()) -> tuple[str, ...]:
    if value is None:
        stops: list[str] = []
    elif isinstance(value, str):
        stops = [value]
    elif isinstance(value, list) and all(isinstance(s, str) for s in value):
        stops = list(value)
    else:
        raise InvalidRequest("Invalid value for 'stop': must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"Invalid value for 'stop': at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return tuple(dict.fromkeys([s for s in stops if s] + [s for s in extra if s]))


def parse_params(body: Mapping[str, Any], defaults: Mapping[str, Any], *, stopwords: Sequence[str] = (),
                 logprobs: int | None = None, grammar: str | None = None,
                 grammar_param: str = "grammar", cache_scope: str = "") -> GenParams:
    """Model YAML ``parameters`` give the defaults; the request overrides them. ``cache_scope`` is whose
    cached prompts the request may reuse (its key's); a request's ``cache_salt`` (vLLM's field) narrows
    it further, so even one key's clients can keep their prompts apart."""
    merged = {**{k: v for k, v in defaults.items() if v is not None},
              **{k: v for k, v in body.items() if v is not None}}
    _refused(merged)
    base = GenParams()
    max_tokens = merged.get("max_completion_tokens", merged.get("max_tokens"))
    if max_tokens is not None:
        key = "max_completion_tokens" if "max_completion_tokens" in merged else "max_tokens"
        max_tokens = _integer({key: max_tokens}, key, None, bounds="max_tokens")
    seed = _integer(merged, "seed", None)
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise InvalidRequest("Invalid value for 'cache_salt': must be a string", param="cache_salt")
    return GenParams(
        max_tokens=max_tokens,
        temperature=float(_number(merged, "temperature", base.temperature)),
        top_p=float(_number(merged, "top_p", base.top_p)),
        top_k=int(_integer(merged, "top_k", base.top_k)),
        min_p=float(_number(merged, "min_p", base.min_p)),
        repeat_penalty=float(_number(merged, "repeat_penalty", base.repeat_penalty)),
        presence_penalty=float(_number(merged, "presence_penalty", base.presence_penalty)),
        frequency_penalty=float(_number(merged, "frequency_penalty", base.frequency_penalty)),
        seed=None if seed is None or seed < 0 else seed % (2**32),
        stop=parse_stop(body.get("stop", defaults.get("stop")), stopwords),
        logprobs=logprobs,
        grammar=grammar,
        grammar_param=grammar_param,
        ignore_eos=bool(merged.get("ignore_eos", False)),
        logit_bias=_logit_bias(merged.get("logit_bias")),
        typical_p=float(_number(merged, "typical_p", base.typical_p)),
        mirostat=int(_integer(merged, "mirostat", base.mirostat)),
        mirostat_tau=float(_number(merged, "mirostat_tau", base.mirostat_tau)),
        mirostat_eta=float(_number(merged, "mirostat_eta", base.mirostat_eta)),
        repeat_last_n=int(_integer(merged, "repeat_last_n", base.repeat_last_n)),
        cache_scope=cache_scope if not salt else f"{cache_scope}|{salt}",
    )


def _refused(merged: Mapping[str, Any]) -> None:
    """Fields clients send that this server cannot honour: a 400 naming them, never silence."""
    if merged.get("tfs_z", 1.0) != 1.0:
        raise InvalidRequest("'tfs_z' (tail-free sampling) is not supported: llama.cpp removed it; use 'min_p' "
                             "or 'typical_p'", param="tfs_z")
    if merged.get("n_keep", 0) != 0:
        raise InvalidRequest("'n_keep' only matters when a full context is shifted, which this server never does "
                             "(a prompt that does not fit gets 400 context_length_exceeded)", param="n_keep")


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` (-100 to 100), read in the model's own vocabulary."""
    if value is None:
        return ()
    if not isinstance(value, Mapping) or len(value) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"Invalid value for 'logit_bias': an object of at most {MAX_LOGIT_BIAS} token ids",
                             param="logit_bias")
    out = []
    for key, bias in value.items():
        if not str(key).isdigit() or isinstance(bias, bool) or not isinstance(bias, int | float) \
                or not -100 <= bias <= 100:
            raise InvalidRequest(f"Invalid value for 'logit_bias': {key!r}: {bias!r}; keys are token ids, values "
                                 "numbers from -100 to 100", param="logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def parse_n(body: Mapping[str, Any]) -> int:
    return int(_integer(body, "n", 1))
