"""Speech to text: features, the CTranslate2 converter, a tiny random Whisper through the whole path,
and the real default Whisper (marked)."""

from __future__ import annotations

import gc
import importlib.util
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import DEFAULT_MODELS, default_model_configs, write_model_yaml
from localai_aio.config import ServerSettings

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "soundfile", "soxr")),
                                reason="the stt extra is not installed")
needs_export = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("optimum", "transformers")),
                                  reason="the export tool chain is not installed")
T = "/v1/audio/transcriptions"


def wav_bytes(audio: np.ndarray, rate: int = 16000, fmt: str = "WAV", channels: int = 1) -> bytes:
    import soundfile

    data = np.stack([audio] * channels, axis=1) if channels > 1 else audio
    buffer = io.BytesIO()
    soundfile.write(buffer, data, rate, format=fmt)
    return buffer.getvalue()


def tone(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2).astype(np.float32)


def form(data: bytes, filename: str = "a.wav", **fields: str):  # noqa: ANN201
    import aiohttp

    body = aiohttp.FormData()
    body.add_field("file", io.BytesIO(data), filename=filename, content_type="application/octet-stream")
    for key, value in fields.items():
        body.add_field(key.replace("__", "[]"), value)
    return body


@needs_export
def test_features_match_transformers() -> None:
    from transformers import WhisperFeatureExtractor

    from localai_aio.backends.whisper_features import N_FRAMES, window_features

    audio = tone(3.0)
    for n_mels in (80, 128):
        reference = WhisperFeatureExtractor(feature_size=n_mels)(audio, sampling_rate=16000,
                                                                 return_tensors="np").input_features[0]
        mine = window_features(audio, n_mels)
        assert mine.shape == (n_mels, N_FRAMES)
        np.testing.assert_allclose(mine, reference, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None or importlib.util.find_spec("optimum") is None,
                    reason="ctranslate2 and the export tool chain are needed")
def test_ct2_converter_round_trip(tmp_path: Path) -> None:
    """transformers -> CTranslate2 (its own converter) -> transformers (ours): every tensor matches."""
    import ctranslate2
    from transformers import WhisperForConditionalGeneration

    from localai_aio.gallery.ct2_whisper import convert, read_model_bin, to_transformers_state
    from tiny_models import save_tiny_whisper

    source = save_tiny_whisper(tmp_path / "hf")
    ctranslate2.converters.TransformersConverter(str(source)).convert(str(tmp_path / "ct2"), quantization="float32")
    state, config = to_transformers_state(read_model_bin(tmp_path / "ct2" / "model.bin"))
    reference = WhisperForConditionalGeneration.from_pretrained(source).state_dict()
    assert set(reference) == set(state)
    for name, tensor in reference.items():
        np.testing.assert_array_equal(state[name], tensor.numpy(), err_msg=name)
    assert config["d_model"] == 32 and config["encoder_attention_heads"] == 2 and config["vocab_size"] == 51865
    (tmp_path / "ct2" / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    rebuilt = WhisperForConditionalGeneration.from_pretrained(convert(tmp_path / "ct2", tmp_path / "back"))
    for name, tensor in rebuilt.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), reference[name].numpy(), err_msg=name)


def reference_dtw(cost: np.ndarray) -> np.ndarray:
    """openai-whisper's ``dtw_cpu`` and ``backtrace``, cell by cell, to check the vectorised one against."""
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0
    trace = np.zeros((n + 1, m + 1), int)
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
            step = 0 if c0 < c1 and c0 < c2 else 1 if c1 < c0 and c1 < c2 else 2
            total[i, j] = cost[i - 1, j - 1] + (c0, c1, c2)[step]
            trace[i, j] = step
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        i, j = (i - 1, j - 1) if trace[i, j] == 0 else (i - 1, j) if trace[i, j] == 1 else (i, j - 1)
    return np.array(path[::-1]).T


def test_dtw_and_filters_match_whispers() -> None:
    from localai_aio.backends.onnx_whisper import alignment_matrix, dtw, median_filter

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 1), (1, 4), (6, 40), (25, 160)]:
        cost = rng.standard_normal(shape)
        np.testing.assert_array_equal(np.array(dtw(cost)), reference_dtw(cost))
        ties = rng.integers(0, 3, shape).astype(np.float64)  # equal costs: the same tie-breaking
        np.testing.assert_array_equal(np.array(dtw(ties)), reference_dtw(ties))
    x = rng.standard_normal((2, 3, 12)).astype(np.float32)
    padded = np.pad(x, [(0, 0), (0, 0), (3, 3)], mode="reflect")
    expected = np.median(np.stack([padded[..., k:k + 12] for k in range(7)]), axis=0)
    np.testing.assert_allclose(median_filter(x, 7), expected)
    np.testing.assert_array_equal(median_filter(x[..., :3], 7), x[..., :3])  # too short to filter, as Whisper
    weights = rng.random((2, 5, 30)).astype(np.float32)
    standard = (weights - weights.mean(axis=1, keepdims=True)) / weights.std(axis=1, keepdims=True)
    np.testing.assert_allclose(alignment_matrix(weights), median_filter(standard, 7).mean(axis=0), rtol=1e-5)


