"""Concurrent streaming chats on one GGUF model: aggregate throughput, time to first token under load, reuse
of a long conversation's prompt, and the memory cost of sequence slots. Optionally llama.cpp's own
``llama-server`` is measured beside ours in the same run.

    python bench/concurrency.py [--models-path ~/.cache/localai-aio/models] [--model smollm2-135m-instruct]
        [--levels 1,2,4,8] [--rounds 3] [--max-tokens 128] [--parallel 8] [--threads N]
        [--sections throughput,multi-turn,memory] [--server-flag=--some-flag ...]
        [--url http://host:port] [--llama-server /tmp/llsrc/.../build/bin/llama-server]
        [--llama-server-flag=--some-flag ...] [--llama-server-ctx N]

Sections (all run by default):

- throughput: 1, 2, 4 and 8 simultaneous streaming chats (one thread and one openai client each, different
  prompts, temperature 0, max_tokens 128), a few rounds per level, levels interleaved within each round.
  Aggregate tokens/s = the completion tokens of all streams (the server's usage, else text chunks) / wall
  time from the first request sent to the last token received; printed as a ratio to the 1-stream aggregate
  of the same server in the same run. Time to first token: p50/p95 over every stream of a level.
  Targets: aggregate >= 1.4x at 4 streams and >= 1.7x at 8; with 4 streams p50 TTFT < 150 ms, p95 < 300 ms.
- multi-turn: two conversations, each with about 1,500 tokens of generated history (distinct numbered
  sentences in system, user and assistant messages, a fresh random tag per run so nothing is cached from an
  earlier run), streamed interleaved: A turn 1, B turn 1, A turn 2, B turn 2 (each next turn = history + the
  assistant's reply + a short new user message). Prints each later turn's TTFT as % of its conversation's
  first turn (target <= 10%), and ``usage.prompt_tokens_details.cached_tokens`` when the server reports it.
- memory (only when this script starts our server): VmRSS of the server process tree after warm-up and one
  4-stream round, with ``--parallel 4`` vs ``--parallel 1``. Target <= 1.25x.

Every server is warmed with 32 mixed requests (see _clients.warm_up) before anything is timed. Our server
runs at its defaults plus ``--preload-models MODEL --parallel N`` (``--parallel 8`` unless told; left out, with
a note, when the server does not know the flag); ``--threads`` is passed only when given here. llama-server
gets the same slot count, ``-c context_size*slots`` (``--llama-server-ctx`` to change; note that our server's
slots share ``context_size`` cells), the same thread count, ``--kv-unified``/``-cb`` when its --help lists
them, and ``--no-repack`` when our server keeps weights in plain buffers (CPUs that advertise AMX; see
backends/llama_cpp/engine.extra_buffers), so that both run the same kernels. With ``--url`` any OpenAI-compatible
server is measured and none is started. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import threading

from _clients import (
    DEFAULT_MODEL,
    Stream,
    client,
    default_threads,
    local_model,
    median,
    percentile,
    stream_chat,
    verdict,
    warm_up,
)
from _server import DEFAULT_MODELS, llama_server, serve_has_flag, server, tree_rss_kb

SUBJECTS = [
    "a dragon who learns to bake bread", "a lighthouse keeper and a lost whale", "a robot that paints sunsets",
    "two children building a raft", "a detective who solves crimes with music", "a village that forgets winter",
    "a cat that runs a small hotel", "an astronaut growing tomatoes on the moon", "a clockmaker's last clock",
    "a river that changes direction every night",
]
THROUGHPUT_TARGETS = {4: 1.4, 8: 1.7}


# ----------------------------------------------------------------------------------------------------------
# throughput
# ----------------------------------------------------------------------------------------------------------

def concurrent_round(clients: list, model: str, system: str | None, n: int, offset: int,  # noqa: ANN001
                     max_tokens: int) -> tuple[list[Stream], float]:
    """``n`` simultaneous streaming chats; returns the streams and the aggregate tokens/s."""
    results: list[Stream | None] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        subject = SUBJECTS[(offset + i) % len(SUBJECTS)]
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": f"Write a long, detailed story about {subject}."}]
        barrier.wait()
        results[i] = stream_chat(clients[i], model, messages, max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    streams = [r for r in results if r is not None]
    good = [s for s in streams if s.error is None]
    if not good:
        return streams, float("nan")
    wall = max(s.last for s in good) - min(s.sent for s in streams)
    return streams, sum(s.tokens for s in good) / wall


def throughput(targets: dict[str, str], args: argparse.Namespace, system: str | None) -> None:
    levels = sorted({1, *(int(x) for x in args.levels.split(","))})  # 1 stream is the baseline
    clients = {name: [client(url) for _ in range(max(levels))] for name, url in targets.items()}
    agg: dict[tuple[str, int], list[float]] = {}
    ttfts: dict[tuple[str, int], list[float]] = {}
    finishes: dict[tuple[str, int], dict[str, int]] = {}
    errors: dict[tuple[str, int], list[str]] = {}
    for r in range(args.rounds):  # levels and servers interleaved so that machine noise hits all alike
        for n in levels:
            for name in targets:
                streams, rate = concurrent_round(clients[name], args.model, system, n, r * 3 + n, args.max_tokens)
                key = (name, n)
                agg.setdefault(key, []).append(rate)
                ttfts.setdefault(key, []).extend(s.ttft for s in streams if s.error is None)
                for s in streams:
                    f = finishes.setdefault(key, {})
                    f[s.finish or "none"] = f.get(s.finish or "none", 0) + 1
                    if s.error:
                        errors.setdefault(key, []).append(s.error)
                print(f"  round {r + 1} {name}: {n} stream(s) {rate:7.1f} tok/s aggregate", flush=True)
    for cls in clients.values():
        for c in cls:
            c.close()

    print(f"\n== throughput: {args.rounds} round(s) per level, max_tokens {args.max_tokens}, temperature 0")
    for name in targets:
        base = median(agg[(name, 1)]) if (name, 1) in agg else float("nan")
        print(f"{name}:")
        for n in levels:
            key = (name, n)
            rate = median(agg[key])
            t = ttfts.get(key) or [float("nan")]
            fin = ", ".join(f"{k} {v}" for k, v in sorted(finishes.get(key, {}).items()))
            print(f"  {n} stream(s): aggregate {rate:7.1f} tok/s = {rate / base:5.2f}x 1 stream; "
                  f"TTFT p50 {percentile(t, 50) * 1000:6.0f} ms, p95 {percentile(t, 95) * 1000:6.0f} ms; "
                  f"finish: {fin}")
            for e in errors.get(key, [])[:2]:
                print(f"    error: {e[:300]}")
        for n, target in THROUGHPUT_TARGETS.items():
            if (name, n) in agg:
                ratio = median(agg[(name, n)]) / base
                print(f"  target aggregate at {n} >= {target}x: {verdict(ratio >= target)} ({ratio:.2f}x)")
        if ttfts.get((name, 4)):
            p50, p95 = percentile(ttfts[(name, 4)], 50) * 1000, percentile(ttfts[(name, 4)], 95) * 1000
            print(f"  target TTFT at 4: p50 < 150 ms {verdict(p50 < 150)} ({p50:.0f} ms), "
                  f"p95 < 300 ms {verdict(p95 < 300)} ({p95:.0f} ms)")
    if "server" in targets and "llama-server" in targets:
        print("server / llama-server:")
        for n in levels:
            ours, theirs = median(agg[("server", n)]), median(agg[("llama-server", n)])
            p50s = (percentile(ttfts.get(("server", n)) or [float("nan")], 50),
                    percentile(ttfts.get(("llama-server", n)) or [float("nan")], 50))
            print(f"  {n} stream(s): aggregate {ours / theirs:5.2f}x, TTFT p50 {p50s[0] * 1000:.0f} ms vs "
                  f"{p50s[1] * 1000:.0f} ms")


# ----------------------------------------------------------------------------------------------------------
# multi-turn
# ----------------------------------------------------------------------------------------------------------

WORDS = {
    "A": (["harbour", "lighthouse", "sailor", "net", "gull", "tide", "anchor", "ferry", "reef", "storm"],
          ["red", "old", "quiet", "bright", "wet", "narrow", "heavy", "lonely", "salty", "tall"]),
    "B": (["orchard", "tractor", "barn", "meadow", "beehive", "fence", "well", "scarecrow", "mill", "pasture"],
          ["green", "dusty", "warm", "wooden", "sweet", "wide", "sleepy", "golden", "muddy", "busy"]),
}


def sentences(tag: str, rng: random.Random, start: int, count: int) -> str:
    nouns, adjectives = WORDS[tag]
    out = []
    for k in range(start, start + count):
        a, b = rng.sample(nouns, 2)
        out.append(f"{k}. The {rng.choice(adjectives)} {a} is {rng.randint(2, 99)} steps from the "
                   f"{rng.choice(adjectives)} {b}.")
    return " ".join(out)


def conversation(tag: str, nonce: str, approx_tokens: int) -> list[dict[str, str]]:
    """System + 2 user/assistant exchanges + a user question, about ``approx_tokens`` in all (a numbered
    sentence is about 17 tokens with SmolLM2's tokenizer)."""
    rng = random.Random(f"{tag}-{nonce}")
    per = max(1, approx_tokens // 17 // 5)
    n = 1
    msgs = [{"role": "system", "content": f"Session {nonce}-{tag}. You are a helpful assistant who remembers "
                                          f"these notes:\n" + sentences(tag, rng, n, per)}]
    n += per
    for _ in range(2):
        msgs.append({"role": "user", "content": "Remember these notes too: " + sentences(tag, rng, n, per)})
        n += per
        msgs.append({"role": "assistant", "content": "Noted. " + sentences(tag, rng, n, per)})
        n += per
    msgs.append({"role": "user", "content": "In two sentences, what is near the first thing in my notes?"})
    return msgs


def multi_turn(targets: dict[str, str], args: argparse.Namespace) -> None:
    follow_ups = ["Which of those is the oldest? Answer briefly.", "Say that again in other words.",
                  "Now give me one more detail from the notes."]
    print(f"\n== multi-turn: 2 conversations of ~{args.history_tokens} tokens, {args.turns} turns each, "
          f"interleaved A1 B1 A2 B2 ..., {args.rounds} round(s), replies of <= {args.turn_tokens} tokens")
    for name, url in targets.items():
        cl = client(url)
        pct: list[float] = []
        lines = []
        for r in range(args.rounds):
            nonce = f"{random.randrange(16**8):08x}"
            convs = {tag: conversation(tag, nonce, args.history_tokens) for tag in "AB"}
            first: dict[str, float] = {}
            for turn in range(args.turns):
                for tag, msgs in convs.items():
                    s = stream_chat(cl, args.model, msgs, args.turn_tokens)
                    if s.error:
                        lines.append(f"  round {r + 1} {tag}{turn + 1}: error {s.error[:300]}")
                        break
                    ttft = s.ttft * 1000
                    extra = ""
                    if turn == 0:
                        first[tag] = ttft
                    elif tag in first:
                        pct.append(100 * ttft / first[tag])
                        extra = f" = {pct[-1]:5.1f}% of turn 1"
                    cached = f", cached_tokens {s.cached_tokens}" if s.cached_tokens is not None else ""
                    lines.append(f"  round {r + 1} {tag}{turn + 1}: TTFT {ttft:7.1f} ms{extra} "
                                 f"(prompt_tokens {s.prompt_tokens}{cached})")
                    msgs += [{"role": "assistant", "content": s.text},
                             {"role": "user", "content": follow_ups[turn % len(follow_ups)]}]
        cl.close()
        print(f"{name}:")
        print("\n".join(lines))
        if pct:
            worst = max(pct)
            print(f"  target later-turn TTFT <= 10% of turn 1: {verdict(worst <= 10)} "
                  f"(median {median(pct):.1f}%, worst {worst:.1f}%)")


# ----------------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------------

def memory(args: argparse.Namespace, base_flags: list[str], system: str | None) -> None:
    print("\n== memory: server RSS after warm-up and one 4-stream round, --parallel 4 vs --parallel 1")
    if not serve_has_flag("--parallel"):
        print("  this server has no --parallel flag: both runs use its default (expect about 1.0x)")
    rss = {}
    for slots in (1, 4):
        flags = [*base_flags, *(["--parallel", str(slots)] if serve_has_flag("--parallel") else [])]
        with server(args.models_path, *flags) as (url, proc):
            warm_up(url, args.model, label=f"--parallel {slots}")
            clients = [client(url) for _ in range(4)]
            streams, rate = concurrent_round(clients, args.model, system, 4, 0, args.max_tokens)
            for c in clients:
                c.close()
            failed = sum(1 for s in streams if s.error)
            rss[slots] = tree_rss_kb(proc.pid)
            print(f"  --parallel {slots}: VmRSS {rss[slots]['VmRSS'] / 1024:7.1f} MB (anon "
                  f"{rss[slots]['RssAnon'] / 1024:.1f} MB, file {rss[slots]['RssFile'] / 1024:.1f} MB); "
                  f"4 streams {rate:.1f} tok/s, {failed} failed", flush=True)
    ratio = rss[4]["VmRSS"] / rss[1]["VmRSS"]
    print(f"  RSS ratio --parallel 4 / --parallel 1: {ratio:.3f}x  (target <= 1.25x: {verdict(ratio <= 1.25)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="measure this OpenAI-compatible server instead of starting ours")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--levels", default="1,2,4,8", help="simultaneous streams, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--parallel", type=int, default=8, help="sequence slots for our server and llama-server")
    parser.add_argument("--threads", type=int, help="threads (default: the server's own default, the CPU count)")
    parser.add_argument("--sections", default="throughput,multi-turn,memory",
                        help="comma-separated: throughput, multi-turn, memory")
    parser.add_argument("--history-tokens", type=int, default=1500, help="multi-turn history size, about")
    parser.add_argument("--turns", type=int, default=2, help="multi-turn turns per conversation")
    parser.add_argument("--turn-tokens", type=int, default=48, help="max_tokens of a multi-turn reply")
    parser.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for our server, repeatable (--server-flag=--queue-size --server-flag=32)")
    parser.add_argument("--llama-server", metavar="PATH", help="also measure this llama.cpp llama-server binary")
    parser.add_argument("--llama-server-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for llama-server, repeatable (e.g. --llama-server-flag=--no-repack)")
    parser.add_argument("--gguf", help="model file for llama-server (default: from the model's YAML)")
    parser.add_argument("--llama-server-ctx", type=int, metavar="N",
                        help="llama-server's -c, total KV cells (default: the model's context_size x --parallel)")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"throughput", "multi-turn", "memory"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    local = local_model(args.models_path, args.model, args.gguf)
    if not args.url and (local is None or local.gguf is None):
        print(f"{args.model} is not installed in {args.models_path}: python -m localai_aio models install {args.model}")
        return 2
    if args.llama_server and (local is None or local.gguf is None):
        parser.error("--llama-server needs the model file: give --gguf")
    threads = default_threads(args.threads, local)
    system = local.system_prompt if local else None
    base_flags = ["--preload-models", args.model, *(["--threads", str(args.threads)] if args.threads else []),
                  *args.server_flag]

    with contextlib.ExitStack() as stack:
        targets: dict[str, str] = {}
        if args.url:
            targets["server"] = args.url
        else:
            flags = list(base_flags)
            if serve_has_flag("--parallel"):
                flags += ["--parallel", str(args.parallel)]
            else:
                print(f"note: this server has no --parallel flag; started without --parallel {args.parallel}")
            targets["server"] = stack.enter_context(server(args.models_path, *flags))[0]
        if args.llama_server:
            targets["llama-server"] = stack.enter_context(llama_server(
                args.llama_server, str(local.gguf), slots=args.parallel,
                ctx=args.llama_server_ctx // args.parallel if args.llama_server_ctx else local.context_size,
                threads=threads, extra=(*([] if local.extra_buffers else ["--no-repack"]), *args.llama_server_flag)))[0]
        slots = "the server's own slots" if args.url and not args.llama_server else f"{args.parallel} slot(s)"
        print(f"model {args.model}, {threads} thread(s), {slots}: " + ", ".join(targets), flush=True)
        if sections & {"throughput", "multi-turn"}:
            for name, url in targets.items():
                warm_up(url, args.model, label=name)
        if "throughput" in sections:
            throughput(targets, args, system)
        if "multi-turn" in sections:
            multi_turn(targets, args)
    if "memory" in sections:
        if args.url:
            print("\n== memory: skipped (needs the server process; not available with --url)")
        else:
            memory(args, base_flags, system)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
