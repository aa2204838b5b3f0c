"""ElevenLabs' text-to-speech API driven by the official ``elevenlabs`` SDK against a server process:
formats and bitrates, streaming, character timestamps, the voice list and ElevenLabs' error shape.

The stand-in voice computes its phoneme durations as a VITS voice does (each phoneme id lasts 256
samples), so the character times it leads to are known exactly from Piper's own phonemization."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from collections.abc import Iterator

import numpy as np
import pytest

from conftest import DEFAULT_MODELS, ServerProcess, default_model_configs, write_model_yaml
from localai_aio.audio.speech_timing import character_times, sentences
from tiny_models import STANDIN_SAMPLES_PER_PHONEME, write_standin_piper

pytestmark = pytest.mark.skipif(importlib.util.find_spec("piper") is None or importlib.util.find_spec("av") is None
                                or importlib.util.find_spec("elevenlabs") is None,
                                reason="the tts extra or the elevenlabs SDK is not installed")
TEXT = "Hello there. How are you today?"
RATE = 22050


# -- character times, without a voice ------------------------------------------------------------------------

def test_words_get_their_phonemes_time_and_pauses_go_between() -> None:
    phonemes = [("^", 0.1), ("h", 0.1), ("aɪ", 0.1), (",", 0.2), (" ", 0.1), ("j", 0.1), ("u", 0.1), (".", 0.1),
                ("$", 0.1)]
    times = character_times("Hi, you.", phonemes, 0.9, offset=2.0)
    assert [c for c, _, _ in times] == list("Hi, you.")
    expected = [(2.1, 2.2), (2.2, 2.3), (2.3, 2.45), (2.45, 2.6), (2.6, 2.6667), (2.6667, 2.7333), (2.7333, 2.8),
                (2.8, 2.9)]
    np.testing.assert_allclose([(a, b) for _, a, b in times], expected, atol=1e-4)


def test_unmatched_words_share_the_sentence_in_proportion() -> None:
    """espeak reads "42" as two words: the word counts differ, and the time is shared evenly."""
    phonemes = [("f", 0.2), ("ɔ", 0.2), (" ", 0.1), ("t", 0.2), ("u", 0.3)]
    times = character_times("42", phonemes, 1.0)
    assert times == [("4", 0.0, 0.5), ("2", 0.5, 1.0)]
    assert character_times("ok", None, 0.5) == [("o", 0.0, 0.25), ("k", 0.25, 0.5)]


def test_sentences_keep_every_character() -> None:
    text = "Hello there.  How are you today?! Fine... thanks"
    parts = sentences(text)
    assert "".join(parts) == text and parts[0] == "Hello there.  " and parts[-1] == "thanks"


# -- the SDK against a server ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("elevenlabs")
    models = folder / "models"
    write_standin_piper(models / "voice.onnx", durations=True)
    write_standin_piper(models / "plain.onnx")  # no durations: characters share each sentence's time
    write_model_yaml(models, "voice", backend="piper", parameters={"model": "voice.onnx"},
                     voices={"rachel": "default"})
    write_model_yaml(models, "plain", backend="piper", parameters={"model": "plain.onnx"})
    server = ServerProcess(["--models-path", str(models), "--config-dir", str(folder / "data"), "--threads", "1"],
                           cwd=folder)
    server.start(folder / "server.log")
    yield server
    server.stop()


def sdk(url: str):  # noqa: ANN201
    """The official client, on an HTTP client the test closes."""
    import httpx
    from elevenlabs.client import ElevenLabs

    http = httpx.Client(timeout=120)
    return ElevenLabs(base_url=url, api_key="x", httpx_client=http), http


@pytest.fixture(scope="module")
def client(server: ServerProcess):  # noqa: ANN201
    api, http = sdk(server.url)
    with http:
        yield api


def stream_info(data: bytes) -> tuple[int, int, int]:
    """(sample rate, bit rate, samples) of an encoded stream, read by FFmpeg."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.codec_context.sample_rate, stream.codec_context.bit_rate, samples


