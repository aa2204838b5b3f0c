"""Does a big request hold the model? A client streams a chat; while it streams, another sends a Responses
request of 20,000 tiny messages with ``truncation: "auto"`` and a chat whose one message is 10 MB. The
streaming client's gaps between tokens are compared with the same stream alone, in the same run.

    python bench/isolation.py [--models-path ~/.cache/localai-aio/models] [--model smollm2-135m-instruct]
        [--rounds 3] [--max-tokens 200]

Targets: the stream's inter-token gap p99 beside the big requests under 3x its solo p99; both big requests
answered (a 200 for the truncation, a 400 context_length_exceeded for the 10 MB prompt) within 15 s.

How it is measured: our server at its defaults (``serve --preload-models MODEL``), warmed with mixed
traffic (``_clients.warm_up``); every request through the official ``openai`` client (the 10 MB prompt
through httpx), the two big ones from other processes, so that building them never delays the streaming
client's reads; each round streams once alone and once with the two big requests sent 0.3 s after the
stream's first token. Gaps are the times between
streamed chunks after the first; p99 over all rounds of a side.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import threading
import time

import httpx

from _clients import DEFAULT_MODEL, client, local_model, percentile, verdict, warm_up
from _server import DEFAULT_MODELS, server

PROMPT = [{"role": "user", "content": "Write a long story about a fox who learns to sail. Make it detailed."}]


def gaps_of_stream(url: str, model: str, max_tokens: int, first: threading.Event) -> list[float]:
    cl = client(url)
    times: list[float] = []
    for chunk in cl.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0,
                                            stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            first.set()
    cl.close()
    return [b - a for a, b in zip(times[1:], times[2:], strict=False)]


def flood(url: str, model: str) -> tuple[float, str]:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"note {i}"} for i in range(20_000)]
    messages[-1] = {"role": "user", "content": "What was the last note?"}
    cl = client(url, timeout=120)
    started = time.perf_counter()
    answer = cl.responses.create(model=model, input=messages, truncation="auto", max_output_tokens=8, store=False)
    cl.close()
    return time.perf_counter() - started, f"{answer.status}, {answer.usage.input_tokens} input tokens kept"


def huge_prompt(url: str, model: str) -> tuple[float, str]:
    text = "lorem ipsum dolor sit amet " * (10 * 1024 * 1024 // 27)
    started = time.perf_counter()
    resp = httpx.post(url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8})
    took = time.perf_counter() - started
    code = resp.json().get("error", {}).get("code") if resp.status_code != 200 else "answered"
    return took, f"{resp.status_code} {code}, {len(text) / 1e6:.1f} MB"


def send_after(first: threading.Event, results: list, name: str, fn, url: str, model: str,  # noqa: ANN001
               pool: concurrent.futures.Executor) -> None:
    """Send a big request 0.3 s after the stream's first token; record how long its answer took. It is
    built and sent from another process: building 20,000 typed input items in the openai client holds this
    process's GIL for long enough to delay the streaming client's own reads, which would count as gaps."""
    first.wait(60)
    time.sleep(0.3)
    took, what = pool.submit(fn, url, model).result()
    results.append((name, took, what))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    if local_model(args.models_path, args.model) is None:
        print(f"{args.model} is not installed in {args.models_path}")
        return 2
    solo: list[float] = []
    beside: list[float] = []
    big: list[tuple[str, float, str]] = []
    spawn = multiprocessing.get_context("spawn")
    with server(args.models_path, "--preload-models", args.model) as (url, _), \
            concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn) as pool:
        list(pool.map(time.sleep, [0, 0]))  # both senders started before anything is timed
        warm_up(url, args.model)
        for _ in range(args.rounds):
            solo += gaps_of_stream(url, args.model, args.max_tokens, threading.Event())
            first = threading.Event()
            results: list[tuple[str, float, str]] = []
            senders = [threading.Thread(target=send_after, args=(first, results, name, fn, url, args.model, pool))
                       for name, fn in (("20,000-message truncation", flood), ("10 MB prompt", huge_prompt))]
            for t in senders:
                t.start()
            beside += gaps_of_stream(url, args.model, args.max_tokens, first)
            for t in senders:
                t.join()
            big += results
    solo_p99, beside_p99 = percentile(solo, 99) * 1000, percentile(beside, 99) * 1000
    ratio = beside_p99 / solo_p99
    print(f"\nmodel {args.model}, server defaults, {args.rounds} round(s), {args.max_tokens} tokens per stream")
    print(f"inter-token gap p99: alone {solo_p99:.1f} ms, beside the big requests {beside_p99:.1f} ms: {ratio:.2f}x "
          f"(target < 3x: {verdict(ratio < 3)}); p50 {percentile(solo, 50) * 1000:.1f} -> "
          f"{percentile(beside, 50) * 1000:.1f} ms")
    slowest = max(took for _, took, _ in big)
    for name, took, what in big:
        print(f"  {name}: {took:.2f} s ({what})")
    print(f"slowest big request: {slowest:.2f} s (target < 15 s: {verdict(slowest < 15)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
