"""When each character of a text is spoken, from how long the voice held each phoneme.

ElevenLabs' ``with-timestamps`` answers give every input character a start and an end time; players
use them to highlight words as they are spoken. A Piper voice gives the duration of each phoneme of a
sentence, with ``" "`` between words and punctuation as phonemes of their own. The phonemes are grouped
into spoken words, and when their number matches the text's words, each word's characters share its
spoken time and the characters between words (spaces, punctuation) share the pause between them. When
the numbers differ (espeak reads "42" as two words) or the voice gives no durations, the sentence's
time is shared by its characters in proportion, which keeps the times in order and within the audio.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Phonemes that are not part of a spoken word: Piper's sentence start and end, word breaks, punctuation.
NOT_SPOKEN = frozenset("^$ ,.;:!?¡¿—…\"«»“”()-")
WORD = re.compile(r"\w+(?:['’-]\w+)*")
SENTENCE = re.compile(r".*?(?:[.!?…]+[\"'”’)\]]*(?:\s+|$)|$)", re.S)

CharTimes = list[tuple[str, float, float]]


def sentences(text: str) -> list[str]:
    """The text cut after each sentence's end (with the whitespace that follows), nothing lost."""
    return [m.group(0) for m in SENTENCE.finditer(text) if m.group(0)]


def _spoken_words(phonemes: Sequence[tuple[str, float]]) -> list[tuple[float, float]]:
    """(start, end) of each run of spoken phonemes."""
    words: list[tuple[float, float]] = []
    clock, start = 0.0, None
    for phoneme, seconds in phonemes:
        if phoneme in NOT_SPOKEN:
            if start is not None:
                words.append((start, clock))
                start = None
        elif start is None:
            start = clock
        clock += seconds
    if start is not None:
        words.append((start, clock))
    return words


def _spread(chars: str, start: float, end: float) -> CharTimes:
    step = (end - start) / len(chars) if chars else 0.0
    return [(c, start + i * step, start + (i + 1) * step) for i, c in enumerate(chars)]


def character_times(text: str, phonemes: Sequence[tuple[str, float]] | None, seconds: float,
                    offset: float = 0.0) -> CharTimes:
    """(character, start, end) for each character of a sentence spoken in ``seconds``, from ``offset``."""
    matches = list(WORD.finditer(text))
    words = _spoken_words(phonemes) if phonemes else []
    if not matches or len(words) != len(matches):
        return [(c, offset + a, offset + b) for c, a, b in _spread(text, 0.0, seconds)]
    out: CharTimes = []
    at, clock = 0, 0.0
    for match, (start, end) in zip(matches, words, strict=True):
        out += _spread(text[at:match.start()], clock, start)  # the pause before the word
        out += _spread(match.group(0), start, end)
        at, clock = match.end(), end
    out += _spread(text[at:], clock, seconds)
    return [(c, offset + a, offset + b) for c, a, b in out]


def alignment(times: CharTimes) -> dict[str, list]:
    """ElevenLabs' ``alignment`` object."""
    return {"characters": [c for c, _, _ in times],
            "character_start_times_seconds": [round(a, 3) for _, a, _ in times],
            "character_end_times_seconds": [round(b, 3) for _, _, b in times]}
