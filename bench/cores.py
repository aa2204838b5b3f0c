"""How the default engines share the machine's cores, on one server at its default settings, warmed with mixed
traffic first:

- matrix: for each pair of the default engines (chat, transcription, speech, embeddings), each engine's
  solo throughput, then both at once; prints each one's fraction of its solo throughput and their sum.
  Chat: completion tokens/s of back-to-back streaming chats (openai client); transcription: seconds of
  audio transcribed per second (a ~15 s clip); speech: seconds of audio synthesized per second; embeddings:
  inputs embedded per second (batches of 32 sentences). Target: every pair's sum >= 0.9.
- interactive: a streaming chat's time to first token and decode rate alone, then while a ~50 s clip is
  transcribed over and over in the background. Targets: decode rate >= 0.5x solo (goal 0.8x), TTFT
  <= 2x solo.

    python bench/cores.py [--models-path ~/.cache/localai-aio/models] [--seconds 30]
        [--pairs chat+transcription,...] [--sections matrix,interactive] [--server-flag=--threads=1 ...]
        [--baseline-flag=--cpu-policy=off]

With ``--baseline-flag`` (default: ``--cpu-policy=off``, every engine running its threads at will, as before
the CPU budget) a second server with that flag is measured first in the same run, as the baseline the
default server's figures are printed beside; ``--baseline-flag=`` skips it.

A pair is measured so that every request counted overlaps the other engine's work: both keep sending until
each has finished one request past the deadline. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import threading
import time
import urllib.request
from collections.abc import Callable

from _clients import client, median, stream_chat, verdict, warm_up
from _server import DEFAULT_MODELS, server
from transcription import MODEL as WHISPER
from transcription import speak, transcription_form

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
VOICE = "en-us-joe-medium"
ENGINES = ("chat", "transcription", "speech", "embeddings")
SPOKEN = ("The morning train left the station a little after seven. Nobody on the platform seemed to notice. "
          "A small dog waited patiently beside a bench. Somewhere a radio was playing an old song.")
SENTENCES = [f"Sentence number {i} is about {w} and nothing else." for i, w in
             enumerate(["rivers", "bread", "stars", "trains", "music", "rain", "paper", "glass"] * 4)]


def post(url: str, path: str, body: bytes, content_type: str) -> bytes:
    request = urllib.request.Request(url + path, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=900) as resp:
        return resp.read()


def transcribe(url: str, wav: bytes) -> str:
    body, content_type = transcription_form(wav)
    return json.loads(post(url, "/v1/audio/transcriptions", body, content_type))["text"]


def duration(wav: bytes) -> float:
    import soundfile

    return soundfile.info(io.BytesIO(wav)).duration


class Workloads:
    """One request of each engine, returning the units of work it did (tokens, audio seconds, inputs)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.clip = speak(15)
        self.clip_seconds = duration(self.clip)
        self.long_clip = speak(50)
        self.chat_client = client(url)

    def chat(self) -> float:
        stream = stream_chat(self.chat_client, CHAT, [{"role": "user", "content": "Tell me a long story about a "
                                                       "lighthouse keeper."}], 200, temperature=0.7)
        if stream.error:
            raise RuntimeError(stream.error)
        return float(stream.tokens)

    def transcription(self) -> float:
        if not transcribe(self.url, self.clip).strip():
            raise RuntimeError("empty transcript")
        return self.clip_seconds

    def speech(self) -> float:
        body = json.dumps({"model": VOICE, "input": SPOKEN, "response_format": "wav"}).encode()
        return duration(post(self.url, "/v1/audio/speech", body, "application/json"))

    def embeddings(self) -> float:
        body = json.dumps({"model": EMBED, "input": SENTENCES}).encode()
        data = json.loads(post(self.url, "/v1/embeddings", body, "application/json"))["data"]
        return float(len(data))