def test_a_diagonal_attention_gives_evenly_spaced_tokens() -> None:
    """Token k attends to frames 10k..10k+9: DTW puts token k's start at frame 10k."""
    from localai_aio.backends.onnx_whisper import alignment_matrix, dtw

    weights = np.full((2, 6, 60), 0.01, np.float32)
    for k in range(6):
        weights[:, k, 10 * k:10 * k + 10] = 1.0
    rows, cols = dtw(-alignment_matrix(weights))
    starts = [int(cols[np.argmax(rows == k)]) for k in range(6)]
    assert starts == [0, 10, 20, 30, 40, 50]


@needs_export
def test_alignment_graph_is_the_decoders_cross_attention(tmp_path: Path) -> None:
    """The exported graph returns exactly transformers' cross-attention weights of the named heads, for any
    number of tokens."""
    import onnxruntime as ort
    import torch
    from transformers import WhisperForConditionalGeneration

    from tiny_models import export_tiny_whisper_alignment

    source, graph = export_tiny_whisper_alignment(tmp_path, heads=[[0, 1]])
    model = WhisperForConditionalGeneration.from_pretrained(source, attn_implementation="eager").eval()
    session = ort.InferenceSession(str(graph))
    encoded = np.random.default_rng(0).standard_normal((1, 1500, 32)).astype(np.float32)
    for ids in ([[50258, 50259, 50359, 50363, 300, 301, 50257]], [[50258, 50363, 50257]]):
        with torch.no_grad():
            expected = model.model.decoder(input_ids=torch.tensor(ids), encoder_hidden_states=torch.from_numpy(encoded),
                                           output_attentions=True).cross_attentions[0][0, 1].numpy()
        [got] = session.run(None, {"input_ids": np.array(ids, np.int64), "encoder_hidden_states": encoded})
        assert got.shape == (1, len(ids[0]), 1500)
        np.testing.assert_allclose(got[0], expected, atol=1e-5)
    _, fallback = export_tiny_whisper_alignment(tmp_path / "fallback")  # no heads known: every head of layer 0
    [got] = ort.InferenceSession(str(fallback)).run(None, {"input_ids": np.array([[50258, 50257]], np.int64),
                                                          "encoder_hidden_states": encoded})
    assert got.shape == (2, 2, 1500)


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("optimum") is None:
        pytest.skip("the export tool chain is not installed")
    from tiny_models import export_tiny_whisper

    return export_tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture
async def wclient(make_client, tmp_path: Path, tiny_whisper: Path):  # noqa: ANN001
    models = tmp_path / "models"
    shutil.copytree(tiny_whisper, models / "tiny-whisper")
    write_model_yaml(models, "whisper", backend="onnx-whisper", parameters={"model": "tiny-whisper"},
                     aliases=["whisper-1"])
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                              upload_limit=2))
    return client


async def test_every_response_format(wclient) -> None:  # noqa: ANN001
    audio = wav_bytes(tone(4.0))
    body = await (await wclient.post(T, data=form(audio, model="whisper-1", language="en"))).json()
    assert set(body) == {"text"} and isinstance(body["text"], str)
    resp = await wclient.post(T, data=form(audio, model="whisper", language="en", response_format="text"))
    assert resp.headers["Content-Type"].startswith("text/plain") and (await resp.text()).endswith("\n")
    verbose = await (await wclient.post(T, data=form(audio, model="whisper", language="en",
                                                     response_format="verbose_json"))).json()
    assert set(verbose) == {"task", "language", "duration", "text", "segments"}
    assert verbose["task"] == "transcribe" and verbose["language"] == "english" and verbose["duration"] == 4.0
    for seg in verbose["segments"]:
        assert set(seg) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                            "compression_ratio", "no_speech_prob"}
        assert 0 <= seg["start"] <= seg["end"] and len(seg["tokens"]) <= 224  # decoding stops at a sane limit
    srt = await (await wclient.post(T, data=form(audio, model="whisper", language="en", response_format="srt"))).text()
    vtt = await (await wclient.post(T, data=form(audio, model="whisper", language="en", response_format="vtt"))).text()
    assert vtt.startswith("WEBVTT\n\n")
    stamp = r"\d\d:\d\d:\d\d[,.]\d{3} --> \d\d:\d\d:\d\d[,.]\d{3}"
    assert len(re.findall(stamp, srt)) == len(re.findall(stamp, vtt)) == len(verbose["segments"])


