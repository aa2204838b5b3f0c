"""Single-stream decode speed and time to first token: through the server (streaming, temperature 0, the
official openai client) vs llama-cpp-python's high-level API called directly
(``Llama(...).create_chat_completion(stream=True)``) on the same model file, thread count and system prompt,
in one run. Optionally llama.cpp's own ``llama-server`` is measured beside them. Prints the ratios.

    python bench/text_generation.py [--models-path ~/.cache/localai-aio/models] [--model smollm2-135m-instruct]
        [--rounds 3] [--max-tokens 128] [--threads N] [--server-flag=--some-flag ...]
        [--url http://host:port] [--gguf FILE] [--no-direct]
        [--llama-server /tmp/llsrc/.../build/bin/llama-server] [--llama-server-flag=--some-flag ...]

Targets: server decode speed at least 1.0x direct, and under 5 ms added to time to first token; the same
prompts streamed through ``/v1/responses`` within 3% of chat completions (decode speed and time to first
token).

How it is measured:

- Our server runs at its defaults (``serve --preload-models MODEL``; ``--threads`` only when given here, so it
  uses the CPU count or the model YAML's ``threads``). With ``--url`` no server is started: any
  OpenAI-compatible server is measured as it is.
- Before anything is timed, each server gets 32 warm-up requests of mixed kinds (streaming and non-streaming
  chat, /v1/completions streaming and not, a chat with ``tools``, two bursts of 4 concurrent requests).
- Rounds alternate (server, [llama-server], direct) so that machine noise hits every side alike; each round
  streams the same 3 prompts on each side, preceded by the model YAML's ``system_prompt`` as a system message.
- Direct llama-cpp-python runs in a child process (this script with ``--direct-worker``, printing JSON), one
  per round: it loads the model, generates once untimed (the server side is warm too), then streams the
  prompts. A separate process, because llama.cpp's OpenMP thread team belongs to the process and thread that
  call in (docs/STACK.md, "Threads and llama.cpp"): sharing a process with the benchmark's client threads would
  measure something no deployment runs. The servers are idle while it runs, and it has exited before they
  are measured again, so no two sides ever compete for the 2 cores.
- All sides use the same weight buffers: on CPUs that advertise AMX our server keeps weights in plain buffers
  (no repacking, see backends/llama_cpp/engine.py), so the direct worker sets ``use_extra_bufts = False`` and
  llama-server gets ``--no-repack``. llama-server runs with 1 slot and ``-c context_size``.
- Decode speed is streamed text chunks after the first per second (one token per chunk); time to first token
  is from the call to the first chunk with text. Medians over all generations of a side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

from _clients import (
    DEFAULT_MODEL,
    client,
    default_threads,
    local_model,
    median,
    stream_chat,
    stream_response,
    verdict,
    warm_up,
)
from _server import DEFAULT_MODELS, llama_server, server

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread. Story {i}:",
    "Explain in detail how a bicycle works, part by part. Version {i}.",
    "Describe a walk through a city at night, with many details. Take {i}.",
]


def messages_for(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def direct_worker(spec: dict) -> None:
    """Child process: llama-cpp-python alone. Prints one JSON list of [ttft_s, decode_tok_s, chunks]."""
    import llama_cpp.llama_cpp as low_level
    from llama_cpp import Llama

    if not spec["extra_buffers"]:  # the same weight buffers as the server (backends/llama_cpp/engine.py): no repacking
        defaults = low_level.llama_model_default_params

        def plain_buffers():  # noqa: ANN202
            params = defaults()
            params.use_extra_bufts = False
            return params

        # Llama.__init__ calls it through the llama_cpp.llama_cpp module, not the package's re-export.
        low_level.llama_model_default_params = plain_buffers
    llm = Llama(model_path=spec["gguf"], n_ctx=spec["ctx"], n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)

    def one(prompt: str, max_tokens: int) -> list[float]:
        sent = time.perf_counter()
        first = last = None
        pieces = 0
        for chunk in llm.create_chat_completion(messages=messages_for(prompt, spec["system"]), temperature=0,
                                                max_tokens=max_tokens, stream=True):
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                pieces += 1
        if first is None or pieces < 2:
            raise SystemExit("direct llama-cpp-python generated fewer than 2 tokens")
        return [first - sent, (pieces - 1) / (last - first), pieces]

    one("Say hello.", 16)  # untimed: first-call costs (thread team, page faults) are not decode speed
    results = [one(p, spec["max_tokens"]) for p in spec["prompts"]]
    llm.close()
    print(json.dumps(results))


def direct_runs(spec: dict) -> list[list[float]]:
    out = subprocess.run([sys.executable, __file__, "--direct-worker", json.dumps(spec)], capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"direct worker failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_runs(url: str, model: str, system: str | None, prompts: list[str], max_tokens: int,
                responses: bool = False) -> list[list[float]]:
    """Stream each prompt through chat completions (or, with ``responses``, the Responses API)."""
    cl = client(url)
    results = []
    for prompt in prompts:
        if responses:
            s = stream_response(cl, model, messages_for(prompt, system), max_tokens)
        else:
            s = stream_chat(cl, model, messages_for(prompt, system), max_tokens, usage=False)
        if s.error or s.pieces < 2:
            raise RuntimeError(f"{url}: {s.error or 'fewer than 2 tokens'}")
        results.append([s.ttft, s.decode_rate, s.pieces])
    cl.close()
    return results


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--direct-worker":
        direct_worker(json.loads(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="measure this OpenAI-compatible server instead of starting ours")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--gguf", help="model file for the direct side (default: from the model's YAML)")
    parser.add_argument("--threads", type=int, help="threads for every side (default: the server's own default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for our server, repeatable (--server-flag=--parallel --server-flag=2)")
    parser.add_argument("--llama-server", metavar="PATH", help="also measure this llama.cpp llama-server binary")
    parser.add_argument("--llama-server-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for llama-server, repeatable (e.g. --llama-server-flag=--no-repack)")
    parser.add_argument("--no-direct", action="store_true", help="skip direct llama-cpp-python")
    args = parser.parse_args()

    local = local_model(args.models_path, args.model, args.gguf)
    if local is None or local.gguf is None:
        if not args.url:
            print(f"{args.model} is not installed in {args.models_path}: "
                  f"python -m localai_aio models install {args.model}")
            return 2
        print(f"no local file for {args.model} (give --gguf): only the server at {args.url} is measured")
        args.no_direct, args.llama_server = True, None
    threads = default_threads(args.threads, local)
    system = local.system_prompt if local else None

    with contextlib.ExitStack() as stack:
        targets: dict[str, str] = {}
        if args.url:
            targets["server"] = args.url
        else:
            flags = ["--preload-models", args.model, *(["--threads", str(args.threads)] if args.threads else []),
                     *args.server_flag]
            targets["server"] = stack.enter_context(server(args.models_path, *flags))[0]
        if args.llama_server:
            targets["llama-server"] = stack.enter_context(llama_server(
                args.llama_server, str(local.gguf), ctx=local.context_size, slots=1, threads=threads,
                extra=(*([] if local.extra_buffers else ["--no-repack"]), *args.llama_server_flag)))[0]
        for name, url in targets.items():
            warm_up(url, args.model, label=name)

        rows: dict[str, list[list[float]]] = {name: [] for name in [*targets, "responses", "direct"]}
        for r in range(args.rounds):  # alternate so that machine noise hits every side alike
            prompts = [p.format(i=r) for p in PROMPTS]
            for name, url in targets.items():
                sides = [("responses", True), (name, False)] if name == "server" else [(name, False)]
                if name == "server":  # both APIs then find the prompts in the prompt cache alike
                    server_runs(url, args.model, system, prompts, 2)
                if r % 2:
                    sides.reverse()
                for side, responses in sides:  # the server's prompts also through the Responses API
                    rows[side] += server_runs(url, args.model, system, prompts, args.max_tokens, responses)
            if not args.no_direct:
                rows["direct"] += direct_runs({"gguf": str(local.gguf), "ctx": local.context_size,
                                               "threads": threads, "system": system, "prompts": prompts,
                                               "max_tokens": args.max_tokens,
                                               "extra_buffers": local.extra_buffers})

    stats = {name: (median([x[0] for x in v]), median([x[1] for x in v]), median([x[2] for x in v]))
             for name, v in rows.items() if v}
    print(f"\nmodel {args.model}, {threads} thread(s) (server default unless --threads), {args.rounds} round(s) "
          f"x {len(PROMPTS)} prompts per side, max_tokens {args.max_tokens}, temperature 0")
    labels = {"server": "server (openai client)", "responses": "server, /v1/responses",
              "llama-server": "llama.cpp llama-server", "direct": "direct llama-cpp-python"}
    for name, (ttft, rate, n) in stats.items():
        print(f"{labels[name]:26s} decode {rate:7.1f} tok/s, time to first token {ttft * 1000:7.1f} ms "
              f"(median {n:.0f} tokens)")
    s_ttft, s_rate, _ = stats["server"]
    if "direct" in stats:
        d_ttft, d_rate, _ = stats["direct"]
        ratio, added = s_rate / d_rate, (s_ttft - d_ttft) * 1000
        print(f"decode speed ratio server/direct: {ratio:.3f}x  (target >= 1.0x: {verdict(ratio >= 1.0)})")
        print(f"time to first token added by the server: {added:+.1f} ms  (target < 5 ms: {verdict(added < 5)})")
    if "responses" in stats:
        r_ttft, r_rate, _ = stats["responses"]
        rate_ratio, ttft_ratio = r_rate / s_rate, r_ttft / s_ttft
        print(f"/v1/responses vs chat completions: decode {rate_ratio:.3f}x, time to first token {ttft_ratio:.3f}x  "
              f"(target within 3%: {verdict(rate_ratio >= 0.97 and ttft_ratio <= 1.03)})")
    if "llama-server" in stats:
        l_ttft, l_rate, _ = stats["llama-server"]
        print(f"server/llama-server: decode {s_rate / l_rate:.3f}x, "
              f"time to first token {(s_ttft - l_ttft) * 1000:+.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