def spoken_samples(text: str) -> int:
    """The stand-in's length for ``text``: 256 samples per phoneme id of Piper's phonemization."""
    from piper.config import PiperConfig
    from piper.voice import PiperVoice

    config = PiperConfig.from_dict({"audio": {"sample_rate": RATE}, "espeak": {"voice": "en-us"},
                                    "inference": {}, "phoneme_type": "espeak", "num_symbols": 1, "num_speakers": 1,
                                    "phoneme_id_map": {s: [i] for i, s in enumerate(
                                        ["_", "^", "$", " "] + [chr(c) for c in range(33, 127)]
                                        + [chr(c) for c in range(0xA0, 0x370)])}})
    voice = PiperVoice(session=None, config=config)
    return sum(len(voice.phonemes_to_ids(p)) * STANDIN_SAMPLES_PER_PHONEME for p in voice.phonemize(text))


@pytest.mark.parametrize(("output_format", "rate", "kbps"), [
    ("mp3_44100_128", 44100, 128), ("mp3_22050_32", 22050, 32), ("mp3_44100_192", 44100, 192)])
def test_mp3_bitrate_is_what_was_asked(client, output_format: str, rate: int, kbps: int) -> None:  # noqa: ANN001
    data = b"".join(client.text_to_speech.convert(voice_id="voice", text=TEXT, output_format=output_format))
    sample_rate, bit_rate, samples = stream_info(data)
    assert (sample_rate, bit_rate) == (rate, kbps * 1000)
    assert abs(samples - spoken_samples(TEXT) * rate / RATE) < 0.1 * rate  # MP3's delay and padding only


def test_stream_comes_sentence_by_sentence(client) -> None:  # noqa: ANN001
    chunks = list(client.text_to_speech.stream(voice_id="voice", text=TEXT, output_format="pcm_22050"))
    audio = np.frombuffer(b"".join(chunks), dtype="<i2")
    assert len(audio) == spoken_samples(TEXT)
    assert len(chunks) >= 2  # the first sentence went out before the second was made


def test_ulaw_8000_is_g711_of_the_same_speech(client) -> None:  # noqa: ANN001
    ulaw = np.frombuffer(b"".join(client.text_to_speech.convert(voice_id="voice", text=TEXT,
                                                                 output_format="ulaw_8000")), np.uint8)
    pcm = np.frombuffer(b"".join(client.text_to_speech.convert(voice_id="voice", text=TEXT,
                                                                output_format="pcm_8000")), "<i2") / 32768
    assert abs(len(ulaw) - len(pcm)) <= 4  # one byte per sample at 8 kHz
    # G.711 u-law decoding (ITU-T): complement, then sign, exponent and mantissa
    u = ~ulaw.astype(np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    decoded = np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84) / 32768
    n = min(len(decoded), len(pcm))
    assert np.corrcoef(decoded[:n], pcm[:n])[0, 1] > 0.99


def test_with_timestamps_times_each_character_from_phoneme_durations(client) -> None:  # noqa: ANN001
    result = client.text_to_speech.convert_with_timestamps(voice_id="voice", text=TEXT, output_format="pcm_22050")
    audio = np.frombuffer(base64.b64decode(result.audio_base_64), "<i2")
    timing = result.alignment
    assert "".join(timing.characters) == TEXT and result.normalized_alignment.characters == timing.characters
    starts, ends = timing.character_start_times_seconds, timing.character_end_times_seconds
    assert all(a <= b for a, b in zip(starts, ends, strict=True)) and starts == sorted(starts)
    assert abs(ends[-1] - len(audio) / RATE) < 0.002
    # "there" starts after "Hello" and the word break: Piper's ids for "Hello" alone are the sentence
    # start (2 with its pad), the word's phonemes (2 each) and the sentence end (1); here the break (2)
    # takes the end's place
    first = sentences(TEXT)[0]
    before_there = spoken_samples("Hello") // STANDIN_SAMPLES_PER_PHONEME - 1 + 2
    assert starts[TEXT.index("there")] == pytest.approx(before_there * STANDIN_SAMPLES_PER_PHONEME / RATE, abs=0.002)
    # the first sentence's characters end where its audio ends; the second's start after its own opening
    assert ends[len(first) - 1] == pytest.approx(spoken_samples(first) / RATE, abs=0.002)
    assert starts[len(first)] == pytest.approx((spoken_samples(first) + 2 * STANDIN_SAMPLES_PER_PHONEME) / RATE,
                                               abs=0.002)


