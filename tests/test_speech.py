"""Text to speech on a stand-in Piper graph (same inputs and outputs) and on the real default voice."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import logging
from pathlib import Path

import numpy as np
import pytest

from conftest import DEFAULT_MODELS, default_model_configs, drain_until_closed, stalled_request, write_model_yaml
from localai_aio.config import ServerSettings
from tiny_models import STANDIN_SAMPLES_PER_PHONEME, write_standin_piper

pytestmark = pytest.mark.skipif(importlib.util.find_spec("piper") is None or
                                importlib.util.find_spec("soundfile") is None, reason="the tts extra is not installed")
SPEECH = "/v1/audio/speech"
TEXT = "Hello there. How are you today? I am fine, thank you."


@pytest.fixture
async def tts(make_client, tmp_path: Path):  # noqa: ANN001
    models = tmp_path / "models"
    write_standin_piper(models / "voice.onnx")
    write_standin_piper(models / "multi.onnx", speakers=("amy", "bob"))
    write_model_yaml(models, "voice", backend="piper", parameters={"model": "voice.onnx"}, aliases=["tts-1"],
                     voices={"alloy": "default", "echo": 0})
    write_model_yaml(models, "multi", backend="piper", parameters={"model": "multi.onnx"})
    (models / "t.gguf").write_bytes(b"GGUF")
    write_model_yaml(models, "chat", backend="llama-cpp", parameters={"model": "t.gguf"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    return client, models


def expected_samples(models: Path, text: str, length_scale: float = 1.0) -> int:
    """What Piper's own phonemization implies for the stand-in graph: 256 samples per phoneme id."""
    import json

    from piper.config import PiperConfig
    from piper.voice import PiperVoice

    config = PiperConfig.from_dict(json.loads((models / "voice.onnx.json").read_text()))
    voice = PiperVoice(session=None, config=config)
    ids = [len(voice.phonemes_to_ids(p)) for p in voice.phonemize(text)]
    return sum(int(n * STANDIN_SAMPLES_PER_PHONEME * length_scale) for n in ids)


def decode(data: bytes, fmt: str, rate: int = 22050) -> tuple[np.ndarray, int]:
    import soundfile

    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767, rate
    audio, sr = soundfile.read(io.BytesIO(data))
    return audio, sr


@pytest.mark.parametrize(("fmt", "content_type", "rate"), [
    ("wav", "audio/wav", 22050), ("pcm", "audio/pcm", 24000), ("flac", "audio/flac", 22050),
    ("mp3", "audio/mpeg", 22050), ("opus", "audio/ogg", 24000)])
async def test_every_format_decodes(tts, fmt: str, content_type: str, rate: int) -> None:  # noqa: ANN001
    client, models = tts
    resp = await client.post(SPEECH, json={"model": "voice", "input": TEXT, "voice": "alloy", "response_format": fmt})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == content_type
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    audio, sr = decode(await resp.read(), fmt, rate)
    assert sr == rate
    assert audio.ndim == 1  # mono
    seconds = expected_samples(models, TEXT) / 22050
    tolerance = 0.15 if fmt in ("mp3", "opus") else 2 / rate  # codec padding; resampling rounds
    assert abs(len(audio) / sr - seconds) <= tolerance, (len(audio) / sr, seconds)
    assert 0.3 < np.abs(audio).max() <= (1.0 if fmt in ("wav", "pcm", "flac") else 1.2)  # lossy codecs overshoot


async def test_default_format_is_mp3_and_speed_changes_length(tts) -> None:  # noqa: ANN001
    client, models = tts
    resp = await client.post(SPEECH, json={"model": "tts-1", "input": TEXT, "voice": "echo"})
    assert resp.headers["Content-Type"] == "audio/mpeg"
    for speed in (0.5, 2.0):
        resp = await client.post(SPEECH, json={"model": "voice", "input": TEXT, "voice": "alloy", "speed": speed,
                                               "response_format": "pcm"})
        audio, _ = decode(await resp.read(), "pcm", 24000)
        assert abs(len(audio) - expected_samples(models, TEXT, 1 / speed) * 24000 / 22050) <= 2


async def test_voices_select_speakers(tts) -> None:  # noqa: ANN001
    client, _ = tts

    async def pcm(voice: str) -> bytes:
        resp = await client.post(SPEECH, json={"model": "multi", "input": "Hi.", "voice": voice,
                                               "response_format": "pcm"})
        assert resp.status == 200, await resp.text()
        return await resp.read()

    amy, bob = await pcm("amy"), await pcm("bob")
    assert amy != bob and len(amy) == len(bob)
    assert await pcm("1") == bob and await pcm("0") == amy
    # A voice naming another configured voice model uses that model.
    via_voice = await client.post(SPEECH, json={"model": "multi", "input": "Hi.", "voice": "voice",
                                                "response_format": "pcm"})
    direct = await client.post(SPEECH, json={"model": "voice", "input": "Hi.", "response_format": "pcm"})
    assert via_voice.status == 200 and await via_voice.read() == await direct.read()


