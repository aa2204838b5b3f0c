"""Continuous batching on llama-cpp: many requests in one context, on the engine's own thread.

The tiny GGUF's greedy output depends only on the last token (see tiny_models.py), so a request's
answer is known exactly whether it runs alone or beside others; the real default model checks the
same on real weights (marked ``model``).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import pytest

from conftest import default_model_configs, drain_until_closed, sse_events, stalled_request, write_model_yaml
from localai_aio.config import ServerSettings
from tiny_models import write_standin_embedder, write_tiny_gguf

pytestmark = pytest.mark.llama

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO, WORLD, EXCLAIM = 261, 262, 263
HI = [{"role": "user", "content": "hi"}]
HI_PROMPT_TOKENS = 24
CYCLE = " Hello world!"


def metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M)
    assert match, f"{name} for {model} not in /metrics"
    return float(match.group(1))


@pytest.fixture
def batch_models(tmp_path: Path, tiny_gguf: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "b4", backend="llama-cpp", parallel=4, context_size=1024, parameters={"model": "t.gguf"})
    write_model_yaml(models, "b1", backend="llama-cpp", parallel=1, context_size=1024, parameters={"model": "t.gguf"})
    return models


@pytest.fixture
async def bclient(make_client, tmp_path: Path, batch_models: Path):  # noqa: ANN001
    return await make_client(ServerSettings(models_path=str(batch_models), config_dir=str(tmp_path / "d"), threads=1))


async def completion(client, prompt: object, **extra: object) -> dict:  # noqa: ANN001
    resp = await client.post(COMPLETIONS, json={"model": "b4", "prompt": prompt, "temperature": 0, **extra})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_concurrent_streams_equal_their_solo_runs(bclient) -> None:  # noqa: ANN001
    prompts = [[HELLO], [WORLD], [EXCLAIM], "hi there", [HELLO, WORLD]]
    alone = [(await completion(bclient, p, max_tokens=12))["choices"][0]["text"] for p in prompts]
    assert alone[0] == " world!" + CYCLE * 3 + " Hello"  # 12 tokens

    async def streamed(prompt: object) -> str:
        resp = await bclient.post(COMPLETIONS, json={"model": "b4", "prompt": prompt, "temperature": 0,
                                                     "max_tokens": 12, "stream": True})
        return "".join(e["choices"][0]["text"] for e in await sse_events(resp))

    together = await asyncio.gather(*(streamed(p) for p in prompts))  # 5 requests on 4 slots: one waits
    assert together == alone
    report = await (await bclient.get("/metrics")).text()
    assert metric(report, "localai_model_slots", "b4") == 4
    assert metric(report, "localai_model_slots_busy", "b4") == 0


async def test_long_prompt_is_prefilled_in_chunks_beside_a_running_stream(bclient) -> None:  # noqa: ANN001
    async def stream_text() -> str:
        resp = await bclient.post(COMPLETIONS, json={"model": "b4", "prompt": [EXCLAIM], "temperature": 0,
                                                     "max_tokens": 30, "stream": True})
        return "".join(e["choices"][0]["text"] for e in await sse_events(resp))

    running = asyncio.ensure_future(stream_text())
    long = [HELLO, WORLD, EXCLAIM] * 233 + [HELLO]  # 700 tokens: two chunks of at most 512
    body = await completion(bclient, long, max_tokens=4)
    assert body["choices"][0]["text"] == " world! Hello world"
    assert body["usage"]["prompt_tokens"] == 700
    assert await running == (" Hello world!" * 10)  # the stream runs on while the long prompt is computed


def test_empty_prompt_is_refused() -> None:
    from localai_aio.errors import InvalidRequest
    from localai_aio.text.engine_fit import check_prompt_fits

    class Engine:
        n_ctx = 16

    with pytest.raises(InvalidRequest, match="empty"):
        check_prompt_fits(Engine(), [])  # type: ignore[arg-type]


async def test_grammar_and_free_requests_in_one_batch(bclient) -> None:  # noqa: ANN001
    free = {"model": "b4", "messages": HI, "max_tokens": 9, "temperature": 0}
    constrained = {**free, "max_tokens": 40, "response_format": {"type": "json_schema", "json_schema": {
        "name": "w", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                "additionalProperties": False}}}}
    responses = await asyncio.gather(*(bclient.post(CHAT, json=r) for r in (free, constrained, free, constrained)))
    bodies = [await r.json() for r in responses]
    assert [b["choices"][0]["message"]["content"] for b in bodies[::2]] == [CYCLE * 3] * 2
    for body in bodies[1::2]:
        assert isinstance(json.loads(body["choices"][0]["message"]["content"])["ok"], bool)


async def test_n_choices_share_the_prompt(bclient) -> None:  # noqa: ANN001
    body = await (await bclient.post(CHAT, json={"model": "b4", "messages": HI, "max_tokens": 3,
                                                 "temperature": 0, "n": 3})).json()
    assert [c["message"]["content"] for c in body["choices"]] == [" Hello world!"] * 3
    report = await (await bclient.get("/metrics")).text()
    # The prompt is computed once; each further choice shares its cells and decodes only its last token.
    assert metric(report, "localai_prompt_tokens_computed_total", "b4") == HI_PROMPT_TOKENS + 2
    assert metric(report, "localai_prompt_tokens_cached_total", "b4") == 2 * (HI_PROMPT_TOKENS - 1)


async def test_n_beyond_the_slots_still_answers(bclient) -> None:  # noqa: ANN001
    body = await (await bclient.post(CHAT, json={"model": "b1", "messages": HI, "max_tokens": 2,
                                                 "temperature": 0, "n": 3})).json()
    assert [c["message"]["content"] for c in body["choices"]] == [" Hello world"] * 3
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]


async def test_prefix_cache_reports_cached_tokens(bclient) -> None:  # noqa: ANN001
    first = await (await bclient.post(CHAT, json={"model": "b4", "messages": HI, "max_tokens": 3,
                                                  "temperature": 0})).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    turn = HI + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "hi"}]
    second = await (await bclient.post(CHAT, json={"model": "b4", "messages": turn, "max_tokens": 3,
                                                   "temperature": 0})).json()
    # The first turn's prompt is reused (all of it: the answer differs from the cached text after it).
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= HI_PROMPT_TOKENS - 1
    assert second["usage"]["prompt_tokens"] > HI_PROMPT_TOKENS + 3
    assert second["choices"][0]["message"]["content"] == " Hello world!"


async def test_conversation_cache_survives_another_conversation_in_its_slot(bclient) -> None:  # noqa: ANN001
    """One slot (b1): A's first turn, then B's in the same slot, then A's next turn still starts from A's
    cache, which waited in host memory."""
    async def turn(messages: list) -> dict:
        return await (await bclient.post(CHAT, json={"model": "b1", "messages": messages, "max_tokens": 3,
                                                     "temperature": 0})).json()

    a = [{"role": "system", "content": "a b " * 40}, {"role": "user", "content": "hi"}]
    b = [{"role": "system", "content": "the capital " * 40}, {"role": "user", "content": "hi"}]
    first_a = await turn(a)
    await turn(b)
    a_prompt = first_a["usage"]["prompt_tokens"]
    second_a = await turn(a + [{"role": "assistant", "content": first_a["choices"][0]["message"]["content"]},
                               {"role": "user", "content": "bye"}])
    assert second_a["usage"]["prompt_tokens_details"]["cached_tokens"] >= a_prompt
    report = await (await bclient.get("/metrics")).text()
    assert metric(report, "localai_prompt_cache_bytes", "b1") > 0
    assert metric(report, "localai_model_slots_busy", "b1") == 0


async def test_leaving_client_frees_its_slot_within_a_step(bclient) -> None:  # noqa: ANN001
    long = {"model": "b4", "prompt": [HELLO], "temperature": 0, "max_tokens": 900, "stream": True}
    resp = await bclient.post(COMPLETIONS, json=long)
    await resp.content.readline()  # the stream has started
    other = asyncio.ensure_future(completion(bclient, [WORLD], max_tokens=5))
    report = await (await bclient.get("/metrics")).text()
    assert metric(report, "localai_model_slots_busy", "b4") >= 1
    resp.close()  # the client leaves mid-stream
    assert (await other)["choices"][0]["text"] == "! Hello world! Hello"
    for _ in range(100):
        report = await (await bclient.get("/metrics")).text()
        if metric(report, "localai_model_slots_busy", "b4") == 0:
            break
        await asyncio.sleep(0.02)
    assert metric(report, "localai_model_slots_busy", "b4") == 0
    generated = metric(report, "localai_generated_tokens_total", "b4")
    assert generated < 900  # generation stopped instead of running to max_tokens


async def test_queue_beyond_the_slots_is_503(make_client, tmp_path: Path, batch_models: Path) -> None:  # noqa: ANN001
    bclient = await make_client(ServerSettings(models_path=str(batch_models), config_dir=str(tmp_path / "d"),
                                               threads=1, queue_size=0))
    resp = await bclient.post(COMPLETIONS, json={"model": "b1", "prompt": [HELLO], "max_tokens": 900,
                                                 "stream": True, "temperature": 0})
    await resp.content.readline()
    busy = await bclient.post(COMPLETIONS, json={"model": "b1", "prompt": [HELLO], "max_tokens": 1})
    assert busy.status == 503 and busy.headers["Retry-After"] == "1"
    assert (await busy.json())["error"]["code"] == "server_overloaded"
    resp.close()


async def test_a_full_context_turns_the_newest_request_away(make_client, tmp_path: Path,  # noqa: ANN001
                                                            batch_models: Path) -> None:
    """Two requests that each fit the context alone but not together: when a decode finds no room left,
    the newest request is answered 503 (retry later), the older one runs to its end, and the next
    request is served as usual."""
    write_model_yaml(batch_models, "b2", backend="llama-cpp", parallel=2, context_size=1024,
                     parameters={"model": "t.gguf"})
    bclient = await make_client(ServerSettings(models_path=str(batch_models), config_dir=str(tmp_path / "d"),
                                               threads=1))
    first = await bclient.post(COMPLETIONS, json={"model": "b2", "prompt": [HELLO], "max_tokens": 1000,
                                                  "stream": True, "temperature": 0})
    assert first.status == 200
    head = json.loads((await first.content.readline()).removeprefix(b"data: "))  # admitted and generating
    assert await first.content.readline() == b"\n"
    newest = await bclient.post(COMPLETIONS, json={"model": "b2", "prompt": [WORLD], "max_tokens": 1000,
                                                   "temperature": 0})
    assert newest.status == 503 and newest.headers["Retry-After"] == "1"
    error = (await newest.json())["error"]
    assert error["code"] == "server_overloaded"
    assert error["message"] == ("Model 'b2' has no room left in its context cache (1024 tokens shared by 2 "
                                "requests); retry later")
    events = [head, *await sse_events(first)]
    assert "".join(e["choices"][0]["text"] for e in events) == " world!" + CYCLE * 332 + " Hello world"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    after = await bclient.post(COMPLETIONS, json={"model": "b2", "prompt": [WORLD], "max_tokens": 3,
                                                  "temperature": 0})
    assert after.status == 200, await after.text()
    assert (await after.json())["choices"][0]["text"] == "! Hello world"
    report = await (await bclient.get("/metrics")).text()
    assert metric(report, "localai_model_slots_busy", "b2") == 0


async def test_every_engine_call_runs_on_one_thread(make_client, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Chat, completions, tokenization, grammars, embeddings, cancellation and unload: one thread per engine.
    Reading llama.cpp's vocabulary (tokenizing, rendering pieces, parsing a grammar) may also happen on
    worker threads, so a long prompt never stalls the decode loop, but never on the event loop's."""
    import llama_cpp
    import onnxruntime

    seen: dict[str, set[tuple[str, int]]] = {}

    def record(kind: str) -> None:
        seen.setdefault(kind, set()).add((threading.current_thread().name, threading.get_ident()))

    vocabulary = ("llama_tokenize", "llama_token_to_piece", "llama_sampler_init_grammar")
    for name in ("llama_model_load_from_file", "llama_init_from_model", "llama_decode", "llama_get_logits_ith",
                 "llama_sampler_sample", "llama_get_embeddings_seq", "llama_memory_seq_rm", "llama_free",
                 "llama_model_free", *vocabulary):
        original = getattr(llama_cpp, name)

        def wrapper(*args, __original=original, __kind="vocabulary" if name in vocabulary else "llama",
                    **kwargs):  # noqa: ANN002, ANN003, ANN202
            record(__kind)
            return __original(*args, **kwargs)

        monkeypatch.setattr(llama_cpp, name, wrapper)
    session_run = onnxruntime.InferenceSession.run
    session_init = onnxruntime.InferenceSession.__init__

    def run(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        record("onnx")
        return session_run(self, *args, **kwargs)

    def init(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        record("onnx")
        return session_init(self, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", run)
    monkeypatch.setattr(onnxruntime.InferenceSession, "__init__", init)

    models = tmp_path / "models"
    models.mkdir()
    write_tiny_gguf(models / "t.gguf")
    write_standin_embedder(models / "standin")
    write_model_yaml(models, "g", backend="llama-cpp", embeddings=True, context_size=512,
                     parameters={"model": "t.gguf"})
    write_model_yaml(models, "e", backend="onnx-embeddings", parameters={"model": "standin"})
    # idle long enough that a slow machine does not unload (and reload on a new thread) between rounds
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                              idle_timeout=2))
    for _ in range(3):
        requests = [
            client.post(CHAT, json={"model": "g", "messages": HI, "max_tokens": 4}),
            client.post(CHAT, json={"model": "g", "messages": HI, "max_tokens": 4, "stream": True}),
            client.post(CHAT, json={"model": "g", "messages": HI, "max_tokens": 20,
                                    "response_format": {"type": "json_object"}}),
            client.post(CHAT, json={"model": "g", "messages": HI, "grammar": "root ::= [a-"}),
            client.post(COMPLETIONS, json={"model": "g", "prompt": "hi", "max_tokens": 3, "logprobs": 2}),
            client.post("/v1/embeddings", json={"model": "g", "input": ["hi", "bye"]}),
            client.post("/v1/embeddings", json={"model": "e", "input": ["the cat"]}),
        ]
        statuses = [r.status for r in await asyncio.gather(*requests)]
        assert statuses == [200, 200, 200, 400, 200, 200, 200]
        resp = await client.post(COMPLETIONS, json={"model": "g", "prompt": [HELLO], "max_tokens": 400, "stream": True})
        await resp.content.readline()
        resp.close()  # cancellation
    for _ in range(400):  # idle unload closes both engines
        report = await (await client.get("/metrics")).text()
        if "localai_loaded_models 0.0" in report:
            break
        await asyncio.sleep(0.05)
    assert "localai_loaded_models 0.0" in report
    readers = {name for name, _ in seen.pop("vocabulary")}
    assert readers and threading.main_thread().name not in readers
    assert {kind: [name for name, _ in threads] for kind, threads in seen.items()} == {
        "llama": ["engine-g-0"], "onnx": ["engine-e-0"]}  # one thread each, from load to close


@pytest.mark.model
async def test_real_model_batched_greedy_equals_solo(tmp_path: Path) -> None:
    """SmolLM2 at temperature 0: four different chats at once answer as each answers alone."""
    from localai_aio.app import create_app
    from localai_aio.config import load_model_configs

    configs = default_model_configs("smollm2-135m-instruct")
    models = Path(next(iter(configs.values())).source).parent
    configs, _ = load_model_configs(models)
    settings = ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=2)
    from aiohttp.test_utils import TestClient, TestServer

    questions = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello."]
    async with TestClient(TestServer(create_app(settings, model_configs={
            "smollm2-135m-instruct": configs["smollm2-135m-instruct"]}))) as client:
        async def ask(question: str) -> str:
            body = await (await client.post(CHAT, json={
                "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": question}],
                "temperature": 0, "max_tokens": 24})).json()
            return body["choices"][0]["message"]["content"]

        alone = [await ask(q) for q in questions]
        together = await asyncio.gather(*(ask(q) for q in questions))
    # What holds on real weights: the answers start the same and say the same thing. Exact equality does
    # not: with other requests in the batch, attention spans their cells too and the sums change in the
    # last bits, so greedy decoding can part ways at a near-tie after a dozen tokens or so.
    assert "Paris" in alone[0] and "Paris" in together[0]
    assert [t[:16] for t in together] == [a[:16] for a in alone]
    assert all(together)


