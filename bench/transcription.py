"""Speech to text in one run on the same Whisper base weights and audio (a ~20 s and a ~60 s clip spoken
by espeak-ng): real-time factor through the server (HTTP, multipart upload) against faster-whisper
(CTranslate2, int8) in-process. Prints the ratio.

    python bench/transcription.py [--models-path ~/.cache/localai-aio/models] [--threads 2] [--rounds 3]

Target: the server takes at most 0.8x faster-whisper's time.
"""

from __future__ import annotations

import argparse
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


def through_server(url: str, wav: bytes) -> float:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{MODEL}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + wav + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/v1/audio/transcriptions", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as resp:
        resp.read()
    return time.perf_counter() - start


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
    import soundfile
    from faster_whisper import WhisperModel

    clips = {name: speak(seconds) for name, seconds in (("20 s", 20), ("60 s", 60))}
    reference = WhisperModel(str(ct2), device="cpu", compute_type="int8", cpu_threads=args.threads)
    with server(args.models_path, "--threads", str(args.threads), "--preload-models", MODEL) as (url, _):
        through_server(url, clips["20 s"])  # warm up
        print(f"model {MODEL}, {args.threads} thread(s), greedy decoding, language en")
        for name, wav in clips.items():
            duration = soundfile.info(io.BytesIO(wav)).duration
            served, direct = [], []
            for _ in range(args.rounds):  # alternate so that machine noise hits both sides alike
                served.append(through_server(url, wav))
                start = time.perf_counter()
                segments, _ = reference.transcribe(io.BytesIO(wav), language="en", beam_size=1,
                                                   temperature=0.0, vad_filter=False)
                list(segments)
                direct.append(time.perf_counter() - start)
            s, d = statistics.median(served), statistics.median(direct)
            print(f"{name} clip ({duration:.1f} s): server {s:.2f} s (RTF {s / duration:.3f}), "
                  f"faster-whisper int8 {d:.2f} s (RTF {d / duration:.3f}), ratio {s / d:.2f}  (target <= 0.8)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
