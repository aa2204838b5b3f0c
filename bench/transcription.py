"""Speech to text in one run on the same Whisper base weights and audio (a ~20 s and a ~60 s clip spoken
by espeak-ng):

- real-time factor through the server (HTTP, multipart upload) against faster-whisper (CTranslate2, int8)
  in-process, when faster-whisper is installed,
- the server's peak resident memory while it transcribes the ~60 s clip ten times over (~10 min,
  Ogg/Vorbis) against the clip once: audio is decoded and featurised a 30 s window at a time, so the
  clip's length should not show.

    python bench/transcription.py [--models-path ~/.cache/localai-aio/models] [--threads 2] [--rounds 3]

Targets: the server takes at most 0.8x faster-whisper's time; its peak memory on the 10 min clip is about
that on the 1 min clip (about 1.0x).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

from _server import DEFAULT_MODELS, server

MODEL = "whisper-base"
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "My favourite colour is green.",
             "The train leaves at seven in the morning.", "Please bring me a cup of hot coffee.",
             "The weather today is cold and windy.", "We walked along the river for an hour.",
             "Reading books is a good way to relax.", "The children played football in the park.",
             "He forgot his umbrella at the office.", "The old library has thousands of books.",
             "I would like to order a pizza.", "Mountains look beautiful in the winter.",
             "The museum opens on Tuesday.", "Birds were singing in the garden."]



PROSE = [
    "Early on Saturday the market square filled with farmers selling apples, cheese and fresh bread.",
    "A cyclist in a yellow jacket stopped to ask the way to the railway museum.",
    "Nobody expected the concert to start so late, but the violinist apologised with a smile.",
    "Our kitchen window looks out over a narrow canal where ducks argue about breakfast.",
    "The engineer explained that the bridge had been repaired twice since the flood.",
    "My grandmother keeps her recipes in a blue tin that smells of cinnamon.",
    "During the storm the lighthouse keeper wrote letters to his brother in Canada.",
    "Several students stayed behind to finish painting the theatre scenery.",
    "If you follow the river path you will reach a small chapel with a wooden roof.",
    "The pilot announced that we would land twenty minutes ahead of schedule.",
    "A gardener was trimming the hedges while his radio played quiet jazz.",
    "Last winter the lake froze so thickly that children skated across it.",
    "Please remember to water the tomatoes and close the greenhouse door.",
    "The detective noticed a muddy footprint beside the open drawer.",
    "Fresh snow covered the mountain villages long before the first of December.",
    "Scientists measured the temperature of the ocean at many different depths.",
    "He practised the piano every evening until the neighbours knew each tune.",
    "The bakery on the corner sells cinnamon rolls that disappear by nine.",
]


def sentences() -> list[str]:
    """Varied prose: text that repeats itself would make Whisper (rightly) distrust its own output."""
    return SENTENCES + PROSE


def speak(seconds: float) -> bytes:
    """espeak-ng reading distinct sentences until the clip is about ``seconds`` long (WAV bytes)."""
    import soundfile

    text, audio = "", b""
    for sentence in sentences():
        text += " " + sentence
        audio = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout
        if soundfile.info(io.BytesIO(audio)).duration >= seconds:
            break
    return audio


def transcription_form(wav: bytes) -> tuple[bytes, str]:
    """A /v1/audio/transcriptions body for ``wav`` (English, the Whisper base model) and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{MODEL}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + wav + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def through_server(url: str, wav: bytes) -> float:
    body, content_type = transcription_form(wav)
    request = urllib.request.Request(url + "/v1/audio/transcriptions", data=body,
                                     headers={"Content-Type": content_type})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as resp:
        resp.read()
    return time.perf_counter() - start


