"""Embeddings throughput in one run on the default model (all-MiniLM-L6-v2):

- sentence-transformers' ``encode`` in this process (PyTorch, the reference),
- the server over HTTP with the ``openai`` client, 32 concurrent clients sending one sentence each,
- the same requests sent one at a time,
- the same concurrent load from a light aiohttp client;

alternated over ``--rounds`` rounds (medians), so machine noise hits every side alike.

    python bench/embeddings.py [--models-path ~/.cache/localai-aio/models] [--threads 2] [--sentences 512]
                               [--rounds 3]

Targets: concurrent server at least 1.2x sentence-transformers, and at least 3x the one-at-a-time rate.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from _server import DEFAULT_MODELS, server

MODEL = "all-minilm-l6-v2"
WORDS = ("the quick brown fox jumps over a lazy dog while a small cat watches from the warm kitchen window "
         "and the rain keeps falling on the old city streets").split()


def sentences(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + i % 12)) + f" {i}." for i in range(n)]



async def through_server(url: str, texts: list[str], concurrency: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)

    async def worker() -> None:
        while not queue.empty():
            text = queue.get_nowait()
            result = await client.embeddings.create(model=MODEL, input=text)
            assert len(result.data[0].embedding) == 384

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return len(texts) / elapsed


async def through_server_raw(url: str, texts: list[str], concurrency: int) -> float:
    """The same requests from a lightweight HTTP client (aiohttp), to separate the openai client's own CPU
    cost (it shares these cores) from the server's."""
    import aiohttp

    pending = list(texts)
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            while pending:
                body = {"model": MODEL, "input": pending.pop(), "encoding_format": "base64"}
                async with session.post(url + "/v1/embeddings", json=body) as resp:
                    assert resp.status == 200
                    await resp.read()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(texts) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source = Path(args.models_path) / MODEL / "source"
    if not source.is_dir():
        print(f"{MODEL} is not installed in {args.models_path}: python -m localai_aio models install {MODEL}")
        return 2
    texts = sentences(args.sentences)

    import statistics

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    reference = SentenceTransformer(str(source), device="cpu")
    reference.encode(texts[:32])  # warm up

    def encode() -> float:
        start = time.perf_counter()
        reference.encode(texts, batch_size=32)
        return len(texts) / (time.perf_counter() - start)

    flags = ("--threads", str(args.threads), "--preload-models", MODEL, "--queue-size", str(args.clients * 2))
    rates: dict[str, list[float]] = {"st": [], "concurrent": [], "sequential": [], "raw": []}
    with server(args.models_path, *flags) as (url, _):
        # warm up with mixed traffic: concurrent single sentences, one at a time, the light client
        asyncio.run(through_server(url, texts[:64], args.clients))
        asyncio.run(through_server(url, texts[:8], 1))
        asyncio.run(through_server_raw(url, texts[:64], args.clients // 2))
        for _ in range(args.rounds):  # alternate so that machine noise hits every side alike
            rates["st"].append(encode())
            rates["concurrent"].append(asyncio.run(through_server(url, texts, args.clients)))
            rates["sequential"].append(asyncio.run(through_server(url, texts[: max(64, args.sentences // 4)], 1)))
            rates["raw"].append(asyncio.run(through_server_raw(url, texts, args.clients)))
    st_rate, concurrent, sequential, raw = (statistics.median(rates[k]) for k in ("st", "concurrent", "sequential",
                                                                                 "raw"))
    print(f"model {MODEL}, {args.threads} thread(s), {len(texts)} sentences, median of {args.rounds} rounds")
    print(f"sentence-transformers encode (in-process):  {st_rate:8.1f} sentences/s")
    print(f"server, {args.clients} concurrent clients:          {concurrent:8.1f} sentences/s")
    print(f"server, one request at a time:              {sequential:8.1f} sentences/s")
    print(f"server, {args.clients} concurrent aiohttp clients:  {raw:8.1f} sentences/s  (lighter client)")
    print(f"server concurrent / sentence-transformers: {concurrent / st_rate:.2f}x  (target >= 1.2x)")
    print(f"server concurrent / one at a time:         {concurrent / sequential:.2f}x  (target >= 3x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
