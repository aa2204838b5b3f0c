"""Text to speech in one run on the default voice (en_US-joe-medium):

- real-time factor through the server (HTTP, streamed WAV) against piper-tts called directly in-process,
- time to the first audio byte for a 10-sentence text against its total synthesis time.

    python bench/speech.py [--models-path ~/.cache/localai-aio/models] [--threads 2] [--rounds 3]

Targets: at most 1.05x piper's time; first byte within a third of the total.
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.request
from pathlib import Path

from _server import DEFAULT_MODELS, server

MODEL = "en-us-joe-medium"
SENTENCES = [
    "The morning train left the station a little after seven.", "Nobody on the platform seemed to notice.",
    "A small dog waited patiently beside a bench.", "Somewhere a radio was playing an old song.",
    "The conductor checked the tickets one by one.", "Outside, the fields were still covered in frost.",
    "A child pressed her face against the window.", "The coffee in the dining car was surprisingly good.",
    "By noon the sun had finally broken through the clouds.", "Everyone agreed it had been a pleasant trip.",
]
TEXT = " ".join(SENTENCES)



def direct(model: Path, threads: int) -> tuple[float, float]:
    """(seconds to synthesize TEXT, seconds of audio) with piper-tts alone."""
    import onnxruntime
    from piper.voice import PiperVoice

    voice = PiperVoice.load(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    voice.session = onnxruntime.InferenceSession(str(model), sess_options=options,
                                                 providers=["CPUExecutionProvider"])
    list(voice.synthesize("Warm up."))
    start = time.perf_counter()
    samples = sum(len(chunk.audio_float_array) for chunk in voice.synthesize(TEXT))
    return time.perf_counter() - start, samples / voice.config.sample_rate


def served(url: str) -> tuple[float, float, float]:
    """(time to first byte, total seconds, seconds of audio) for TEXT as streamed PCM."""
    import json

    body = json.dumps({"model": MODEL, "input": TEXT, "response_format": "pcm"}).encode()
    request = urllib.request.Request(url + "/v1/audio/speech", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    size = 0
    with urllib.request.urlopen(request, timeout=300) as resp:
        while chunk := resp.read1(65536):
            first = first or time.perf_counter()
            size += len(chunk)
    total = time.perf_counter() - start
    return first - start, total, size / 2 / 22050


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = Path(args.models_path) / MODEL / "en_US-joe-medium.onnx"
    if not model.is_file():
        print(f"{MODEL} is not installed in {args.models_path}: python -m localai_aio models install {MODEL}")
        return 2
    with server(args.models_path, "--threads", str(args.threads), "--preload-models", MODEL) as (url, _):
        served(url)  # warm up
        d_runs, s_runs = [], []
        for _ in range(args.rounds):  # alternate so machine noise hits both sides alike
            s_runs.append(served(url))
            d_runs.append(direct(model, args.threads))
    d_time = statistics.median(r[0] for r in d_runs)
    audio = statistics.median(r[1] for r in d_runs)
    s_ttfb = statistics.median(r[0] for r in s_runs)
    s_time = statistics.median(r[1] for r in s_runs)
    print(f"voice {MODEL}, {args.threads} thread(s), {len(SENTENCES)} sentences, {audio:.1f} s of audio")
    print(f"piper-tts directly:  {d_time:.2f} s  (real-time factor {d_time / audio:.3f})")
    print(f"through the server:  {s_time:.2f} s  (real-time factor {s_time / audio:.3f}), first byte after "
          f"{s_ttfb * 1000:.0f} ms")
    print(f"server time / piper time: {s_time / d_time:.3f}  (target <= 1.05)")
    print(f"first byte / total:       {s_ttfb / s_time:.3f}  (target <= 0.333)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