async def test_long_audio_in_windows_and_formats(wclient) -> None:  # noqa: ANN001
    audio = tone(70.0, rate=8000)  # > 2 windows, another rate, stereo, flac
    resp = await wclient.post(T, data=form(wav_bytes(audio, 8000, "FLAC", channels=2), "a.flac", model="whisper",
                                           language="en", response_format="verbose_json"))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["duration"] == 70.0
    seeks = [s["seek"] for s in body["segments"]]
    assert seeks == sorted(seeks)
    starts = [s["start"] for s in body["segments"]]
    assert starts == sorted(starts) and all(s["end"] <= 70.0 + 30 for s in body["segments"])


def test_windows_encoded_in_batches_give_what_one_at_a_time_gives(tiny_whisper: Path) -> None:
    """Windows encoded ahead in one run (``encoder_batch``) give the same text, segments, word times and
    seeks as windows encoded one at a time; digital silence between them is still skipped unheard."""
    from localai_aio.audio.codecs import open_audio
    from localai_aio.backends.onnx_whisper import load
    from localai_aio.config import ModelConfig
    from localai_aio.runtime import CancelFlag

    audio = np.concatenate([tone(40.0), np.zeros(16000 * 31, np.float32), tone(25.0)])
    clip = wav_bytes(audio)
    results, runs = {}, {}
    for batch in (1, 3):
        cfg = ModelConfig(name="w", backend="onnx-whisper", model_path=tiny_whisper, threads=1,
                          extra={"encoder_batch": batch})
        engine = load(cfg, ServerSettings(threads=1))
        runs[batch] = []
        encode = engine._encode
        engine._encode = lambda features, runs=runs[batch], encode=encode: (runs.append(len(features)),
                                                                            encode(features))[1]
        result = engine.transcribe(open_audio(clip), language="en", task="transcribe", prompt=None,
                                   temperature=0.0, cancel=CancelFlag(), words=True)
        results[batch] = (result.text, [(s.seek, s.start, s.end, s.text, s.tokens) for s in result.segments],
                          [(w.word, w.start, w.end) for w in result.words])
    assert results[3] == results[1]
    assert set(runs[1]) == {1} and max(runs[3]) > 1  # windows really went through the encoder together
    assert sum(runs[1]) <= sum(runs[3])


async def test_silence_and_empty_audio_give_empty_text(wclient) -> None:  # noqa: ANN001
    for audio in (np.zeros(16000 * 3, np.float32), np.zeros(0, np.float32)):
        resp = await wclient.post(T, data=form(wav_bytes(audio), model="whisper"))
        assert resp.status == 200
        assert await resp.json() == {"text": ""}


async def test_prompt_is_accepted(wclient) -> None:  # noqa: ANN001
    resp = await wclient.post(T, data=form(wav_bytes(tone(2.0)), model="whisper", language="en",
                                           prompt="Hello world, the dog.", response_format="verbose_json"))
    assert resp.status == 200 and (await resp.json())["task"] == "transcribe"


async def test_language_detection_and_translation(wclient) -> None:  # noqa: ANN001
    audio = wav_bytes(tone(2.0))
    body = await (await wclient.post(T, data=form(audio, model="whisper", response_format="verbose_json"))).json()
    from localai_aio.backends.whisper_languages import NAMES

    assert body["language"] in NAMES.values()  # detected (random weights: any language), named as OpenAI does
    resp = await wclient.post("/v1/audio/translations", data=form(audio, model="whisper",
                                                                  response_format="verbose_json"))
    assert resp.status == 200 and (await resp.json())["task"] == "translate"


