"""One choice's tokens turned into the text users see: incremental UTF-8, stop strings, logprobs, counts.

Engines only produce token ids; everything visible in the text - stop strings that must never appear
(also when one spans two tokens), the finish reason and the token counts - is decided here, once, so
the engines cannot disagree.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from localai_aio.backends.text import GenParams, SeqEnd, TokenStep


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Piece:
    """Text ready to send for one choice (possibly empty when only log-probabilities come with it)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finish:
    index: int
    reason: str  # "stop" | "length"
    completion_tokens: int
    cached_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended the choice, if one did


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string is never emitted."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit, the stop string reached or None)."""
        self.held += text
        if not self.stops:
            out, self.held = self.held, ""
            return out, None
        hits = [(at, stop) for stop in self.stops if (at := self.held.find(stop)) >= 0]
        if hits:
            at, stop = min(hits)
            out = self.held[:at]
            self.held = ""
            return out, stop
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.held)), 0, -1):
                if self.held.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, None

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _token_logprob(step: TokenStep) -> TokenLogprob:
    def entry(raw: bytes, logprob: float) -> dict[str, Any]:
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return TokenLogprob(token=step.piece.decode("utf-8", "replace"), logprob=float(step.logprob or 0.0),
                        bytes=list(step.piece), top_logprobs=[entry(raw, lp) for raw, lp in step.top])


class ChoiceText:
    """Turns one choice's token events into text: incremental UTF-8, stop strings, logprobs, counts."""

    def __init__(self, index: int, params: GenParams):
        self.index = index
        self.params = params
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stopper = StopMatcher(params.stop)
        self.count = 0
        self.done = False

    def feed(self, step: TokenStep) -> list[Piece | Finish]:
        """The events for one token; a reached stop string ends the choice (``done``)."""
        self.count += 1
        text, hit = self.stopper.feed(self.decoder.decode(step.piece))
        logprobs = [_token_logprob(step)] if self.params.logprobs is not None else []
        out: list[Piece | Finish] = [Piece(self.index, text, logprobs)] if text or logprobs else []
        if hit is not None:
            self.done = True
            out.append(Finish(self.index, "stop", self.count, stop_sequence=hit))
        return out

    def end(self, end: SeqEnd) -> list[Piece | Finish]:
        self.done = True
        tail, hit = self.stopper.feed(self.decoder.decode(b"", final=True))
        tail += "" if hit is not None else self.stopper.flush()
        out: list[Piece | Finish] = [Piece(self.index, tail)] if tail else []
        out.append(Finish(self.index, "stop" if hit is not None else end.reason, self.count, end.cached_tokens,
                          stop_sequence=hit))
        return out