def test_stream_with_timestamps_sends_each_sentence_with_its_characters(client) -> None:  # noqa: ANN001
    parts = list(client.text_to_speech.stream_with_timestamps(voice_id="voice", text=TEXT,
                                                              output_format="pcm_22050"))
    timed = [p for p in parts if p.alignment and p.alignment.characters]
    assert ["".join(p.alignment.characters) for p in timed] == sentences(TEXT)
    audio = b"".join(base64.b64decode(p.audio_base_64) for p in parts)
    assert len(audio) // 2 == spoken_samples(TEXT)


def test_a_voice_without_durations_still_times_its_characters(client) -> None:  # noqa: ANN001
    result = client.text_to_speech.convert_with_timestamps(voice_id="plain", text=TEXT, output_format="pcm_22050")
    starts = result.alignment.character_start_times_seconds
    assert "".join(result.alignment.characters) == TEXT and starts == sorted(starts)


def test_voices_lists_the_installed_ones(client) -> None:  # noqa: ANN001
    voices = {v.voice_id: v for v in client.voices.get_all().voices}
    assert {"voice", "plain", "voice:rachel"} <= set(voices)
    assert voices["voice:rachel"].name == "rachel" and voices["voice"].category == "premade"
    data = b"".join(client.text_to_speech.convert(voice_id="voice:rachel", text="Hi.", output_format="pcm_22050"))
    assert len(data) // 2 == spoken_samples("Hi.")


def test_errors_are_in_elevenlabs_shape(client, server: ServerProcess) -> None:  # noqa: ANN001
    from elevenlabs.core.api_error import ApiError

    with pytest.raises(ApiError) as caught:
        b"".join(client.text_to_speech.convert(voice_id="voice", text=TEXT, output_format="mp3_44100_100"))
    assert caught.value.status_code == 400
    body = caught.value.body if isinstance(caught.value.body, dict) else json.loads(caught.value.body)
    assert body["detail"]["param"] == "output_format" and "128" in body["detail"]["message"]
    with pytest.raises(ApiError) as caught:
        b"".join(client.text_to_speech.convert(voice_id="nobody", text=TEXT))
    assert caught.value.status_code == 400 and "Unknown voice 'nobody'" in json.dumps(caught.value.body)


@pytest.mark.model
def test_real_voice_times_words_where_they_are_spoken(server_process, tmp_path) -> None:  # noqa: ANN001
    """The default Piper voice: its own phoneme durations. Each word's span holds speech; the pause at
    the comma is quieter than the words around it."""
    default_model_configs("en-us-joe-medium")
    real = server_process("--models-path", str(DEFAULT_MODELS), "--config-dir", str(tmp_path / "d"), "--threads", "2")
    api, http = sdk(real.url)
    text = "Seven, and then eleven."
    with http:
        result = api.text_to_speech.convert_with_timestamps(voice_id="en-us-joe-medium", text=text,
                                                             output_format="pcm_22050")
    audio = np.frombuffer(base64.b64decode(result.audio_base_64), "<i2") / 32768
    timing = result.alignment
    assert "".join(timing.characters) == text

    def loudness(first: int, last: int) -> float:
        a = int(timing.character_start_times_seconds[first] * RATE)
        b = int(timing.character_end_times_seconds[last] * RATE)
        return float(np.sqrt(np.mean(audio[a:b] ** 2)))

    seven, comma = loudness(0, 4), loudness(5, 6)
    eleven = loudness(text.index("eleven"), text.index("eleven") + 5)
    assert seven > 2 * comma and eleven > 2 * comma
