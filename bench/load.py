"""Load and soak: mixed clients (streaming chat, embeddings, speech, transcription) against a real server
process on loopback at its default settings, first alone, then with a share of bad clients that stall
mid-stream or disconnect at random. Several rounds; each prints per-family p50/p95, answers by status
code, and the server's RSS.

    python bench/load.py [--models-path ~/.cache/localai-aio/models] [--clients 8] [--seconds 30]
                         [--rounds 3] [--bad 0.1]

The round before the baseline runs the chat clients alone, for the chat's p95 beside the other families
against its p95 alone (target <= 1.5x).

Targets: no 5xx; 503 only when the queue bound is reached; RSS flat after warm-up (within 5% from the
first round with bad clients to the last); healthy clients' p95 with bad clients at most 1.5x their p95
without them (the baseline round of the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import random
import time

from _server import DEFAULT_MODELS, server

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
VOICE = "en-us-joe-medium"
WHISPER = "whisper-base"
FAMILIES = ("chat", "embeddings", "speech", "transcription")
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is two plus two?",
             "Say hello.", "What is the largest planet?"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Record:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.statuses: collections.Counter[str] = collections.Counter()

    def p(self, family: str, q: float) -> float:
        values = sorted(self.latencies[family])
        return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


async def healthy(session, url: str, family: str, speech_wav: bytes) -> int:  # noqa: ANN001
    """One well-behaved request; returns the HTTP status (the body is read in full and checked)."""
    import aiohttp

    if family == "chat":
        body = {"model": CHAT, "messages": [{"role": "user", "content": random.choice(QUESTIONS)}],
                "max_tokens": 24, "temperature": 0.7, "stream": True}
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            data = await resp.read()
            if resp.status == 200 and not data.rstrip().endswith(b"data: [DONE]"):
                return 599  # a stream that ended without [DONE]: counted as a server fault
            return resp.status
    if family == "embeddings":
        body = {"model": EMBED, "input": [random.choice(QUESTIONS) for _ in range(random.randint(1, 4))]}
        async with session.post(url + "/v1/embeddings", json=body) as resp:
            await resp.read()
            return resp.status
    if family == "speech":
        body = {"model": VOICE, "input": random.choice(QUESTIONS), "response_format": "wav"}
        async with session.post(url + "/v1/audio/speech", json=body) as resp:
            await resp.read()
            return resp.status
    form = aiohttp.FormData()
    form.add_field("file", io.BytesIO(speech_wav), filename="q.wav", content_type="audio/wav")
    form.add_field("model", WHISPER)
    async with session.post(url + "/v1/audio/transcriptions", data=form) as resp:
        await resp.read()
        return resp.status


async def bad(session, url: str) -> str:  # noqa: ANN001
    """A client that misbehaves: stalls mid-stream without reading, or leaves at a random moment."""
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 200, "stream": True}
    if random.random() < 0.5:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            await resp.content.readline()
            await asyncio.sleep(random.uniform(5, 15))  # reads nothing more, then goes away
        return "stalled"
    request = asyncio.ensure_future(session.post(url + "/v1/chat/completions", json=body))
    await asyncio.sleep(random.uniform(0.05, 1.0))
    request.cancel()
    return "disconnected"


async def round_(url: str, clients: int, seconds: float, bad_share: float, speech_wav: bytes,
                 families: tuple[str, ...] = FAMILIES) -> Record:
    """``clients`` healthy clients, client i sending FAMILIES[i % 4] requests (only those in ``families``)."""
    import aiohttp

    record = Record()
    deadline = time.monotonic() + seconds
    n_bad = round(clients * bad_share)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def client(i: int) -> None:
            while time.monotonic() < deadline:
                if i < n_bad:
                    try:
                        record.statuses[await bad(session, url)] += 1
                    except (TimeoutError, aiohttp.ClientError):
                        record.statuses["bad client error"] += 1
                    continue
                family = FAMILIES[i % len(FAMILIES)]
                if family not in families:
                    return
                start = time.perf_counter()
                try:
                    status = await healthy(session, url, family, speech_wav)
                except aiohttp.ClientError as exc:
                    record.statuses[f"{family} {type(exc).__name__}"] += 1
                    continue
                record.statuses[f"{family} {status}"] += 1
                if status == 200:
                    record.latencies[family].append(time.perf_counter() - start)

        await asyncio.gather(*(client(i) for i in range(clients + n_bad)))
    return record


async def _speech_sample(url: str) -> bytes:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        body = {"model": VOICE, "input": "The quick brown fox jumps over the lazy dog.", "response_format": "wav"}
        async with session.post(url + "/v1/audio/speech", json=body) as resp:
            resp.raise_for_status()
            return await resp.read()


def report(name: str, record: Record, rss: float) -> None:
    families = "  ".join(f"{f} p50 {record.p(f, 0.5) * 1000:.0f} / p95 {record.p(f, 0.95) * 1000:.0f} ms"
                         for f in FAMILIES)
    print(f"{name}: {families}")
    print(f"    answers: {dict(sorted(record.statuses.items()))}  RSS {rss:.0f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--clients", type=int, default=8, help="healthy clients, spread over the families")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="rounds with bad clients, after the baseline")
    parser.add_argument("--bad", type=float, default=0.1, help="bad clients, as a share of the healthy ones")
    args = parser.parse_args()
    with server(args.models_path) as (url, proc):
        wav = asyncio.run(_speech_sample(url))
        print(f"{args.clients} healthy clients over {', '.join(FAMILIES)}; {args.seconds:g} s per round")
        asyncio.run(round_(url, args.clients, args.seconds / 2, 0.0, wav))  # warm-up: every model loaded
        alone = asyncio.run(round_(url, args.clients, args.seconds, 0.0, wav, families=("chat",)))
        report("chat clients alone", alone, rss_mb(proc.pid))
        baseline = asyncio.run(round_(url, args.clients, args.seconds, 0.0, wav))
        report("baseline (no bad clients)", baseline, rss_mb(proc.pid))
        mixed = baseline.p("chat", 0.95) / alone.p("chat", 0.95)
        rss: list[float] = []
        worst: dict[str, float] = {}
        faults = 0
        for r in range(args.rounds):
            result = asyncio.run(round_(url, args.clients, args.seconds, args.bad, wav))
            rss.append(rss_mb(proc.pid))
            report(f"round {r + 1} (+{round(args.clients * args.bad)} bad)", result, rss[-1])
            faults += sum(n for key, n in result.statuses.items() if key.split()[-1].startswith("5")
                          and not key.endswith(" 503"))
            for family in FAMILIES:
                worst[family] = max(worst.get(family, 0.0), result.p(family, 0.95) / baseline.p(family, 0.95))
    print(f"\nchat p95 beside speech, transcription and embeddings clients / chat clients alone: {mixed:.2f}x  "
          f"(target <= 1.5x: {'met' if mixed <= 1.5 else 'NOT MET'})")
    print(f"5xx other than 503: {faults}  (target 0: {'met' if faults == 0 else 'NOT MET'})")
    growth = rss[-1] / rss[0] if rss else float("nan")
    print(f"RSS, last round / first round with bad clients: {growth:.3f}x  "
          f"(target <= 1.05x: {'met' if growth <= 1.05 else 'NOT MET'})")
    for family, ratio in worst.items():
        print(f"{family}: worst p95 with bad clients / without: {ratio:.2f}x  "
              f"(target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT MET'})")
    print(f"server exited with {proc.returncode} after SIGTERM")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
