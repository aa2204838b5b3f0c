"""Load: N concurrent clients (streaming chat, embeddings, mixed) for a fixed time against a real server
process on loopback, over several rounds. Reports requests/s, p50/p99 latency, errors by kind, and the
server's RSS before and after each round.

    python bench/load.py [--models-path ~/.cache/localai-aio/models] [--clients 16] [--seconds 20] [--rounds 3]

Expected: no errors other than documented 503 queue-full answers, and RSS that stops growing after the
first round (models loaded, caches warm).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import time

from _server import DEFAULT_MODELS, server

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is two plus two?",
             "Say hello.", "What is the largest planet?"]



def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def one_request(session, url: str, kind: str) -> None:  # noqa: ANN001
    if kind == "chat":
        body = {"model": CHAT, "messages": [{"role": "user", "content": random.choice(QUESTIONS)}],
                "max_tokens": 24, "temperature": 0.7, "stream": True}
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            done = False
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif line.startswith(b"data: {") and b'"error"' in line[:20]:
                    raise RuntimeError("error event")
            if not done:
                raise RuntimeError("stream ended without [DONE]")
    else:
        body = {"model": EMBED, "input": [random.choice(QUESTIONS) for _ in range(random.randint(1, 4))]}
        async with session.post(url + "/v1/embeddings", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            data = json.loads(await resp.read())
            if len(data["data"]) != len(body["input"]):
                raise RuntimeError("wrong number of vectors")


async def round_(url: str, clients: int, seconds: float, mix: list[str]) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def client(i: int) -> None:
            while time.monotonic() < deadline:
                kind = mix[i % len(mix)] if len(mix) > 1 else mix[0]
                start = time.perf_counter()
                try:
                    await one_request(session, url, kind)
                    latencies.append(time.perf_counter() - start)
                except Exception as exc:  # counted by kind; the load goes on
                    errors[f"{kind}: {exc}"] += 1

        start = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.monotonic() - start
    latencies.sort()
    return {"requests": len(latencies), "rps": len(latencies) / elapsed,
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"), "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mix", default="chat,embeddings", help="comma-separated: chat, embeddings")
    args = parser.parse_args()
    mix = [m.strip() for m in args.mix.split(",") if m.strip()]
    with server(args.models_path, "--queue-size", str(args.clients)) as (url, proc):
        print(f"{args.clients} clients, mix {mix}, {args.seconds:g} s per round")
        for r in range(args.rounds):
            before = rss_mb(proc.pid)
            result = asyncio.run(round_(url, args.clients, args.seconds, mix))
            after = rss_mb(proc.pid)
            errors = dict(result["errors"]) or "none"
            print(f"round {r + 1}: {result['requests']} requests, {result['rps']:.1f} req/s, "
                  f"p50 {result['p50'] * 1000:.0f} ms, p99 {result['p99'] * 1000:.0f} ms, "
                  f"RSS {before:.0f} -> {after:.0f} MB, errors: {errors}")
    print(f"server exited with {proc.returncode} after SIGTERM")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