@pytest.mark.parametrize(("data", "fields", "param", "status"), [
    (b"not audio at all", {"model": "whisper"}, "file", 400),
    (None, {"model": "whisper"}, "file", 400),
    ("wav", {"model": "whisper", "response_format": "xml"}, "response_format", 400),
    ("wav", {"model": "whisper", "language": "klingon"}, "language", 400),
    ("wav", {"model": "whisper", "temperature": "hot"}, "temperature", 400),
    ("wav", {"model": "whisper", "timestamp_granularities__": "word"}, "timestamp_granularities", 400),
    ("wav", {"model": "nope"}, "model", 404),
    ("big", {"model": "whisper"}, None, 413),
])
async def test_errors(wclient, data, fields: dict, param: str | None, status: int) -> None:  # noqa: ANN001
    import aiohttp

    if data == "wav":
        data = wav_bytes(tone(1.0))
    elif data == "big":
        data = b"\0" * (3 * 1024 * 1024)
    if data is None:
        body = aiohttp.FormData(default_to_multipart=True)
        for key, value in fields.items():
            body.add_field(key, value)
    else:
        body = form(data, **fields)
    resp = await wclient.post(T, data=body)
    assert resp.status == status, await resp.text()
    err = (await resp.json())["error"]
    if param:
        assert err["param"] == param
    assert (await wclient.get("/healthz")).status == 200


# -- word timestamps ---------------------------------------------------------------------------------------

def check_words(body: dict) -> None:
    """Words in order, inside the clip, and spelling the text."""
    words = body["words"]
    assert words and all(set(w) == {"word", "start", "end"} for w in words)
    assert all(0 <= w["start"] <= w["end"] <= body["duration"] for w in words)
    starts, ends = [w["start"] for w in words], [w["end"] for w in words]
    assert starts == sorted(starts) and ends == sorted(ends)
    assert "".join(w["word"] for w in words) == "".join(body["text"].split())
    assert all(w["word"] == w["word"].strip() for w in words)


@pytest.mark.parametrize("seconds", [4.0, 40.0])  # one window; two (offsets of the second)
async def test_word_timestamps(wclient, seconds: float) -> None:  # noqa: ANN001
    audio = wav_bytes(tone(seconds))
    resp = await wclient.post(T, data=form(audio, model="whisper", language="en", response_format="verbose_json",
                                           timestamp_granularities__="word"))
    assert resp.status == 200, await resp.text()
    words_only = await resp.json()
    assert set(words_only) == {"task", "language", "duration", "text", "words"}  # OpenAI: no segments then
    check_words(words_only)
    ask = form(audio, model="whisper", language="en", response_format="verbose_json")
    ask.add_field("timestamp_granularities[]", "word")
    ask.add_field("timestamp_granularities[]", "segment")
    both = await (await wclient.post(T, data=ask)).json()
    segments_only = await (await wclient.post(T, data=form(audio, model="whisper", language="en",
                                                           response_format="verbose_json",
                                                           timestamp_granularities__="segment"))).json()
    assert set(both) == {"task", "language", "duration", "text", "segments", "words"}
    assert both["words"] == words_only["words"] and both["segments"] == segments_only["segments"]
    assert both["text"] == segments_only["text"] == words_only["text"]  # timing words changes no text


@pytest.mark.parametrize(("path", "fields", "message"), [
    (T, {"response_format": "json"}, "verbose_json"),
    (T, {"response_format": "srt"}, "verbose_json"),
    (T, {"response_format": "text"}, "verbose_json"),
    ("/v1/audio/translations", {"response_format": "verbose_json"}, "transcriptions only"),
])
async def test_word_timestamps_need_verbose_json(wclient, path: str, fields: dict, message: str) -> None:  # noqa: ANN001
    resp = await wclient.post(path, data=form(wav_bytes(tone(1.0)), model="whisper", timestamp_granularities__="word",
                                              **fields))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "timestamp_granularities" and message in error["message"]
    ok = await wclient.post(T, data=form(wav_bytes(tone(1.0)), model="whisper", timestamp_granularities__="segment"))
    assert ok.status == 200 and set(await ok.json()) == {"text"}  # 'segment' with json: accepted, as OpenAI does


