"""Backend ``piper``: Piper voices (VITS exported to ONNX) with piper-tts' own phonemization.

piper-tts brings espeak-ng (bundled, offline) and the sentence splitting and phoneme-id mapping Piper
voices are trained with; the ONNX session is made here so that threads and execution providers come
from the config like every other ONNX model. Speech is produced one sentence at a time.

Voices: the model file is ``<voice>.onnx`` with ``<voice>.onnx.json`` beside it. A request's ``voice``
may be a speaker name or number of a multi-speaker voice, a name from the YAML's ``voices`` mapping
(``alloy: 0`` or ``alloy: some-speaker``), or the model's own name.

Timing: a VITS voice decides how long each phoneme lasts (the ``w_ceil`` durations) but does not output
it. With the ``onnx`` package present the graph is changed in memory at load to output it too, as
piper's own ``include_alignments`` does, so speech can come with the time of each phoneme.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from localai_aio.backends.base import BackendError, read_json, require_file
from localai_aio.backends.onnx_common import make_session

if TYPE_CHECKING:
    from localai_aio.config import ModelConfig, ServerSettings
    from localai_aio.runtime import CancelFlag

log = logging.getLogger(__name__)


#: Control characters say nothing aloud, and espeak refuses a NUL: they are read as spaces.
_UNSPEAKABLE = {code: " " for code in range(32) if chr(code) not in "\t\n\r"}


class UnknownVoice(ValueError):
    def __init__(self, voice: str, choices: list[str]):
        super().__init__(f"Unknown voice '{voice}'; this model has: {', '.join(choices)}")
        self.choices = choices


class PiperEngine:
    def __init__(self, cfg: ModelConfig, settings: ServerSettings):
        path = require_file(cfg)
        config_path = path.with_name(path.name + ".json")
        if path.suffix != ".onnx" or not config_path.is_file():
            raise BackendError("a piper model is a <voice>.onnx file with <voice>.onnx.json beside it")
        try:
            from piper.config import PiperConfig
            from piper.voice import PiperVoice
        except ImportError:
            raise BackendError("piper-tts is not installed; install it with: pip install 'localai-aio[tts]'") from None
        try:
            config = PiperConfig.from_dict(read_json(config_path))
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"{config_path.name} is not a Piper voice config: {exc}") from None
        self.name = cfg.name
        graph, self.timed = _with_durations(path)  # timed: phoneme durations come out of each run
        self.voice = PiperVoice(session=make_session(path, cfg, settings, spinning=True, model=graph), config=config)
        self.sample_rate = int(config.sample_rate)
        self.speakers = {str(k): int(v) for k, v in (config.speaker_id_map or {}).items()}
        self.voices = {str(k): v for k, v in (cfg.option("voices") or {}).items()}

    def voice_names(self) -> list[str]:
        return sorted({self.name, *self.voices, *self.speakers})

    def speaker_for(self, voice: str | None) -> int | None:
        """The speaker id a request's ``voice`` selects (None: the voice's default)."""
        if voice in (None, "", self.name, "default"):
            return None
        target: Any = self.voices.get(voice, voice)
        if target in (None, "", "default", self.name):
            return None
        if str(target) in self.speakers:
            return self.speakers[str(target)]
        if isinstance(target, int) or str(target).isdigit():
            speaker = int(target)
            count = max(1, int(self.voice.config.num_speakers))
            if 0 <= speaker < count:
                return speaker if count > 1 else None
        raise UnknownVoice(voice, self.voice_names())

    def synthesize(self, text: str, *, speaker: int | None, speed: float, cancel: CancelFlag) -> Iterator[np.ndarray]:
        """Float32 samples at ``sample_rate``, one array per sentence, stopping between sentences on cancel."""
        from piper.config import SynthesisConfig

        settings = SynthesisConfig(speaker_id=speaker, length_scale=self.voice.config.length_scale / speed)
        for chunk in self.voice.synthesize(text.translate(_UNSPEAKABLE), settings):
            if cancel.is_set():
                return
            yield chunk.audio_float_array

    def synthesize_timed(self, text: str, *, speaker: int | None, speed: float,
                         cancel: CancelFlag) -> Iterator[tuple[np.ndarray, list[tuple[str, float]] | None]]:
        """Like ``synthesize``, with each sentence's phonemes and how long each lasts in seconds (None
        when the voice cannot tell)."""
        from piper.config import SynthesisConfig

        settings = SynthesisConfig(speaker_id=speaker, length_scale=self.voice.config.length_scale / speed)
        for chunk in self.voice.synthesize(text.translate(_UNSPEAKABLE), settings, include_alignments=self.timed):
            if cancel.is_set():
                return
            timing = None
            if chunk.phoneme_alignments:
                timing = [(a.phoneme, a.num_samples / self.sample_rate) for a in chunk.phoneme_alignments]
            yield chunk.audio_float_array, timing

    def close(self) -> None:
        self.voice = None


def _with_durations(path: Any) -> tuple[bytes | None, bool]:
    """The voice's graph changed to output its phoneme durations (None: load the file as it is), and
    whether the session will output them."""
    try:
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output
    except ImportError:
        return None, False
    model = onnx.load(str(path))
    try:
        add_alignment_output(model)
    except ValueError:  # no single Ceil node to read them from, or the file outputs them already
        return None, len(model.graph.output) > 1
    return model.SerializeToString(), True


def load(cfg: ModelConfig, settings: ServerSettings) -> PiperEngine:
    return PiperEngine(cfg, settings)
