"""Request bodies count against ``--upload-limit`` as they arrive, whatever their framing: a chunked body
(no Content-Length), a compressed one (Content-Encoding: gzip or deflate, counted decompressed), a multipart
body's part headers and boundaries, and its number of parts. An uploaded WAV cannot make the server
allocate more than its length at 16 kHz by declaring an absurd sample rate."""

from __future__ import annotations

import asyncio
import gzip
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from localai_aio.api.multipart import MAX_PARTS
from localai_aio.audio.codecs import MAX_RATE, MIN_RATE, UnsupportedRate, open_audio
from localai_aio.config import ModelConfig, ServerSettings

MB = 1024 * 1024
CHAT = "/v1/chat/completions"


@pytest.fixture
async def small(make_client, tmp_path: Path):  # noqa: ANN001
    """A server whose upload limit is 1 MB, with a transcription model that is never loaded (bodies are
    refused before any engine is needed)."""
    whisper = ModelConfig(name="w", backend="onnx-whisper", model_path=None, known_usecases=("transcript",))
    settings = ServerSettings(models_path=str(tmp_path / "m"), config_dir=str(tmp_path / "d"), upload_limit=1)
    return await make_client(settings, model_configs={"w": whisper})


async def assert_too_large(resp) -> None:  # noqa: ANN001
    assert resp.status == 413, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "request_too_large" and error["message"] == \
        "Request body is larger than the upload limit of 1 MB"


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f"\r\n\r\n'.encode()
                    + value + b"\r\n" for name, value in parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def leftovers(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "d").rglob("*") if p.is_file() and not p.name.startswith("localai.db")]


async def test_a_chunked_body_is_refused_before_it_ends(small) -> None:  # noqa: ANN001
    """The 413 arrives while the client is still sending: the server did not wait for (or keep) the rest."""
    answered = asyncio.Event()
    sent = 0

    async def body():  # 2 MB at once, then nothing more until the answer has come
        nonlocal sent
        for _ in range(32):
            sent += 64 * 1024
            yield b"a" * (64 * 1024)
        await asyncio.wait_for(answered.wait(), 30)

    resp = await small.post(CHAT, data=body(), headers={"Content-Type": "application/json"})
    answered.set()
    await assert_too_large(resp)
    assert sent <= 2 * MB
    assert (await small.get("/healthz")).status == 200


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_counts_decompressed(small, encoding: str) -> None:  # noqa: ANN001
    raw = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (3 * MB) + b'"}]}'
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    assert len(packed) < 64 * 1024  # its Content-Length is far under the limit
    resp = await small.post(CHAT, data=packed, headers={"Content-Type": "application/json",
                                                        "Content-Encoding": encoding})
    await assert_too_large(resp)
    # a small compressed body is read as usual (and reaches the handler: here, an unknown model)
    small_body = gzip.compress(b'{"model": "x", "messages": [{"role": "user", "content": "hi"}]}')
    resp = await small.post(CHAT, data=small_body, headers={"Content-Type": "application/json",
                                                            "Content-Encoding": "gzip"})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"


async def test_a_compressed_upload_counts_decompressed(small, tmp_path: Path) -> None:  # noqa: ANN001
    body, content_type = multipart([("purpose", b"assistants"), ("file", b"\0" * (3 * MB))])
    resp = await small.post("/v1/files", data=gzip.compress(body),
                            headers={"Content-Type": content_type, "Content-Encoding": "gzip"})
    await assert_too_large(resp)
    assert leftovers(tmp_path) == []  # the partial upload is gone


async def test_a_chunked_upload_over_the_limit(small, tmp_path: Path) -> None:  # noqa: ANN001
    body, content_type = multipart([("purpose", b"assistants"), ("file", b"\0" * (3 * MB))])

    async def chunks():
        for start in range(0, len(body), 256 * 1024):
            yield body[start:start + 256 * 1024]

    resp = await small.post("/v1/files", data=chunks(), headers={"Content-Type": content_type})
    await assert_too_large(resp)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("path", ["/v1/files", "/v1/audio/transcriptions"])
async def test_many_parts_are_refused(small, path: str) -> None:  # noqa: ANN001
    body, content_type = multipart([(f"f{i}", b"") for i in range(5000)])
    assert len(body) < MB  # small: what refuses it is the count
    resp = await small.post(path, data=body, headers={"Content-Type": content_type})
    assert resp.status == 400
    assert f"more than {MAX_PARTS} parts" in (await resp.json())["error"]["message"]


async def test_part_headers_count_against_the_limit(small) -> None:  # noqa: ANN001
    """Parts whose contents are empty but whose headers are large still add up to the body's size."""
    boundary = "b0undary"
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n'.encode()
            + b"".join(f"X-Pad-{i}: {'p' * 8000}\r\n".encode() for i in range(100)) + b"\r\n\r\n")
    body = part * 3 + f"--{boundary}--\r\n".encode()
    assert len(body) > 2 * MB

    async def chunks():  # no Content-Length: only counting as it arrives can refuse it
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    resp = await small.post("/v1/files", data=chunks(),
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    await assert_too_large(resp)


# -- declared sample rates -----------------------------------------------------------------------------------

def wav_declaring(rate: int, frames: int) -> bytes:
    """A 16-bit mono WAV whose header says ``rate``, holding ``frames`` frames of a tone."""
    samples = (np.sin(np.arange(frames) / 3) * 8000).astype("<i2").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVE" + b"fmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", len(samples))
    return header + samples


@pytest.mark.parametrize("rate", [1, 50, MIN_RATE - 1, MAX_RATE + 1])
def test_an_absurd_declared_rate_is_refused_before_decoding(rate: int) -> None:
    with pytest.raises(UnsupportedRate, match=f"sample rate of {rate} Hz"):
        open_audio(wav_declaring(rate, 50_000), 0)  # 0: no length limit; at 1 Hz, 50,000 s of audio


@pytest.mark.parametrize("rate", [MIN_RATE, 8000, 44100, MAX_RATE])
def test_real_rates_decode_to_their_length_at_16khz(rate: int) -> None:
    source = open_audio(wav_declaring(rate, rate // 2), 0)  # half a second
    decoded = source.read(0, 10 * 16000)
    assert source.duration == pytest.approx(0.5)
    assert abs(len(decoded) - 8000) <= 16  # what the clip lasts, at 16 kHz, and no more


async def test_a_wav_declaring_1_hz_gets_400(small) -> None:  # noqa: ANN001
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("file", io.BytesIO(wav_declaring(1, 16000)), filename="a.wav", content_type="audio/wav")
    form.add_field("model", "w")
    resp = await small.post("/v1/audio/transcriptions", data=form)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "file" and "sample rate of 1 Hz" in error["message"]