def as_vorbis(wav: bytes, repeat: int = 1) -> bytes:
    """``wav`` ``repeat`` times over as Ogg/Vorbis: a compressed upload much smaller than its samples, the
    kind whose decoded size used to be unbounded, and small enough for the default upload limit."""
    import soundfile

    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", rate, 1, format="OGG", subtype="VORBIS") as out:
        for _ in range(repeat):
            out.write(samples)
    return buffer.getvalue()


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def peak_rss_mb(url: str, pid: int, clip: bytes) -> tuple[float, float]:
    """The server's peak resident memory while it transcribes ``clip``, and how far that is above its level
    before the request (MB). The high-water mark is reset first (Linux), so earlier peaks do not hide it."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    before = status_kb(pid, "VmRSS")
    through_server(url, clip)
    peak = status_kb(pid, "VmHWM")
    return peak / 1024, (peak - before) / 1024


def compare_speed(url: str, clips: dict[str, bytes], ct2: Path, threads: int, rounds: int) -> None:
    import soundfile
    from faster_whisper import WhisperModel

    reference = WhisperModel(str(ct2), device="cpu", compute_type="int8", cpu_threads=threads)
    for name, wav in clips.items():
        duration = soundfile.info(io.BytesIO(wav)).duration
        served, direct = [], []
        for _ in range(rounds):  # alternate so that machine noise hits both sides alike
            served.append(through_server(url, wav))
            start = time.perf_counter()
            segments, _ = reference.transcribe(io.BytesIO(wav), language="en", beam_size=1,
                                               temperature=0.0, vad_filter=False)
            list(segments)
            direct.append(time.perf_counter() - start)
        s, d = statistics.median(served), statistics.median(direct)
        print(f"{name} clip ({duration:.1f} s): server {s:.2f} s (RTF {s / duration:.3f}), "
              f"faster-whisper int8 {d:.2f} s (RTF {d / duration:.3f}), ratio {s / d:.2f}  (target <= 0.8)")


def compare_memory(url: str, pid: int, minute: bytes, rounds: int) -> None:
    import soundfile

    clips = {"1 min": as_vorbis(minute), "10 min": as_vorbis(minute, repeat=10)}
    for clip in clips.values():  # allocator arenas and ONNX Runtime's buffers reach their working size
        through_server(url, clip)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in clips}
    for _ in range(rounds):  # alternate so that machine noise hits both sides alike
        for name, clip in clips.items():
            runs[name].append(peak_rss_mb(url, pid, clip))
    print("server memory while transcribing (Ogg/Vorbis upload; median peak RSS, and its rise above idle):")
    peaks = {}
    for name, clip in clips.items():
        duration = soundfile.info(io.BytesIO(clip)).duration
        peaks[name] = statistics.median(peak for peak, _ in runs[name])
        rise = statistics.median(grown for _, grown in runs[name])
        decoded_mb = duration * 16000 * 4 / 2**20
        print(f"  {name} clip ({duration:.1f} s, upload {len(clip) / 2**20:.1f} MB, {decoded_mb:.0f} MB as float32 "
              f"at 16 kHz): peak {peaks[name]:.0f} MB (+{rise:.1f} MB)")
    ratio = peaks["10 min"] / peaks["1 min"]
    print(f"  peak ratio 10 min / 1 min: {ratio:.3f}x  (target about 1.0x: flat in the clip's length)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ct2 = Path(args.models_path) / MODEL / "ct2"
    if not (ct2 / "model.bin").is_file():
        print(f"{MODEL} is not installed in {args.models_path}: python -m localai_aio models install {MODEL}")
        return 2
    clips = {name: speak(seconds) for name, seconds in (("20 s", 20), ("60 s", 60))}
    with server(args.models_path, "--threads", str(args.threads), "--preload-models", MODEL) as (url, proc):
        for clip in clips.values():  # warm up: a one-window and a three-window clip
            through_server(url, clip)
        print(f"model {MODEL}, {args.threads} thread(s), greedy decoding, language en")
        if importlib.util.find_spec("faster_whisper") is None:
            print("faster-whisper is not installed (pip install faster-whisper): no speed comparison")
        else:
            compare_speed(url, clips, ct2, args.threads, args.rounds)
        compare_memory(url, proc.pid, clips["60 s"], args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
