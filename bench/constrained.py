"""What structure costs: the decode rate of constrained answers (a strict ``json_schema``, a required tool
call, a GBNF grammar) against a free answer to the same prompt, on our server and, with ``--llama-server``,
on llama.cpp's own server in the same run; then the compile time of a large schema (20 tools), cold and
cached.

    python bench/constrained.py [--models-path ~/.cache/localai-aio/models] [--model smollm2-135m-instruct]
        [--rounds 5] [--max-tokens 200] [--llama-server PATH] [--threads N]

Target: every constrained answer decodes at >= 0.95x the free rate of the same server (llama.cpp's server
was 0.98x for json_schema when this was written).

How it is measured:

- Both servers run at their defaults for the thread count (ours: ``serve --preload-models MODEL``; the same
  count is given to llama-server, which also gets ``--jinja`` for tools and ``--no-repack`` where our server
  keeps plain weight buffers). Each gets the mixed warm-up traffic of ``_clients.warm_up`` first.
- Every answer is streamed with the official ``openai`` client at temperature 0 with the same prompt; the
  constrained ones are shaped so the model writes as long as the free one: a JSON object with one string
  field of at least 2,000 characters, a call whose one argument is that string, a grammar of letters and
  punctuation. Decode rate is streamed chunks after the first per second (content and tool-call argument
  chunks alike); medians over ``--rounds`` rounds, the kinds in a different order each round.
- Our server sends a call whole once it is complete when the model's template has no tool format of its
  own (the default model's has none), so the tool call is also measured without streaming, against a free
  answer measured the same way: tokens over the time of a request whose prompt a 1-token request has just
  put in the prompt cache.
- Compile time is measured in this process on the model's vocabulary (``LlamaCppEngine.grammars``): the
  tokenizer is built first and reported on its own, then the 20-tool grammar is compiled twice.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from _clients import DEFAULT_MODEL, Stream, client, default_threads, local_model, median, verdict, warm_up
from _server import DEFAULT_MODELS, llama_server, server

PROMPT = "Write a long story about a lighthouse keeper and a storm. Story {i}."
# a long string field, so the structured answer runs as long as the free one (a model would otherwise close
# the object after a title)
STORY_SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"],
                "additionalProperties": False}
WRITE_TOOL = {"type": "function", "function": {
    "name": "write_story", "description": "Write a story down.",
    "parameters": STORY_SCHEMA}}
GBNF = "root ::= [A-Za-z] [A-Za-z ,.!?'\\n]+"


#: Each kind of answer: the extra request fields.
KINDS: dict[str, dict[str, Any]] = {
    "free": {},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "story", "strict": True, "schema": STORY_SCHEMA}}},
    "tool call": {"tools": [WRITE_TOOL], "tool_choice": "required"},
    "gbnf": {"extra_body": {"grammar": GBNF}},
}


def whole(cl, model: str, prompt: str, max_tokens: int, extra: dict[str, Any]) -> float:  # noqa: ANN001
    """Tokens per second of one answer asked without streaming, after a 1-token request has put its prompt
    in the prompt cache: so nearly all of the time is decoding. For calls that a server sends whole once
    they are complete (ours does, for a model whose template has no tool format of its own), where
    streamed chunks cannot be timed."""
    messages = [{"role": "user", "content": prompt}]
    cl.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0, **extra)
    started = time.perf_counter()
    answer = cl.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                        **extra)
    return answer.usage.completion_tokens / (time.perf_counter() - started)


def stream(cl, model: str, prompt: str, max_tokens: int, extra: dict[str, Any]) -> Stream:  # noqa: ANN001
    """One streamed answer; content and tool-call argument chunks both count as tokens."""
    result = Stream(sent=time.perf_counter())
    try:
        for chunk in cl.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, stream=True, **extra):
            for choice in chunk.choices:
                delta = choice.delta
                pieces = [delta.content] + [c.function.arguments for c in delta.tool_calls or [] if c.function]
                for piece in pieces:
                    if piece:
                        result.arrived(piece)
                result.finish = choice.finish_reason or result.finish
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        result.error = f"{type(exc).__name__}: {exc}"
    return result.finished()


TOOL_NAMES = ["get_weather", "search_web", "create_event", "send_email", "get_stock_price", "book_flight",
              "order_food", "translate_text", "set_reminder", "play_music", "get_directions", "convert_currency",
              "create_ticket", "query_database", "resize_image", "schedule_meeting", "lookup_contact",
              "control_lights", "summarize_document", "track_package"]


def twenty_tools() -> list[dict[str, Any]]:
    """Twenty function definitions in the shape of OpenAI's function-calling examples: enums, nested objects,
    arrays, optional fields."""
    tools = []
    for i, name in enumerate(TOOL_NAMES):
        tools.append({"type": "function", "function": {"name": name, "description": f"Tool {i}", "parameters": {
            "type": "object", "additionalProperties": False, "required": ["query", "options"],
            "properties": {
                "query": {"type": "string", "description": "What to look up"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit", "kelvin"]},
                "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                "when": {"type": "string", "format": "date-time"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                "options": {"type": "object", "additionalProperties": False, "required": ["priority"], "properties": {
                    "priority": {"type": "string", "enum": ["low", "normal", "high"]},
                    "notify": {"type": "boolean"},
                    "recipients": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "email": {"type": "string", "format": "email"}},
                        "required": ["email"]}}}}}}}})
    return tools


def compile_times(models_path: str, model: str) -> dict[str, float]:
    from localai_aio.backends.llama_cpp import load
    from localai_aio.config import ServerSettings, load_model_configs
    from localai_aio.text.tool_formats import detect
    from localai_aio.text.tools import plan_tools

    cfg = load_model_configs(models_path)[0][model]
    engine = load(cfg, ServerSettings(models_path=models_path, threads=1))
    try:
        started = time.perf_counter()
        engine.grammars.tokenizer()
        tokenizer = time.perf_counter() - started
        plan = plan_tools({"tools": twenty_tools(), "tool_choice": "required"}, {})
        grammar, _ = plan.constraint(detect(engine.info.chat_template or ""))
        times = []
        for _ in range(2):
            started = time.perf_counter()
            problem = engine.check_grammar(grammar)
            times.append(time.perf_counter() - started)
            if problem:
                raise SystemExit(f"the 20-tool grammar does not compile: {problem}")
        started = time.perf_counter()
        engine.grammars.matcher(grammar)
        copy = time.perf_counter() - started
        return {"tokenizer": tokenizer, "cold": times[0], "cached": times[1], "copy": copy,
                "grammar_kb": len(grammar) / 1024}
    finally:
        engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, help="threads for both servers (default: our server's default)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--llama-server", metavar="PATH", help="also measure this llama.cpp llama-server binary")
    args = parser.parse_args()

    local = local_model(args.models_path, args.model)
    if local is None or local.gguf is None:
        print(f"{args.model} is not installed in {args.models_path}: python -m localai_aio models install {args.model}")
        return 2
    threads = default_threads(args.threads, local)
    rates: dict[tuple[str, str], list[float]] = {}
    with contextlib.ExitStack() as stack:
        targets = {"ours": stack.enter_context(server(args.models_path, "--preload-models", args.model,
                                                      *(["--threads", str(args.threads)] if args.threads else [])))[0]}
        if args.llama_server:
            targets["llama-server"] = stack.enter_context(llama_server(
                args.llama_server, str(local.gguf), ctx=local.context_size, slots=1, threads=threads,
                extra=("--jinja", *([] if local.extra_buffers else ["--no-repack"]))))[0]
        for name, url in targets.items():
            warm_up(url, args.model, label=name)
        for r in range(args.rounds):
            order = list(KINDS.items())
            order = order[r % len(order):] + order[:r % len(order)]
            for name, url in targets.items():
                cl = client(url)
                model = args.model if name == "ours" else "model"
                for kind, extra in order:
                    s = stream(cl, model, PROMPT.format(i=r), args.max_tokens, extra)
                    if s.error or s.pieces < 8:
                        print(f"{name} {kind}: {s.error or f'only {s.pieces} chunks'}")
                        continue
                    rates.setdefault((name, kind), []).append(s.decode_rate)
                for kind in ("free", "tool call"):  # the same pair, not streamed: every server sends the call
                    rate = whole(cl, model, PROMPT.format(i=r), args.max_tokens, KINDS[kind])
                    rates.setdefault((name, f"{kind} (whole)"), []).append(rate)
                cl.close()
    print(f"\nmodel {args.model}, {threads} thread(s), {args.rounds} round(s), max_tokens {args.max_tokens}, "
          "temperature 0, streamed with the openai client")
    ok = True
    for name in targets:
        free = rates.get((name, "free"))
        if not free:
            continue
        print(f"{name:13s} free {median(free):7.1f} tok/s streamed, "
              f"{median(rates[(name, 'free (whole)')]):7.1f} tok/s whole")
        for kind in ("json_schema", "tool call", "gbnf", "tool call (whole)"):
            got = rates.get((name, kind))
            if not got:
                print(f"{'':13s} {kind:17s} not measured (calls streamed whole: see the row below)")
                continue
            base = median(rates[(name, "free (whole)")]) if "whole" in kind else median(free)
            ratio = median(got) / base
            met = ratio >= 0.95
            ok &= met or name != "ours"
            print(f"{'':13s} {kind:17s} {median(got):7.1f} tok/s  {ratio:.3f}x free"
                  + (f"  (target >= 0.95x: {verdict(met)})" if name == "ours" else ""))
    times = compile_times(args.models_path, args.model)
    print(f"grammar of 20 tools ({times['grammar_kb']:.1f} KB of Lark and JSON schema): compile cold "
          f"{times['cold'] * 1000:.1f} ms, cached {times['cached'] * 1000:.3f} ms "
          f"({times['cached'] / times['cold']:.4f}x), a request's copy {times['copy'] * 1000:.3f} ms; "
          f"the model's grammar tokenizer, built once: {times['tokenizer'] * 1000:.0f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