async def test_a_client_that_stops_reading_does_not_hold_the_model(make_client, tmp_path: Path,  # noqa: ANN001
                                                                   tiny_gguf: Path) -> None:
    """A raw socket asks for a long stream and never reads. Once generation ends the model serves the
    next request at once (with no queue: a held model would answer 503), and after --write-timeout the
    stalled connection is dropped."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "slow", backend="llama-cpp", parallel=1, context_size=16384,
                     parameters={"model": "t.gguf"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1,
                                              queue_size=0, write_timeout=1.5))
    sock = await stalled_request(client, COMPLETIONS, {"model": "slow", "prompt": [HELLO], "max_tokens": 12000,
                                                       "stream": True, "logprobs": 5, "temperature": 0})
    try:
        seen = []
        for _ in range(1200):  # generation starts, then ends (its events wait in the server's buffer)
            report = await (await client.get("/metrics")).text()
            busy = re.search(r'^localai_model_slots_busy\{model="slow"\} (\S+)$', report, re.M)
            seen.append(busy and float(busy.group(1)))
            if seen[-1] == 0 and 1 in seen:
                break
            await asyncio.sleep(0.05)
        assert seen[-1] == 0 and 1 in seen
        second = await client.post(COMPLETIONS, json={"model": "slow", "prompt": [WORLD], "max_tokens": 3,
                                                      "temperature": 0})
        assert second.status == 200, await second.text()
        assert (await second.json())["choices"][0]["text"] == "! Hello world"
        await asyncio.sleep(2.5)  # past the write timeout
        received = await drain_until_closed(sock)
        assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in received
        assert received.count(b"\ndata: ") < 12000  # dropped long before the end of the stream
    finally:
        sock.close()
