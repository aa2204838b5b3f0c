"""What the API layer may call on the engines of each family other than text (``backends.text``).

Each backend module implements one of these; the registry hands the instance to a route, which calls it
on the instance's own thread (``EngineHandle.run``). A backend that lacks a capability leaves the method
out, and the route answers 400 naming the model. The protocols are the whole surface: a route that needs
more from an engine adds it here first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from localai_aio.audio.codecs import AudioSource
    from localai_aio.runtime import CancelFlag


class EmbeddingEngine(Protocol):
    """``onnx-embeddings``, and ``llama-cpp`` with embedding pooling."""

    vocab_size: int
    max_length: int  # tokens an input is cut to

    def embedding_tokens(self, texts: Sequence[str]) -> list[list[int]]: ...

    def embed(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """One float32 row per input, in input order."""


class RerankEngine(Protocol):
    """``onnx-rerank``, and ``llama-cpp`` with rank pooling."""

    def rerank(self, query: str, documents: Sequence[str]) -> list[tuple[float, int]]:
        """Each document's relevance in [0, 1], in order, with the tokens its pair took."""


class SpeechEngine(Protocol):
    """``piper``: float32 samples at ``sample_rate``, one array per sentence, stopping on ``cancel``."""

    sample_rate: int

    def speaker_for(self, voice: str | None) -> int | None: ...

    def synthesize(self, text: str, *, speaker: int | None, speed: float, cancel: CancelFlag
                   ) -> Iterator[np.ndarray]: ...

    def synthesize_timed(self, text: str, *, speaker: int | None, speed: float, cancel: CancelFlag
                         ) -> Iterator[tuple[np.ndarray, list[tuple[str, float]] | None]]: ...


class TranscriptionEngine(Protocol):
    """``onnx-whisper``: a clip of any length, pulled window by window from ``audio``."""

    multilingual: bool
    languages: dict[str, int]

    def transcribe(self, audio: AudioSource, *, language: str | None, task: str, prompt: str | None,
                   temperature: float, cancel: CancelFlag, words: bool = False) -> Any:
        """The transcript: text, language, duration, segments and, with ``words``, timed words."""


class ImageEngine(Protocol):
    """``onnx-diffusion``: PNG bytes of ``n`` images, stopping between denoising steps on ``cancel``."""

    def generate(self, *, prompt: str, negative_prompt: str | None, n: int, width: int, height: int,
                 steps: int | None, seed: int | None, clip_skip: int | None, cancel: CancelFlag) -> list[bytes]: ...
