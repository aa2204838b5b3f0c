"""Audio out: encode chunks of float samples as they are made, in the formats clients ask for.

``StreamEncoder.feed()`` returns the bytes ready to send after each chunk (a sentence), so speech can go
out while the rest is still being synthesized. PCM and WAV are written directly (a streamed WAV header
cannot know the final length, so its size fields say "unknown", as streaming servers do); Ogg/Opus
comes from libsndfile (soundfile) writing into a growing buffer; MP3, AAC and G.711 (u-law, a-law) from
FFmpeg through PyAV. MP3 is constant-bitrate at the bitrate asked for (ElevenLabs' ``mp3_44100_128``),
without a Xing/LAME header: that header is patched at the end, which a stream cannot do once sent, and
decoders that trust an unpatched one cut the stream short. FLAC is sent whole at the end: its header
carries the total length, which only exists then.

Audio in: an upload's length is checked from its header, then it is decoded block by block as it is
read (``AudioSource``), because a few MB of compressed audio can expand to gigabytes of samples.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace

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
    av_format: str | None = None  # written by FFmpeg through PyAV (a muxer that streams, and its codec)
    av_codec: str | None = None
    bit_rate: int | None = None  # bits per second, for codecs that take one
    fixed_rate: int | None = None  # the only sample rate the format has (telephony's 8 kHz)

    def with_bit_rate(self, bits_per_second: int) -> AudioFormat:
        return replace(self, bit_rate=bits_per_second)


FORMATS = {
    "wav": AudioFormat("wav", "audio/wav"),
    "pcm": AudioFormat("pcm", "audio/pcm"),
    "flac": AudioFormat("flac", "audio/flac", "FLAC", "PCM_16", streamed=False),
    "mp3": AudioFormat("mp3", "audio/mpeg", av_format="mp3", av_codec="libmp3lame", bit_rate=128_000),
    "opus": AudioFormat("opus", "audio/ogg", "OGG", "OPUS"),
    # AAC in ADTS frames: each frame carries its own header, so the stream plays as it arrives
    "aac": AudioFormat("aac", "audio/aac", av_format="adts", av_codec="aac"),
    # raw G.711 bytes, no header (ElevenLabs' ulaw_8000 / alaw_8000, for telephony)
    "ulaw": AudioFormat("ulaw", "audio/basic", av_format="mulaw", av_codec="pcm_mulaw", fixed_rate=8000),
    "alaw": AudioFormat("alaw", "audio/x-alaw-basic", av_format="alaw", av_codec="pcm_alaw", fixed_rate=8000),
}
#: Formats that OpenAI's ``response_format`` names; the rest are for ElevenLabs' ``output_format``.
OPENAI_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


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


class _AvWriter:
    """Encodes with FFmpeg (PyAV) into a growing buffer; the bytes each chunk adds go out at once."""

    def __init__(self, fmt: AudioFormat, rate: int):
        import av

        self._av = av
        self._sink = _GrowingBuffer()
        options = {"write_xing": "0", "id3v2_version": "0"} if fmt.av_format == "mp3" else {}
        self._container = av.open(self._sink, mode="w", format=fmt.av_format, options=options)
        self._stream = self._container.add_stream(fmt.av_codec, rate=rate, layout="mono")
        if fmt.bit_rate:
            self._stream.bit_rate = fmt.bit_rate
        self._convert = av.AudioResampler(format=self._stream.codec_context.codec.audio_formats[0].name,
                                          layout="mono", rate=rate)
        self.rate = rate

    def _mux(self, frame) -> None:  # noqa: ANN001
        for converted in self._convert.resample(frame):
            for packet in self._stream.encode(converted):
                self._container.mux(packet)

    def write(self, samples: np.ndarray) -> bytes:
        if len(samples):
            frame = self._av.AudioFrame.from_ndarray(samples.astype(np.float32).reshape(1, -1), format="flt",
                                                     layout="mono")
            frame.sample_rate = self.rate
            self._mux(frame)
        return self._sink.take()

    def close(self) -> bytes:
        self._mux(None)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()


class StreamEncoder:
    """Feed float32 mono chunks at ``rate``; get encoded bytes back as soon as they exist."""

    def __init__(self, fmt: AudioFormat, rate: int, out_rate: int | None = None):
        self.fmt = fmt
        self.in_rate = rate
        self.rate = fmt.fixed_rate or out_rate or rate
        if fmt.name == "opus" and self.rate not in OPUS_RATES:
            self.rate = min(OPUS_RATES, key=lambda r: (r < self.rate, abs(r - self.rate)))
        self._started = False
        self._sink: _GrowingBuffer | None = None
        self._file = None
        self._av: _AvWriter | None = _AvWriter(fmt, self.rate) if fmt.av_format else None
        if fmt.sf_format:
            import soundfile

            self._sink = _GrowingBuffer()
            self._file = soundfile.SoundFile(self._sink, mode="w", samplerate=self.rate, channels=1,
                                             format=fmt.sf_format, subtype=fmt.sf_subtype, **dict(fmt.options))

    def feed(self, samples: np.ndarray) -> bytes:
        samples = resample(samples, self.in_rate, self.rate)
        if self._av is not None:
            return self._av.write(samples)
        if self._file is not None:
            self._file.write(samples)
            return self._sink.take() if self.fmt.streamed else b""
        head = b""
        if not self._started and self.fmt.name == "wav":
            head = wav_header(self.rate)
        self._started = True
        return head + to_int16(samples).tobytes()

    def finish(self) -> bytes:
        if self._av is not None:
            return self._av.close()
        if self._file is not None:
            self._file.close()
            return self._sink.take()
        if not self._started and self.fmt.name == "wav":
            self._started = True
            return wav_header(self.rate)
        return b""


# -- audio in ---------------------------------------------------------------------------------------------

BLOCK_FRAMES = 65536  # read at the file's own rate: about 1.5 s at 44.1 kHz, 512 KB as float32 stereo
#: Sample rates an upload may declare, in Hz. A header's rate is only a claim, and a block of frames is
#: resampled to the rate asked for in one step: at 1 Hz, one block of a few KB would become a billion
#: samples (4 GB). From 1 kHz up, a block stays under 4 MB at 16 kHz; recordings are 8 to 384 kHz.
MIN_RATE, MAX_RATE = 1000, 384_000


class UnreadableAudio(ValueError):
    pass


class UnsupportedRate(UnreadableAudio):
    """The file declares a sample rate no recording has; no other decoder is tried."""


def _check_rate(rate: float) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise UnsupportedRate(f"the file declares a sample rate of {rate:g} Hz; accepted are {MIN_RATE} to "
                              f"{MAX_RATE} Hz")


class AudioTooLong(ValueError):
    """Refused from the header alone: decoding it would cost memory and time in proportion to its length."""

    code = "audio_too_long"

    def __init__(self, seconds: float, limit: float, *, at_least: bool = False):
        lasts = "lasts more than" if at_least else "lasts"
        super().__init__(f"the clip {lasts} {seconds:.1f} s ({_clock(seconds)}); the longest accepted is "
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
    blocks are decoded (channels averaged, resampled on the fly) as ``read`` needs them, and samples
    before the last read's start are dropped. Reads only move forward, but may start before the previous
    one ended (Whisper's next window starts at its last timestamp), so what is held is about one read's
    span and a block, whatever the clip's length. libsndfile reads wav, flac, ogg/opus and mp3; PyAV
    (FFmpeg) reads what browsers and phones record (webm, m4a, mp4). Not thread-safe: one thread reads
    at a time. The file closes itself at the end of the clip, or when the source is dropped.
    """

    def __init__(self, data: bytes, rate: int = 16000, block_frames: int = BLOCK_FRAMES, max_seconds: float = 0.0):
        self.rate = rate
        self.max_seconds = max_seconds
        self._header_seconds: float | None = 0.0
        self._blocks: Iterator[np.ndarray] = iter(())
        if data:
            try:
                self._blocks, self._header_seconds = _sndfile_blocks(data, rate, block_frames)
            except UnsupportedRate:
                raise
            except UnreadableAudio:
                self._blocks, self._header_seconds = _av_blocks(data, rate)  # raises the same when it fails too
        self._ended = not data
        self._produced = 0  # samples at ``rate`` decoded so far
        self._buffer = np.zeros(0, np.float32)
        self._offset = 0  # index in the clip of ``_buffer[0]``

    @property
    def duration(self) -> float:
        """Seconds: from the header until the clip has been decoded to its end (or as far as decoded, for a
        container that does not say, as browsers' webm recordings do not), then exact."""
        if self._ended or self._header_seconds is None:
            return self._produced / self.rate
        return self._header_seconds

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
        block = next(self._blocks, None)
        if block is None:
            self._ended = True
            return np.zeros(0, np.float32)
        self._produced += len(block)
        if self.max_seconds and self._produced > self.max_seconds * self.rate:  # a length no header announced
            self.close()
            raise AudioTooLong(self._produced / self.rate, self.max_seconds, at_least=True)
        return block

    def close(self) -> None:
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()
        self._ended = True