async def test_a_model_without_the_alignment_graph_says_how_to_add_it(make_client, tmp_path: Path,
                                                                      tiny_whisper: Path) -> None:  # noqa: ANN001
    from localai_aio.backends.onnx_whisper import ALIGNMENT_FILE

    models = tmp_path / "models"
    shutil.copytree(tiny_whisper, models / "old-whisper")
    (models / "old-whisper" / ALIGNMENT_FILE).unlink()  # as exported before word timestamps
    write_model_yaml(models, "old", backend="onnx-whisper", parameters={"model": "old-whisper"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    resp = await client.post(T, data=form(wav_bytes(tone(2.0)), model="old", response_format="verbose_json",
                                          timestamp_granularities__="word"))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "timestamp_granularities"
    assert ALIGNMENT_FILE in error["message"] and "localai-aio models install old" in error["message"]
    plain = await client.post(T, data=form(wav_bytes(tone(2.0)), model="old", response_format="verbose_json"))
    assert plain.status == 200 and "segments" in await plain.json()  # everything else still works


@needs_export
def test_install_adds_the_alignment_graph_to_an_older_whisper_install(tmp_path: Path, tiny_whisper: Path) -> None:
    """An install made before word timestamps (no alignment graph) is not complete; installing again exports
    only the graph, from the transformers folder the install kept, and fetches nothing."""
    import onnx

    from localai_aio.backends.onnx_whisper import ALIGNMENT_FILE
    from localai_aio.gallery.install import GalleryEntry, GalleryFile, install, is_installed

    nowhere = {"url": "http://127.0.0.1:9/never-fetched"}
    post = ({"export": "whisper", "from": "transformers", "to": "onnx"},
            {"quantize": "int8", "in": "onnx", "models": ["decoder_model.onnx", ALIGNMENT_FILE]})
    entry = GalleryEntry(name="tiny-whisper", description="", files=(GalleryFile("transformers", None, nowhere),),
                         post=post, config={"backend": "onnx-whisper", "parameters": {"model": "onnx"}})
    models = tmp_path / "models"
    shutil.copytree(tiny_whisper.parent / "source", models / "tiny-whisper" / "transformers")
    shutil.copytree(tiny_whisper, models / "tiny-whisper" / "onnx")
    (models / "tiny-whisper" / "onnx" / ALIGNMENT_FILE).unlink()
    (models / "tiny-whisper.yaml").write_text("name: tiny-whisper\nbackend: onnx-whisper\n")
    before = {p.name: p.stat().st_mtime_ns for p in (models / "tiny-whisper" / "onnx").iterdir()}
    assert not is_installed(models, entry)
    steps: list[str] = []
    assert install(entry, models, report=steps.append) is True
    assert (models / "tiny-whisper" / "onnx" / ALIGNMENT_FILE).is_file() and is_installed(models, entry)
    assert all("alignment" in step for step in steps) and steps  # no fetch, no full export
    assert {p.name: p.stat().st_mtime_ns for p in (models / "tiny-whisper" / "onnx").iterdir()
            if p.name != ALIGNMENT_FILE} == before
    ops = {node.op_type for node in onnx.load(str(models / "tiny-whisper" / "onnx" / ALIGNMENT_FILE)).graph.node}
    assert "DynamicQuantizeLinear" in ops  # the entry's quantize step names the graph: applied to it as well
    assert install(entry, models) is False  # complete now
    assert sorted(p.name for p in models.iterdir()) == ["tiny-whisper", "tiny-whisper.yaml"]  # nothing staged left


# -- bounded audio: refused from the header, decoded a window at a time ------------------------------------

def long_flac(seconds: int, rate: int, channels: int = 1, tone_seconds: float = 0.0) -> bytes:
    """``seconds`` of digital silence, with ``tone_seconds`` of tone at each end, written a minute at a time:
    a few hundred KB as FLAC, hundreds of MB decoded."""
    import soundfile

    buffer = io.BytesIO()
    ends = np.stack([tone(tone_seconds, rate)] * channels, axis=1)
    minute = np.zeros((60 * rate, channels), np.float32)
    with soundfile.SoundFile(buffer, "w", rate, channels, format="FLAC") as out:
        out.write(ends)
        silent = seconds * rate - 2 * len(ends)
        for done in range(0, silent, len(minute)):
            out.write(minute[: silent - done])
        out.write(ends)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def two_hours_one_minute() -> bytes:
    return long_flac(7260, 8000)


@pytest.fixture(scope="module")
def ten_minutes_cd() -> bytes:
    return long_flac(600, 44100, channels=2, tone_seconds=5.0)


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak_rss() -> int:
    """Reset this process's high-water mark (VmHWM) and return VmRSS in kB, so that VmHWM afterwards is the
    peak of what follows, not of whatever earlier tests did."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("resetting the peak RSS needs Linux's /proc/self/clear_refs")
    return status_kb("VmRSS")


def test_too_long_is_refused_from_the_header(two_hours_one_minute: bytes) -> None:
    from localai_aio.audio.codecs import AudioTooLong, open_audio

    assert len(two_hours_one_minute) < 300_000
    with pytest.raises(AudioTooLong) as refused:
        open_audio(two_hours_one_minute, 7200)
    assert (refused.value.seconds, refused.value.limit) == (7260, 7200)
    assert open_audio(two_hours_one_minute, 0).duration == 7260  # 0: no limit


async def test_too_long_audio_is_refused_before_decoding(wclient, two_hours_one_minute: bytes) -> None:  # noqa: ANN001
    before = reset_peak_rss()
    resp = await wclient.post(T, data=form(two_hours_one_minute, "a.flac", model="whisper"))
    grown_mb = (status_kb("VmHWM") - before) / 1024
    assert resp.status == 400
    assert await resp.json() == {"error": {
        "message": "Audio too long: the clip lasts 7260.0 s (2:01:00); the longest accepted is 7200 s (2:00:00)",
        "type": "invalid_request_error", "param": "file", "code": "audio_too_long"}}
    assert grown_mb < 50  # decoded whole, this clip alone is ~460 MB of float32 at 16 kHz


async def test_long_clip_is_transcribed_with_flat_memory(wclient, ten_minutes_cd: bytes) -> None:  # noqa: ANN001
    """Ten minutes of 44.1 kHz stereo are 212 MB as float32 and 38 MB once at 16 kHz mono; the windows of
    silence between the tones are still decoded, then skipped. Measured on the second of two identical
    requests: the first also grows the allocators' and ONNX Runtime's pools, by an amount that depends on
    what ran before in the process; an implementation that held the clip would need it again."""
    ask = form(ten_minutes_cd, "a.flac", model="whisper", language="en", response_format="verbose_json")
    assert (await wclient.post(T, data=ask)).status == 200
    before = reset_peak_rss()
    resp = await wclient.post(T, data=form(ten_minutes_cd, "a.flac", model="whisper", language="en",
                                           response_format="verbose_json"))
    grown_mb = (status_kb("VmHWM") - before) / 1024
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["duration"] == 600.0
    assert all(s["seek"] < 5 * 100 or s["seek"] > 565 * 100 for s in body["segments"])  # only windows with tone
    assert grown_mb < 50


def test_source_holds_about_a_window(ten_minutes_cd: bytes) -> None:
    """Read as Whisper reads (30 s windows, each starting a little before the last ended), the source holds
    a window and a block, not the clip: peak numpy memory (the window being read, the one being replaced
    and the blocks joining them) stays far below the clip's 38 MB at 16 kHz."""
    import tracemalloc

    from localai_aio.audio.codecs import AudioSource

    source = AudioSource(ten_minutes_cd)
    tracemalloc.start()
    try:
        start = 0
        while len(source.read(start, start + 480_000)) == 480_000:
            start += 400_000
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert source.duration == 600.0
    window_bytes = 480_000 * 4
    assert peak < 4 * window_bytes, peak / 2**20  # the whole clip would be 20 windows


@pytest.mark.parametrize("block_frames", [4096, 1000, 44100 * 7 // 2, 10**6])
def test_block_decoder_matches_resampling_the_whole_clip(block_frames: int) -> None:
    """44.1 kHz stereo, in blocks that end mid-clip, exactly at its end (an empty last read) or past it."""
    import soundfile
    import soxr

    from localai_aio.audio.codecs import AudioSource

    rng = np.random.default_rng(0)
    stereo = np.stack([tone(7.0, 44100), 0.1 * rng.standard_normal(7 * 44100).astype(np.float32)], axis=1)
    data = wav_bytes(stereo, 44100, "FLAC")
    expected = soxr.resample(soundfile.read(io.BytesIO(data), dtype="float32")[0].mean(axis=1), 44100, 16000,
                             quality="HQ")
    source = AudioSource(data, block_frames=block_frames)
    assert source.duration == 7.0  # from the header
    pieces, start = [], 0
    while len(window := source.read(start, start + 48_000)) == 48_000:
        np.testing.assert_allclose(window, expected[start:start + 48_000], atol=1e-6)
        pieces.append(window[:30_000].copy())
        start += 30_000
    decoded = np.concatenate([*pieces, window])
    assert len(decoded) == len(expected) and source.duration == len(expected) / 16000
    np.testing.assert_allclose(decoded, expected, atol=1e-6)
    with pytest.raises(ValueError, match="forward"):
        source.read(start - 1, start)


def test_source_reads_can_skip_ahead_and_past_the_end() -> None:
    from localai_aio.audio.codecs import AudioSource

    audio = tone(3.0)
    source = AudioSource(wav_bytes(audio), block_frames=1000)
    np.testing.assert_allclose(source.read(20_000, 20_100), audio[20_000:20_100], atol=1e-4)
    assert len(source.read(47_990, 60_000)) == 10 and len(source.read(50_000, 60_000)) == 0
    empty = AudioSource(b"")
    assert empty.duration == 0 and len(empty.read(0, 480_000)) == 0


# -- the real default Whisper -----------------------------------------------------------------------------------

def espeak(text: str) -> bytes:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    return subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout


@pytest.fixture
async def real_whisper(make_client, tmp_path: Path):  # noqa: ANN001
    configs = default_model_configs("whisper-base")
    return await make_client(ServerSettings(models_path=str(DEFAULT_MODELS), config_dir=str(tmp_path / "d")),
                             model_configs=configs)


@pytest.mark.model
async def test_real_whisper_lazy_dog(real_whisper) -> None:  # noqa: ANN001
    body = await (await real_whisper.post(T, data=form(espeak("The quick brown fox jumps over the lazy dog"),
                                                       model="whisper-1"))).json()
    assert "lazy dog" in body["text"].lower()


def speech(text: str) -> np.ndarray:
    """espeak-ng's voice at 16 kHz."""
    import soundfile
    import soxr

    audio, rate = soundfile.read(io.BytesIO(espeak(text)), dtype="float32")
    return soxr.resample(audio, rate, 16000).astype(np.float32)


def heard(audio: np.ndarray) -> tuple[float, float]:
    """Where the voice in a clip starts and ends, in seconds (espeak-ng pads with near silence)."""
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return loud[0] / 16000, (loud[-1] + 1) / 16000


@pytest.mark.model
async def test_real_whisper_word_timestamps_hear_a_pause(real_whisper) -> None:  # noqa: ANN001
    """Two sentences with 1.5 s of silence between them, through the official client: the first word after
    the pause starts where the test put the second sentence, not in the silence."""
    import openai

    first = speech("The quick brown fox jumps over the lazy dog.")
    second = speech("Please bring me a cup of hot coffee.")
    audio = np.concatenate([first, np.zeros(24000, np.float32), second])
    pause_start = heard(first)[1]
    resumed = (len(first) + 24000) / 16000 + heard(second)[0]
    async with openai.AsyncOpenAI(base_url=str(real_whisper.make_url("/v1")), api_key="x", max_retries=0) as client:
        result = await client.audio.transcriptions.create(
            model="whisper-1", file=("pause.wav", wav_bytes(audio), "audio/wav"), language="en",
            response_format="verbose_json", timestamp_granularities=["word"])
    assert result.segments is None and result.words, result
    words = result.words
    assert all(w.start < w.end for w in words), words
    assert [w.start for w in words] == sorted(w.start for w in words)
    [after] = [i for i, w in enumerate(words) if w.word.lower() == "please"]
    assert words[after - 1].word.lower().startswith("dog")
    assert words[after].start >= pause_start and abs(words[after].start - resumed) <= 0.3, (words, resumed)
    assert abs(words[after - 1].end - pause_start) <= 0.3, (words, pause_start)
    assert words[-1].end <= result.duration and "hot coffee" in result.text.lower()


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "My favourite colour is green.",
             "The train leaves at seven in the morning.", "Please bring me a cup of hot coffee.",
             "The weather today is cold and windy.", "We walked along the river for an hour.",
             "Reading books is a good way to relax.", "The children played football in the park.",
             "He forgot his umbrella at the office.", "The old library has thousands of books.",
             "I would like to order a pizza.", "Mountains look beautiful in the winter.",
             "The museum opens on Tuesday.", "Birds were singing in the garden.",
             "A red car stopped at the corner.", "The cat slept on the warm windowsill.",
             "She sells sea shells by the sea shore.", "Our neighbours painted their fence blue."]


@pytest.mark.model
async def test_real_whisper_long_clip_complete_with_timestamps(real_whisper) -> None:  # noqa: ANN001
    import soundfile

    audio = espeak(" ".join(SENTENCES))
    duration = soundfile.info(io.BytesIO(audio)).duration
    assert duration > 30  # more than one window
    body = await (await real_whisper.post(T, data=form(audio, model="whisper-1", language="en",
                                                       response_format="verbose_json"))).json()
    text = body["text"].lower()
    for phrase in ("lazy dog", "hot coffee", "cold and windy", "football in the park", "umbrella",
                   "order a pizza", "tuesday", "singing in the garden"):
        assert phrase in text, (phrase, text)
        assert text.count(phrase) == 1, (phrase, text)  # nothing doubled at a window edge
    srt = await (await real_whisper.post(T, data=form(audio, model="whisper-1", language="en",
                                                      response_format="srt"))).text()
    def seconds(stamp: str) -> float:
        hours, minutes, rest = stamp.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(rest.replace(",", "."))

    stamps = re.findall(r"(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})", srt)
    assert len(stamps) >= 3
    times = [(seconds(a), seconds(b)) for a, b in stamps]
    assert all(start < end for start, end in times)
    assert all(times[i][0] >= times[i - 1][0] for i in range(1, len(times)))
    assert times[-1][1] <= duration + 1


@pytest.mark.model
async def test_tts_round_trip(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    if importlib.util.find_spec("piper") is None:
        pytest.skip("the tts extra is not installed")
    configs = default_model_configs("whisper-base", "en-us-joe-medium")
    client = await make_client(ServerSettings(models_path=str(DEFAULT_MODELS), config_dir=str(tmp_path / "d")),
                               model_configs=configs)
    request = {"model": "tts-1", "input": "Hello from the local server", "voice": "alloy", "response_format": "wav"}
    speech = await (await client.post("/v1/audio/speech", json=request)).read()
    body = await (await client.post(T, data=form(speech, model="whisper-1", language="en"))).json()
    assert "local server" in body["text"].lower()


async def test_a_client_leaving_mid_transcription_frees_the_engine_only_when_its_thread_is_done(
        wclient, monkeypatch) -> None:  # noqa: ANN001
    from localai_aio.backends.onnx_whisper import WhisperEngine
    from test_engine_release import Timeline, leave_during_work

    timeline = Timeline(monkeypatch)
    monkeypatch.setattr(WhisperEngine, "transcribe", timeline.slow(WhisperEngine.transcribe))
    await leave_during_work(wclient, timeline, T, data=form(wav_bytes(tone(2.0)), model="whisper"))
    timeline.working.clear()
    resp = await wclient.post(T, data=form(wav_bytes(tone(2.0)), model="whisper"))
    body = await resp.json()
    assert resp.status == 200 and set(body) == {"text"} and isinstance(body["text"], str)
    (first_start, first_end), (second_start, _) = timeline.work
    assert timeline.released[0] >= first_end  # the first request held the engine until its work ended
    assert second_start >= first_end



def encode(audio: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """Audio in a container people record in (webm/Opus from browsers, m4a/mp4 AAC from phones), via PyAV."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio.astype(np.float32).reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout="mono",
                                      rate=rate)
        for converted in resampler.resample(frame):
            for packet in stream.encode(converted):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


CONTAINERS = [("webm", "libopus", "a.webm"), ("ipod", "aac", "a.m4a"), ("mp4", "aac", "a.mp4")]


@pytest.mark.parametrize(("container", "codec", "filename"), CONTAINERS)
def test_containers_people_record_in_are_decoded(container: str, codec: str, filename: str) -> None:
    from localai_aio.audio.codecs import open_audio

    t = np.arange(48000 * 2) / 48000
    data = encode((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 48000, container, codec)
    source = open_audio(data, 7200)
    assert abs(source.duration - 2.0) < 0.05  # from the container's header
    audio = source.read(0, 10 * 16000)
    assert abs(len(audio) - 32000) < 800 and abs(source.duration - len(audio) / 16000) < 1e-9
    spectrum = np.abs(np.fft.rfft(audio[4000:28000]))
    assert abs(np.argmax(spectrum) * 16000 / 24000 - 440) < 2  # the tone survives decoding and resampling


def test_a_length_no_header_states_is_bounded_while_decoding() -> None:
    """A container that does not state its length (as browsers' webm recordings do not) is refused as
    soon as decoding passes the limit."""
    from localai_aio.audio.codecs import AudioSource, AudioTooLong

    source = AudioSource(wav_bytes(tone(8.0)), max_seconds=3.0, block_frames=16000)
    source._header_seconds = None  # what such a container gives
    with pytest.raises(AudioTooLong, match="lasts more than"):
        source.read(0, 30 * 16000)


@pytest.mark.model
@pytest.mark.parametrize(("container", "codec", "filename"), CONTAINERS)
async def test_real_whisper_hears_recorded_containers(real_whisper, container: str, codec: str,
                                                       filename: str) -> None:  # noqa: ANN001
    import soundfile
    import soxr

    speech, rate = soundfile.read(io.BytesIO(espeak("The quick brown fox jumps over the lazy dog")),
                                  dtype="float32")
    data = encode(soxr.resample(speech, rate, 48000), 48000, container, codec)  # Opus wants 48 kHz
    body = await (await real_whisper.post(T, data=form(data, filename, model="whisper-1"))).json()
    assert "lazy dog" in body["text"].lower()