@pytest.mark.parametrize(("body", "param", "status", "fragment"), [
    ({"model": "voice", "input": ""}, "input", 400, "must not be empty"),
    ({"model": "voice", "input": "x" * 4097}, "input", 400, "at most 4096"),
    ({"model": "voice", "input": "hi", "voice": "zeus"}, "voice", 400, "alloy, echo, voice"),
    ({"model": "multi", "input": "hi", "voice": "carl"}, "voice", 400, "amy, bob, multi"),
    ({"model": "voice", "input": "hi", "response_format": "ogg"}, "response_format", 400, "supported"),
    ({"model": "voice", "input": "hi", "speed": 0.1}, "speed", 400, "0.25 to 4.0"),
    ({"model": "voice", "input": "hi", "speed": 5}, "speed", 400, "0.25 to 4.0"),
    ({"model": "voice", "input": "hi", "speed": "fast"}, "speed", 400, "number"),
    ({"model": "nope", "input": "hi"}, "model", 404, "does not exist"),
    ({"model": "chat", "input": "hi"}, "model", 400, "does not make speech"),
])
async def test_errors(tts, body: dict, param: str, status: int, fragment: str) -> None:  # noqa: ANN001
    client, _ = tts
    resp = await client.post(SPEECH, json=body)
    assert resp.status == status, await resp.text()
    err = (await resp.json())["error"]
    assert err["param"] == param and fragment in err["message"], err


async def test_elevenlabs_shape_and_resampling(tts) -> None:  # noqa: ANN001
    client, models = tts
    resp = await client.post("/v1/text-to-speech/alloy", params={"output_format": "pcm_16000"},
                             json={"text": TEXT, "model_id": "voice", "voice_settings": {"stability": 0.5}})
    assert resp.status == 200, await resp.text()
    audio, _ = decode(await resp.read(), "pcm")
    assert abs(len(audio) - expected_samples(models, TEXT) * 16000 / 22050) <= 2 * 3  # one rounding per sentence
    resp = await client.post("/v1/text-to-speech/amy", params={"output_format": "mp3_44100_128"},
                             json={"text": "Hi.", "model_id": "multi"})
    audio, sr = decode(await resp.read(), "mp3")
    assert sr == 44100 and resp.headers["Content-Type"] == "audio/mpeg"
    resp = await client.post("/v1/text-to-speech/alloy", params={"output_format": "ogg_1"}, json={"text": "Hi."})
    detail = (await resp.json())["detail"]  # ElevenLabs' error shape on its routes
    assert resp.status == 400 and detail["param"] == "output_format" and detail["status"] == "invalid_request_error"
    assert "ogg_1" in detail["message"]


async def test_localai_tts_route(tts) -> None:  # noqa: ANN001
    client, models = tts
    resp = await client.post("/tts", json={"model": "voice", "input": TEXT})
    assert resp.headers["Content-Type"] == "audio/wav"
    audio, sr = decode(await resp.read(), "wav")
    assert sr == 22050 and len(audio) == expected_samples(models, TEXT)


async def test_localai_path_without_v1(tts) -> None:  # noqa: ANN001
    client, models = tts
    resp = await client.post("/audio/speech", json={"model": "voice", "input": TEXT, "response_format": "wav"})
    assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
    audio, sr = decode(await resp.read(), "wav")
    assert sr == 22050 and len(audio) == expected_samples(models, TEXT)


async def test_control_characters_are_read_as_spaces(tts) -> None:  # noqa: ANN001
    """espeak refuses a NUL; the text is still spoken (it used to end the audio after the 200)."""
    client, models = tts
    resp = await client.post("/tts", json={"model": "voice", "input": TEXT.replace(" ", "\x00", 1) + "\x07"})
    assert resp.status == 200
    audio, _ = decode(await resp.read(), "wav")
    assert len(audio) == expected_samples(models, TEXT)


async def test_streams_and_stops_when_the_client_leaves(tts, caplog) -> None:  # noqa: ANN001
    client, _ = tts
    text = " ".join(f"This is sentence number {i} of a long text." for i in range(300))[:4096]
    sentences = text.count(".")
    with caplog.at_level(logging.INFO, logger="localai_aio.api.speech_jobs"):
        resp = await client.post(SPEECH, json={"model": "voice", "input": text, "speed": 0.25,
                                               "response_format": "pcm"})
        first = await resp.content.readany()
        assert first  # audio arrives while the text is still being synthesized
        resp.close()  # the client leaves
        for _ in range(100):
            await asyncio.sleep(0.05)
            if "client left during speech" in caplog.text:
                break
    metrics = await (await client.get("/metrics")).text()
    done = next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith('localai_tts_sentences_total{model="voice"}'))
    assert 1 <= done < sentences
    assert "client left during speech from voice" in caplog.text


