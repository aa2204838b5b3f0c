"""Decode speed and time to first token: through the server (streaming, openai client) vs llama-cpp-python
called directly, on the same model and thread count, in one run. Prints the ratios.

    python bench/text_generation.py [--models-path ~/.cache/localai-aio/models] [--threads 1] [--rounds 3]

Targets: server decode speed at least 0.95x direct, and under 15 ms added to time to first token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _server import DEFAULT_MODELS, server

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread. Story {i}:",
    "Explain in detail how a bicycle works, part by part. Version {i}.",
    "Describe a walk through a city at night, with many details. Take {i}.",
]



def measure_stream(chunks) -> tuple[float, float, int]:  # noqa: ANN001
    """(time to first token, decode tokens/s after the first, tokens) for an iterator of text pieces."""
    start = time.perf_counter()
    first = last = None
    count = 0
    for piece in chunks:
        if not piece:
            continue
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        count += 1
    assert first is not None and last is not None and count > 1, "no tokens were generated"
    return first - start, (count - 1) / (last - first), count


def direct_runs(model_path: Path, threads: int, ctx: int, system: str, prompts: list[str], max_tokens: int):  # noqa: ANN201
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    results = []
    for prompt in prompts:
        stream = llm.create_chat_completion(
            messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            temperature=0, max_tokens=max_tokens, stream=True)
        results.append(measure_stream(c["choices"][0]["delta"].get("content") for c in stream))
    llm.close()
    return results


def server_runs(url: str, prompts: list[str], max_tokens: int):  # noqa: ANN201
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0)
    results = []
    for prompt in prompts:
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                temperature=0, max_tokens=max_tokens, stream=True)
        results.append(measure_stream(c.choices[0].delta.content for c in stream if c.choices))
    client.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from localai_aio.config import load_model_configs

    configs, _ = load_model_configs(args.models_path)
    cfg = configs.get(MODEL)
    if cfg is None or cfg.error:
        print(f"{MODEL} is not installed in {args.models_path}: python -m localai_aio models install {MODEL}")
        return 2
    ctx = int(cfg.context_size or 2048)

    with server(args.models_path, "--threads", str(args.threads), "--preload-models", MODEL) as (url, _):
        direct, served = [], []
        for r in range(args.rounds):  # alternate so that machine noise hits both sides alike
            prompts = [p.format(i=r) for p in PROMPTS]
            served += server_runs(url, prompts, args.max_tokens)
            direct += direct_runs(cfg.model_path, args.threads, ctx, cfg.system_prompt or "", prompts,
                                  args.max_tokens)

    def med(rows, i):  # noqa: ANN001, ANN202
        return statistics.median(r[i] for r in rows)

    d_ttft, d_rate = med(direct, 0), med(direct, 1)
    s_ttft, s_rate = med(served, 0), med(served, 1)
    print(f"model {MODEL}, {args.threads} thread(s), {len(direct)} generations each side")
    print(f"direct llama-cpp-python: decode {d_rate:7.1f} tok/s, time to first token {d_ttft * 1000:7.1f} ms")
    print(f"server (openai client):  decode {s_rate:7.1f} tok/s, time to first token {s_ttft * 1000:7.1f} ms")
    print(f"decode speed ratio server/direct: {s_rate / d_rate:.3f}  (target >= 0.95)")
    print(f"time to first token added: {(s_ttft - d_ttft) * 1000:+.1f} ms  (target < 15 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
