"""Audio out: encode chunks of float samples as they are made, in the formats clients ask for.

``StreamEncoder.feed()`` returns the bytes ready to send after each chunk (a sentence), so speech can go
out while the rest is still being synthesized. PCM and WAV are written directly (a streamed WAV header
cannot know the final length, so its size fields say "unknown", as streaming servers do); Ogg/Opus and
MP3 come from libsndfile (soundfile) writing into a growing buffer. MP3 is constant-bitrate, because
the VBR header LAME patches at the end cannot be patched once sent, and decoders that estimate length
from the first frame would cut a VBR stream short. FLAC is sent whole at the end: its header carries
the total length, which only exists then.

Audio in: an upload's length is checked from its header, then it is decoded block by block as it is
read (``AudioSource``), because a few MB of compressed audio can expand to gigabytes of samples.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Iterator
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

BLOCK_FRAMES = 65536  # read at the file's own rate: about 1.5 s at 44.1 kHz, 512 KB as float32 stereo


class UnreadableAudio(ValueError):
    pass


class AudioTooLong(ValueError):
    """Refused from the header alone: decoding it would cost memory and time in proportion to its length."""

    code = "audio_too_long"

    def __init__(self, seconds: float, limit: float):
        super().__init__(f"the clip lasts {seconds:.1f} s ({_clock(seconds)}); the longest accepted is "
                         f"{limit:g} s ({_clock(limit)})")
        self.seconds = seconds
        self.limit = limit


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


@contextlib.contextmanager
def _readable() -> Iterator[None]:
    """libsndfile reports a file it cannot parse in several ways; the client only needs to know it is not audio."""
    import soundfile

    try:
        yield
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise UnreadableAudio(f"the file is not audio in a supported format (wav, flac, ogg, opus, mp3): "
                              f"{' '.join(str(exc).split())[:120]}") from None


class AudioSource:
    """An upload as float32 mono at ``rate``, decoded only as far as it is read.

    A compressed upload can hold hours of audio in a few MB, so the whole clip never exists decoded:
    blocks are read (channels averaged) and resampled with soxr's streaming resampler as ``read`` needs
    them, and samples before the last read's start are dropped. Reads only move forward, but may start
    before the previous one ended (Whisper's next window starts at its last timestamp), so what is held is
    about one read's span and a block, whatever the clip's length. Not thread-safe: one thread reads at a
    time. The file closes itself at the end of the clip, or when the source is dropped.
    """

    def __init__(self, data: bytes, rate: int = 16000, block_frames: int = BLOCK_FRAMES):
        self.rate = rate
        self._block_frames = block_frames
        self._file = None
        self._resampler = None
        self._header_seconds = 0.0
        if data:
            self._open(data)
        self._ended = self._file is None
        self._produced = 0  # samples at ``rate`` decoded so far
        self._buffer = np.zeros(0, np.float32)
        self._offset = 0  # index in the clip of ``_buffer[0]``

    def _open(self, data: bytes) -> None:
        import soundfile
        import soxr

        with _readable():
            self._file = soundfile.SoundFile(io.BytesIO(data))
        self._header_seconds = self._file.frames / self._file.samplerate
        if self._file.samplerate != self.rate:
            self._resampler = soxr.ResampleStream(self._file.samplerate, self.rate, 1, dtype="float32",
                                                  quality="HQ")

    @property
    def duration(self) -> float:
        """Seconds: from the header until the clip has been decoded to its end, then exact."""
        return self._produced / self.rate if self._ended else self._header_seconds

    def read(self, start: int, end: int) -> np.ndarray:
        """Samples ``[start, end)`` (fewer at the end of the clip); those before ``start`` are gone after."""
        if start < self._offset:
            raise ValueError(f"samples before {self._offset} were dropped; reads must move forward")
        self._skip_to(start)
        self._fill_to(end)
        return self._buffer[: max(0, end - self._offset)]

    def _skip_to(self, start: int) -> None:
        while self._offset + len(self._buffer) < start and not self._ended:
            self._offset += len(self._buffer)
            self._buffer = self._decode_block()
        drop = min(start - self._offset, len(self._buffer))
        self._buffer = self._buffer[drop:]
        self._offset += drop

    def _fill_to(self, end: int) -> None:
        blocks = [self._buffer]
        held = self._offset + len(self._buffer)
        while held < end and not self._ended:
            blocks.append(self._decode_block())
            held += len(blocks[-1])
        if len(blocks) > 1:
            self._buffer = np.concatenate(blocks)

    def _decode_block(self) -> np.ndarray:
        with _readable():
            block = self._file.read(self._block_frames, dtype="float32", always_2d=True)
        last = len(block) < self._block_frames
        mono = block.mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono, last=last)
        if last:
            self._file.close()
            self._ended = True
        self._produced += len(mono)
        return mono

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def open_audio(data: bytes, max_seconds: float = 0.0, rate: int = 16000) -> AudioSource:
    """Any format libsndfile reads (wav, flac, ogg/opus, mp3, ...), any rate and channel count, as a
    source of float32 mono at ``rate``. Only the header is read here, so a clip longer than
    ``max_seconds`` (0: no limit) is refused before any of it is decoded."""
    source = AudioSource(data, rate)
    if max_seconds and source.duration > max_seconds:
        source.close()
        raise AudioTooLong(source.duration, max_seconds)
    return source