@pytest.mark.model
async def test_default_voice_says_hello(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    configs = default_model_configs("en-us-joe-medium")
    client = await make_client(ServerSettings(models_path=str(DEFAULT_MODELS), config_dir=str(tmp_path / "d")),
                               model_configs=configs)
    resp = await client.post(SPEECH, json={"model": "tts-1", "input": "Hello from the local server",
                                           "voice": "alloy", "response_format": "wav"})
    assert resp.status == 200
    audio, sr = decode(await resp.read(), "wav")
    assert sr == 22050 and audio.ndim == 1
    assert 0.8 <= len(audio) / sr <= 3.0
    assert np.abs(audio).max() > 0.1
    # Transcribing it back with the default Whisper: tests/test_transcription.py::test_tts_round_trip


async def test_failure_mid_stream_ends_the_audio_and_the_server_keeps_serving(tts, monkeypatch, caplog) -> None:  # noqa: ANN001
    from localai_aio.backends import piper_tts

    client, _ = tts
    original = piper_tts.PiperEngine.synthesize

    def breaks_after_one(self, text, **kwargs):  # noqa: ANN001, ANN202
        for i, chunk in enumerate(original(self, text, **kwargs)):
            if i == 1:
                raise RuntimeError("voice failed")
            yield chunk

    monkeypatch.setattr(piper_tts.PiperEngine, "synthesize", breaks_after_one)
    resp = await client.post(SPEECH, json={"model": "voice", "input": TEXT, "response_format": "pcm"})
    assert resp.status == 200  # the first sentence was already on its way
    import aiohttp

    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # the stream is cut, not finished: the client can tell the audio is incomplete
    assert "speech from voice failed after 1 sentence(s)" in caplog.text
    monkeypatch.setattr(piper_tts.PiperEngine, "synthesize", original)
    ok = await client.post(SPEECH, json={"model": "voice", "input": "Hi.", "response_format": "pcm"})
    assert ok.status == 200 and len(await ok.read()) > 0


async def test_a_client_that_stops_reading_does_not_hold_the_voice(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    """The audio of a long text waits in the server, not in the engine: once it is synthesized the voice
    serves the next request at once (with no queue: a held voice would answer 503), and after
    --write-timeout the stalled connection is dropped."""
    models = tmp_path / "models"
    write_standin_piper(models / "voice.onnx")
    write_model_yaml(models, "voice", backend="piper", parameters={"model": "voice.onnx"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                              queue_size=0, write_timeout=1.5))
    text = " ".join(f"This is sentence number {i} of a long text." for i in range(300))[:4096]
    sock = await stalled_request(client, SPEECH, {"model": "voice", "input": text, "response_format": "wav"})
    try:
        for _ in range(400):  # synthesis of the whole text ends
            report = await (await client.get("/metrics")).text()
            if 'localai_inference_duration_seconds_count{model="voice",task="speech"} 1.0' in report:
                break
            await asyncio.sleep(0.05)
        assert 'localai_inference_duration_seconds_count{model="voice",task="speech"} 1.0' in report
        second = await client.post(SPEECH, json={"model": "voice", "input": "Hi.", "response_format": "wav"})
        assert second.status == 200 and (await second.read())[:4] == b"RIFF"
        await asyncio.sleep(2.5)  # past the write timeout
        received = await drain_until_closed(sock)
        assert received.startswith(b"HTTP/1.1 200")
        assert not received.endswith(b"0\r\n\r\n")  # the chunked body never ended: the connection was dropped
    finally:
        sock.close()


async def test_streamed_wav_reads_with_the_standard_readers(tts) -> None:  # noqa: ANN001
    """A WAV streamed before its length is known still opens with Python's wave module, soundfile and
    FFmpeg (its own demuxer and decoder, through PyAV)."""
    import wave

    import av
    import soundfile

    client, models = tts
    data = await (await client.post(SPEECH, json={"model": "voice", "input": TEXT, "response_format": "wav"})).read()
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (22050, 1, 2)
        frames = wav.readframes(10**9)
    assert len(frames) // 2 == expected_samples(models, TEXT)
    audio, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    assert rate == 22050 and len(audio) == expected_samples(models, TEXT)
    assert np.array_equal(audio, np.frombuffer(frames, "<i2"))
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        assert (container.format.name, stream.codec_context.name, stream.rate) == ("wav", "pcm_s16le", 22050)
        decoded = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(stream)])
    assert np.array_equal(decoded, audio)


async def test_aac_streams_and_decodes(tts) -> None:  # noqa: ANN001
    """AAC (ADTS frames, which play as they arrive), decoded back with FFmpeg through PyAV."""
    import av

    client, models = tts
    for path, body, rate in [(SPEECH, {"model": "voice", "input": TEXT, "response_format": "aac"}, 22050),
                             ("/v1/text-to-speech/voice?output_format=aac_24000", {"text": TEXT}, 24000)]:
        resp = await client.post(path, json=body)
        assert resp.status == 200 and resp.headers["Content-Type"] == "audio/aac"
        with av.open(io.BytesIO(await resp.read())) as container:
            stream = container.streams.audio[0]
            assert (container.format.name, stream.rate, stream.codec_context.channels) == ("aac", rate, 1)
            audio = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(stream)])
        seconds = expected_samples(models, TEXT) / 22050
        assert abs(len(audio) / rate - seconds) < 0.15  # the encoder's priming and padding
        assert 0.3 < np.abs(audio).max() < 2.0  # the stand-in voice is harsh: AAC rings on it