def _sndfile_blocks(data: bytes, rate: int, block_frames: int) -> tuple[Iterator[np.ndarray], float]:
    """libsndfile's formats: blocks of the file resampled with soxr's streaming resampler, and the length."""
    import soundfile
    import soxr

    with _readable():
        file = soundfile.SoundFile(io.BytesIO(data))
    try:
        _check_rate(file.samplerate)
    except UnsupportedRate:
        file.close()
        raise
    resampler = None
    if file.samplerate != rate:
        resampler = soxr.ResampleStream(file.samplerate, rate, 1, dtype="float32", quality="HQ")

    def blocks() -> Iterator[np.ndarray]:
        try:
            while True:
                with _readable():
                    block = file.read(block_frames, dtype="float32", always_2d=True)
                last = len(block) < block_frames
                mono = block.mean(axis=1, dtype=np.float32)
                yield resampler.resample_chunk(mono, last=last) if resampler is not None else mono
                if last:
                    return
        finally:
            file.close()

    return blocks(), file.frames / file.samplerate


def _av_blocks(data: bytes, rate: int) -> tuple[Iterator[np.ndarray], float | None]:
    """Containers libsndfile cannot open (webm, m4a, mp4...), through PyAV: its decoded frames resampled to
    float mono at ``rate`` by FFmpeg's resampler, and the length when the container states it."""
    try:
        import av
    except ImportError:  # pragma: no cover - PyAV comes with the stt extra
        raise UnreadableAudio("the file is not audio in a format libsndfile reads (wav, flac, ogg, opus, mp3)") \
            from None
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as exc:
        raise UnreadableAudio(f"the file is not audio in a supported format (wav, flac, ogg, opus, mp3, webm, "
                              f"m4a, mp4): {' '.join(str(exc).split())[:120]}") from None
    if not container.streams.audio:
        container.close()
        raise UnreadableAudio("the file holds no audio stream")
    stream = container.streams.audio[0]
    try:
        if stream.codec_context.sample_rate:  # else known only from the frames, checked as they come
            _check_rate(stream.codec_context.sample_rate)
    except UnsupportedRate:
        container.close()
        raise
    seconds = None
    if container.duration:
        seconds = container.duration / av.time_base
    elif stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)

    def blocks() -> Iterator[np.ndarray]:
        try:
            for frame in container.decode(stream):
                _check_rate(frame.sample_rate)
                for out in resampler.resample(frame):
                    yield out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            for out in resampler.resample(None):
                yield out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
        except av.error.FFmpegError as exc:
            raise UnreadableAudio(f"the audio could not be decoded: {' '.join(str(exc).split())[:120]}") from None
        finally:
            container.close()

    return blocks(), seconds


def open_audio(data: bytes, max_seconds: float = 0.0, rate: int = 16000) -> AudioSource:
    """Any format libsndfile or FFmpeg reads, any rate and channel count, as a source of float32 mono at
    ``rate``. Only the header is read here, so a clip longer than ``max_seconds`` (0: no limit) is refused
    before any of it is decoded; one whose container does not state its length is refused as soon as its
    decoding passes the limit."""
    source = AudioSource(data, rate, max_seconds=max_seconds)
    seconds = source.duration
    if max_seconds and seconds > max_seconds:
        source.close()
        raise AudioTooLong(seconds, max_seconds)
    return source
