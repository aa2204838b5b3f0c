"""Reasoning text (``<think>...</think>``) kept apart from the answer, as text streams in.

Reasoning models write their thoughts between markers before answering; clients expect them in
``reasoning_content`` and never in ``content``. A model's YAML may name other markers or turn this off
(``reasoning: {start, end, disable}``). Some chat templates open the reasoning in the prompt itself (the
generation prompt ends with the start marker); then the answer starts inside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class Markers:
    start: str = START
    end: str = END


def markers_for(option: Any) -> Markers | None:
    """The markers a model's YAML ``reasoning`` names (the defaults when it names none); None: off."""
    if not isinstance(option, Mapping):
        return Markers()
    if option.get("disable"):
        return None
    return Markers(str(option.get("start") or START), str(option.get("end") or END))


def partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Feed the answer's text as it comes; get back ``(reasoning, content)`` pieces, holding back only
    what could still turn out to be a marker."""

    def __init__(self, markers: Markers, *, inside: bool = False):
        self.markers = markers
        self.state = "reasoning" if inside else "undecided"
        self.held = ""
        self.after_marker = inside  # newlines right after a marker belong to neither part

    def _skip_newlines(self) -> None:
        if self.after_marker:
            self.held = self.held.lstrip("\n")
            self.after_marker = not self.held

    def feed(self, text: str) -> tuple[str, str]:
        self.held += text
        reasoning = content = ""
        while True:
            if self.state == "undecided":
                stripped = self.held.lstrip()
                if stripped.startswith(self.markers.start):
                    self.held = stripped[len(self.markers.start):]
                    self.state, self.after_marker = "reasoning", True
                elif stripped and not self.markers.start.startswith(stripped):
                    self.state = "content"
                else:
                    return reasoning, content  # only whitespace or a marker's beginning so far
            if self.state == "reasoning":
                self._skip_newlines()
                at = self.held.find(self.markers.end)
                if at < 0:
                    keep = partial_suffix(self.held, self.markers.end)
                    reasoning += self.held[:len(self.held) - keep]
                    self.held = self.held[len(self.held) - keep:]
                    return reasoning, content
                reasoning += self.held[:at]
                self.held = self.held[at + len(self.markers.end):]
                self.state, self.after_marker = "content", True
            self._skip_newlines()
            content += self.held
            self.held = ""
            return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held once the answer has ended."""
        held, self.held = self.held, ""
        return (held, "") if self.state == "reasoning" else ("", held)