def throughputs(work: dict[str, Callable[[], float]], seconds: float) -> dict[str, float]:
    """Units per second of each workload, all running at once until each has finished a request past
    ``seconds``; a workload's rate counts its requests up to that one, all of which overlapped the others."""
    start = time.perf_counter()
    deadline = start + seconds
    done = {name: threading.Event() for name in work}
    results: dict[str, float] = {}
    errors: list[str] = []

    def loop(name: str, fn: Callable[[], float]) -> None:
        units = 0.0
        try:
            while True:
                units += fn()
                now = time.perf_counter()
                if now >= deadline and name not in results:
                    results[name] = units / (now - start)
                    done[name].set()
                if all(event.is_set() for event in done.values()):
                    return
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            done[name].set()

    threads = [threading.Thread(target=loop, args=item) for item in work.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


def matrix(loads: Workloads, pairs: list[tuple[str, str]], seconds: float) -> None:
    engines = sorted({e for pair in pairs for e in pair}, key=ENGINES.index)
    solo = {e: throughputs({e: getattr(loads, e)}, seconds)[e] for e in engines}
    for e in engines:
        print(f"solo {e}: {solo[e]:.2f}/s", flush=True)
    for a, b in pairs:
        both = throughputs({a: getattr(loads, a), b: getattr(loads, b)}, seconds)
        fa, fb = both[a] / solo[a], both[b] / solo[b]
        total = fa + fb
        print(f"{a} + {b}: {a} {fa:.2f}x, {b} {fb:.2f}x of solo; sum {total:.2f} (target >= 0.9) "
              f"{verdict(total >= 0.9)}", flush=True)


def interactive(loads: Workloads, rounds: int) -> None:
    cl = loads.chat_client
    messages = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]

    def chats() -> tuple[float, float]:
        streams = [stream_chat(cl, CHAT, messages, 128, temperature=0.7) for _ in range(rounds)]
        bad = [s.error for s in streams if s.error]
        if bad:
            raise RuntimeError(bad[0])
        return median([s.ttft for s in streams]), median([s.decode_rate for s in streams])

    ttft0, rate0 = chats()
    stop = threading.Event()

    def background() -> None:
        while not stop.is_set():
            transcribe(loads.url, loads.long_clip)

    worker = threading.Thread(target=background)
    worker.start()
    time.sleep(2.0)  # the transcription is under way
    try:
        ttft1, rate1 = chats()
    finally:
        stop.set()
        worker.join()
    print(f"chat alone: TTFT {ttft0 * 1000:.0f} ms, decode {rate0:.1f} tok/s; beside a "
          f"{duration(loads.long_clip):.0f} s transcription: TTFT {ttft1 * 1000:.0f} ms, decode {rate1:.1f} tok/s")
    print(f"chat decode rate beside a transcription: {rate1 / rate0:.2f}x solo (target >= 0.5, goal 0.8) "
          f"{verdict(rate1 / rate0 >= 0.5)}")
    print(f"chat TTFT beside a transcription: {ttft1 / ttft0:.2f}x solo (target <= 2) {verdict(ttft1 / ttft0 <= 2)}",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--seconds", type=float, default=30.0, help="measuring window of each solo and pair run")
    parser.add_argument("--rounds", type=int, default=5, help="chats per phase of the interactive section")
    parser.add_argument("--pairs", default=",".join(f"{a}+{b}" for a, b in itertools.combinations(ENGINES, 2)))
    parser.add_argument("--sections", default="matrix,interactive")
    parser.add_argument("--server-flag", action="append", default=[], help="extra flag for the server")
    parser.add_argument("--url", help="measure this running server instead of starting one")
    parser.add_argument("--baseline-flag", default="--cpu-policy=off",
                        help="flag of a baseline server measured first in the same run ('' for none)")
    args = parser.parse_args()
    pairs = [tuple(p.split("+")) for p in args.pairs.split(",") if p]
    sections = set(args.sections.split(","))

    def run(url: str) -> None:
        warm_up(url, CHAT)
        loads = Workloads(url)
        for name in ENGINES:  # every engine loaded and past its first request
            getattr(loads, name)()
        if "matrix" in sections:
            matrix(loads, pairs, args.seconds)
        if "interactive" in sections:
            interactive(loads, args.rounds)

    if args.url:
        run(args.url)
        return 0
    runs = ([("baseline", [args.baseline_flag])] if args.baseline_flag else []) + [("default settings", [])]
    for label, extra in runs:
        print(f"\n== {label}: {' '.join(args.server_flag + extra) or 'no extra flags'}", flush=True)
        with server(args.models_path, "--preload-models", f"{CHAT},{WHISPER},{VOICE},{EMBED}",
                    *args.server_flag, *extra) as (url, _):
            run(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
