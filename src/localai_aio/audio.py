"""Audio out: encode chunks of float samples as they are made, in the formats clients ask for.

``StreamEncoder.feed()`` returns the bytes ready to send after each chunk (a sentence), so speech can go
out while the rest is still being synthesized. PCM and WAV are written directly (a streamed WAV header
cannot know the final length, so its size fields say "unknown", as streaming servers do); Ogg/Opus and
MP3 come from libsndfile (soundfile) writing into a growing buffer. MP3 is constant-bitrate, because
the VBR header LAME patches at the end cannot be patched once sent, and decoders that estimate length
from the first frame would cut a VBR stream short. FLAC is sent whole at the end: its header carries
the total length, which only exists then.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

OPUS_RATES = (48000, 24000, 16000, 12000, 8000)


@dataclass(frozen=True)
class AudioFormat:
    name: str
    content_type: str
    sf_format: str | None = None
    sf_subtype: str | None = None
    streamed: bool = True
    options: tuple[tuple[str, object], ...] = ()


FORMATS = {
    "wav": AudioFormat("wav", "audio/wav"),
    "pcm": AudioFormat("pcm", "audio/pcm"),
    "flac": AudioFormat("flac", "audio/flac", "FLAC", "PCM_16", streamed=False),
    "mp3": AudioFormat("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III",
                       options=(("bitrate_mode", "CONSTANT"), ("compression_level", 0.3))),
    "opus": AudioFormat("opus", "audio/ogg", "OGG", "OPUS"),
}


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """High-quality resampling (soxr)."""
    if rate == target or len(samples) == 0:
        return samples.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(samples.astype(np.float32, copy=False), rate, target, quality="HQ").astype(np.float32)


def to_int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")


def wav_header(rate: int) -> bytes:
    """A 16-bit mono WAV header whose sizes say "unknown length" (0xFFFFFFFF), for streaming."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate,
            rate * 2, 2, 16) + b"data" + struct.pack("<I", unknown))


class _GrowingBuffer(io.RawIOBase):
    """A seekable sink for libsndfile; bytes past ``sent`` are handed out as they appear."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0
        self.sent = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, b) -> int:  # noqa: ANN001
        end = self.pos + len(b)
        if end > len(self.data):
            self.data.extend(b"\0" * (end - len(self.data)))
        if end > self.sent:  # bytes already sent cannot change any more
            start = max(self.pos, self.sent)
            self.data[start:end] = bytes(b)[start - self.pos:]
        self.pos = end
        return len(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.data)}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:  # noqa: ANN001
        chunk = self.data[self.pos:self.pos + len(b)]
        b[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)

    def take(self) -> bytes:
        out = bytes(self.data[self.sent:])
        self.sent = len(self.data)
        return out


class StreamEncoder:
    """Feed float32 mono chunks at ``rate``; get encoded bytes back as soon as they exist."""

    def __init__(self, fmt: AudioFormat, rate: int, out_rate: int | None = None):
        self.fmt = fmt
        self.in_rate = rate
        self.rate = out_rate or rate
        if fmt.name == "opus" and self.rate not in OPUS_RATES:
            self.rate = min(OPUS_RATES, key=lambda r: (r < self.rate, abs(r - self.rate)))
        self._started = False
        self._sink: _GrowingBuffer | None = None
        self._file = None
        if fmt.sf_format:
            import soundfile

            self._sink = _GrowingBuffer()
            self._file = soundfile.SoundFile(self._sink, mode="w", samplerate=self.rate, channels=1,
                                             format=fmt.sf_format, subtype=fmt.sf_subtype, **dict(fmt.options))

    def feed(self, samples: np.ndarray) -> bytes:
        samples = resample(samples, self.in_rate, self.rate)
        if self._file is not None:
            self._file.write(samples)
            return self._sink.take() if self.fmt.streamed else b""
        head = b""
        if not self._started and self.fmt.name == "wav":
            head = wav_header(self.rate)
        self._started = True
        return head + to_int16(samples).tobytes()

    def finish(self) -> bytes:
        if self._file is not None:
            self._file.close()
            return self._sink.take()
        if not self._started and self.fmt.name == "wav":
            self._started = True
            return wav_header(self.rate)
        return b""


# -- audio in ---------------------------------------------------------------------------------------------

class UnreadableAudio(ValueError):
    pass


def decode_audio(data: bytes, rate: int = 16000) -> np.ndarray:
    """Any format libsndfile reads (wav, flac, ogg/opus, mp3, ...), any rate and channel count ->
    float32 mono at ``rate`` (channels averaged, resampled with soxr)."""
    import soundfile

    if not data:
        return np.zeros(0, np.float32)
    try:
        samples, source_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise UnreadableAudio(f"the file is not audio in a supported format (wav, flac, ogg, opus, mp3): "
                              f"{' '.join(str(exc).split())[:120]}") from None
    return resample(samples.mean(axis=1), int(source_rate), rate)
