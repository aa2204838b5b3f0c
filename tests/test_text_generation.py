"""Chat and completions on tiny GGUF models, through both engines.

The tiny model answers a ChatML prompt with " Hello world! Hello world! ..." (one token per word or
"!"), so exact texts, token counts and finish reasons can be asserted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import sse_events, write_model_yaml
from localai_aio.config import ServerSettings
from tiny_models import write_tiny_gguf

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
HELLO, WORLD, EXCLAIM = 261, 262, 263  # " Hello", " world", "!" in the tiny vocabulary
HI_PROMPT_TOKENS = 24  # "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" in the tiny vocabulary

BOTH = pytest.mark.parametrize("model", [
    pytest.param("tiny-llama", marks=pytest.mark.llama),
    pytest.param("tiny-ct", marks=pytest.mark.ctransformers),
])


@BOTH
async def test_chat_greedy_length_and_exact_usage(client, model: str) -> None:  # noqa: ANN001
    resp = await client.post(CHAT, json={"model": model, "messages": HI, "max_tokens": 5, "temperature": 0})
    assert resp.status == 200
    body = await resp.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == model and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": " Hello world! Hello world"},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": HI_PROMPT_TOKENS, "completion_tokens": 5,
                             "total_tokens": HI_PROMPT_TOKENS + 5, "prompt_tokens_details": {"cached_tokens": 0}}


@BOTH
async def test_max_completion_tokens_is_max_tokens(client, model: str) -> None:  # noqa: ANN001
    resp = await client.post(CHAT, json={"model": model, "messages": HI, "max_completion_tokens": 2,
                                         "temperature": 0})
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == " Hello world"
    assert body["usage"]["completion_tokens"] == 2


@BOTH
async def test_stream_equals_non_stream_and_chunk_sequence(client, model: str) -> None:  # noqa: ANN001
    request = {"model": model, "messages": HI, "max_tokens": 7, "temperature": 0}
    plain = await (await client.post(CHAT, json=request)).json()
    resp = await client.post(CHAT, json={**request, "stream": True, "stream_options": {"include_usage": True}})
    events = await sse_events(resp)
    ids = {e["id"] for e in events}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert len({e["created"] for e in events}) == 1
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    first, *middle, finish, usage = events
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] is None
    assert all(e["choices"][0]["finish_reason"] is None for e in middle)
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    # The second request finds the same prompt cached (llama-cpp's prompt cache; all but the last token).
    cached = HI_PROMPT_TOKENS - 1 if model == "tiny-llama" else 0
    assert usage["choices"] == [] and usage["usage"] == {**plain["usage"],
                                                         "prompt_tokens_details": {"cached_tokens": cached}}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in [first, *middle])
    assert text == plain["choices"][0]["message"]["content"] == " Hello world! Hello world! Hello"
    assert len(middle) == 7  # one chunk per token


@BOTH
async def test_stream_without_usage_has_no_usage_chunk(client, model: str) -> None:  # noqa: ANN001
    resp = await client.post(CHAT, json={"model": model, "messages": HI, "max_tokens": 2, "temperature": 0,
                                         "stream": True})
    events = await sse_events(resp)
    assert all("usage" not in e for e in events)
    assert [e["choices"][0]["finish_reason"] for e in events].count("length") == 1


@BOTH
@pytest.mark.parametrize(("stop", "expected"), [
    ("d!", " Hello worl"),
    (["xyz", "ld! He"], " Hello wor"),  # spans three tokens: " world", "!", " Hello"
    ("!", " Hello world"),
])
async def test_stop_strings_never_in_output(client, model: str, stop, expected: str) -> None:  # noqa: ANN001
    request = {"model": model, "messages": HI, "max_tokens": 12, "temperature": 0, "stop": stop}
    body = await (await client.post(CHAT, json=request)).json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"
    events = await sse_events(await client.post(CHAT, json={**request, "stream": True}))
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(pieces) == expected
    assert [e["choices"][0]["finish_reason"] for e in events].count("stop") == 1


@BOTH
async def test_n_choices(client, model: str) -> None:  # noqa: ANN001
    request = {"model": model, "messages": HI, "max_tokens": 3, "temperature": 0, "n": 2}
    body = await (await client.post(CHAT, json=request)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == [" Hello world!"] * 2
    assert body["usage"] == {"prompt_tokens": HI_PROMPT_TOKENS, "completion_tokens": 6,
                             "total_tokens": HI_PROMPT_TOKENS + 6, "prompt_tokens_details": {"cached_tokens": 0}}
    events = await sse_events(await client.post(CHAT, json={**request, "stream": True}))
    for index in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == " Hello world!"
        assert [c["finish_reason"] for c in mine].count("length") == 1


@BOTH
async def test_context_overflow_is_400(client, model: str) -> None:  # noqa: ANN001
    long = [{"role": "user", "content": "hi " * 400}]
    resp = await client.post(CHAT, json={"model": model, "messages": long})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    ok = await client.post(CHAT, json={"model": model, "messages": HI, "max_tokens": 1})
    assert ok.status == 200


@BOTH
async def test_answer_stops_at_the_context_limit(client, model: str) -> None:  # noqa: ANN001
    body = await (await client.post(CHAT, json={"model": model, "messages": HI, "temperature": 0})).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 256


async def test_seed_reproducibility(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_gguf(models / "flat.gguf", logit_scale=0.05)  # near-uniform: sampling really varies
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"),
                                              threads=1, context_size=128))

    async def sample(seed: int) -> str:
        body = await (await client.post(CHAT, json={
            "model": "flat.gguf", "messages": HI, "max_tokens": 8, "temperature": 1.0, "top_k": 0,
            "min_p": 0, "seed": seed})).json()
        return body["choices"][0]["message"]["content"]

    first = await sample(1234)
    assert await sample(1234) == first
    others = {await sample(seed) for seed in (1, 2, 3, 4)}
    assert len(others | {first}) >= 3


@pytest.mark.ctransformers
async def test_ctransformers_refuses_bpe_vocabulary(make_client, tmp_path: Path, tiny_bpe_gguf: Path,  # noqa: ANN001
                                                    tiny_gguf: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "bpe.gguf").write_bytes(tiny_bpe_gguf.read_bytes())
    (models / "ok.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "bpe", backend="ctransformers", parameters={"model": "bpe.gguf"})
    write_model_yaml(models, "ok", backend="ctransformers", context_size=128, parameters={"model": "ok.gguf"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    resp = await client.post(CHAT, json={"model": "bpe", "messages": HI})
    assert resp.status == 500
    err = (await resp.json())["error"]
    assert err["code"] == "model_load_failed"
    assert "'gpt2' vocabulary" in err["message"] and "backend: llama-cpp" in err["message"]
    resp = await client.post(CHAT, json={"model": "ok", "messages": HI, "max_tokens": 2, "temperature": 0})
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == " Hello world"


@pytest.mark.llama
async def test_llama_loads_bpe_vocabulary(make_client, tmp_path: Path, tiny_bpe_gguf: Path) -> None:  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    (models / "bpe.gguf").write_bytes(tiny_bpe_gguf.read_bytes())
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"),
                                              threads=1, context_size=128))
    resp = await client.post(CHAT, json={"model": "bpe.gguf", "messages": HI, "max_tokens": 3, "temperature": 0})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    # This vocabulary has no "\n" token, so the prompt ends in "t" and the successor chain runs u, v, w.
    assert body["choices"][0]["message"]["content"] == "uvw"
    assert body["usage"]["completion_tokens"] == 3


@pytest.mark.llama
async def test_chat_logprobs(client) -> None:  # noqa: ANN001
    body = await (await client.post(CHAT, json={"model": "tiny-llama", "messages": HI, "max_tokens": 3,
                                                "temperature": 0, "logprobs": True, "top_logprobs": 2})).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [" Hello", " world", "!"]
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the best is the chosen one
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]


@pytest.mark.ctransformers
async def test_ctransformers_logprobs_is_a_clear_400(client) -> None:  # noqa: ANN001
    resp = await client.post(CHAT, json={"model": "tiny-ct", "messages": HI, "logprobs": True})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == "logprobs" and "ctransformers" in err["message"]


@pytest.mark.llama
async def test_missing_model_uses_first_chat_model(client) -> None:  # noqa: ANN001
    body = await (await client.post(CHAT, json={"messages": HI, "max_tokens": 1, "temperature": 0})).json()
    assert body["choices"][0]["message"]["content"] == " Hello"


@pytest.mark.llama
async def test_content_parts_and_roles(client) -> None:  # noqa: ANN001
    parts = [{"role": "developer", "content": "be brief"},
             {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": "ok"},
             {"role": "tool", "tool_call_id": "call_1", "content": "42"},
             {"role": "user", "content": "again"}]
    resp = await client.post(CHAT, json={"model": "tiny-llama", "messages": parts, "max_tokens": 1})
    assert resp.status == 200
    image = await client.post(CHAT, json={"model": "tiny-llama", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    assert image.status == 400 and (await image.json())["error"]["param"] == "messages.0.content.0.type"
    bad_role = await client.post(CHAT, json={"model": "tiny-llama", "messages": [{"role": "robot", "content": "x"}]})
    assert bad_role.status == 400 and (await bad_role.json())["error"]["param"] == "messages.0.role"
    no_id = await client.post(CHAT, json={"model": "tiny-llama", "messages": [{"role": "tool", "content": "x"}]})
    assert no_id.status == 400 and (await no_id.json())["error"]["param"] == "messages.0.tool_call_id"


@pytest.mark.llama
async def test_templates_system_prompt_and_yaml_defaults(make_client, tmp_path: Path, tiny_gguf: Path) -> None:  # noqa: ANN001
    notemplate = tmp_path / "nt.gguf"
    write_tiny_gguf(notemplate, chat_template=None)
    models = tmp_path / "models"
    models.mkdir()
    (models / "nt.gguf").write_bytes(notemplate.read_bytes())
    write_model_yaml(models, "bare", parameters={"model": "nt.gguf"})
    write_model_yaml(models, "named", template={"chat": "chatml"}, parameters={"model": "nt.gguf"})
    write_model_yaml(models, "sys", system_prompt="You are terse.", parameters={"model": "nt.gguf"},
                     template={"chat": "chatml"})
    write_model_yaml(models, "defaults", template={"chat": "chatml"}, stopwords=["!"],
                     parameters={"model": "nt.gguf", "temperature": 0, "max_tokens": 1})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"),
                                              threads=1, context_size=128))
    resp = await client.post(CHAT, json={"model": "bare", "messages": HI})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["code"] == "chat_template_missing" and "template.chat" in err["message"]
    named = await (await client.post(CHAT, json={"model": "named", "messages": HI, "max_tokens": 2,
                                                  "temperature": 0})).json()
    assert named["choices"][0]["message"]["content"] == " Hello world"
    assert named["usage"]["prompt_tokens"] == HI_PROMPT_TOKENS
    sys = await (await client.post(CHAT, json={"model": "sys", "messages": HI, "max_tokens": 1})).json()
    assert sys["usage"]["prompt_tokens"] > HI_PROMPT_TOKENS
    d = await (await client.post(CHAT, json={"model": "defaults", "messages": HI})).json()
    assert d["choices"][0]["message"]["content"] == " Hello" and d["choices"][0]["finish_reason"] == "length"
    d = await (await client.post(CHAT, json={"model": "defaults", "messages": HI, "max_tokens": 10})).json()
    assert d["choices"][0]["message"]["content"] == " Hello world"  # YAML stopword "!"
    assert d["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 3), ("top_p", 1.5), ("n", 0), ("n", 100), ("max_tokens", 0), ("presence_penalty", 5),
    ("stop", 5), ("stop", [1]), ("logprobs", 3), ("top_logprobs", 50), ("stream_options", {"include_usage": True}),
])
async def test_bad_sampling_values(client, field: str, value: object) -> None:  # noqa: ANN001
    resp = await client.post(CHAT, json={"model": "tiny-llama", "messages": HI, field: value})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == field


@pytest.mark.llama
async def test_parallel_instances_answer_concurrent_requests(make_client, tmp_path: Path, tiny_gguf: Path) -> None:  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    (models / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "par", parallel=2, context_size=256, parameters={"model": "t.gguf"})
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))
    request = {"model": "par", "messages": HI, "max_tokens": 40, "temperature": 0}
    first, second = await asyncio.gather(client.post(CHAT, json=request), client.post(CHAT, json=request))
    a, b = await first.json(), await second.json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"] == 40
    metrics = await (await client.get("/metrics")).text()
    assert 'localai_inference_duration_seconds_count{model="par",task="chat.completion"} 2.0' in metrics


# -- completions ---------------------------------------------------------------------------------------------

@BOTH
async def test_completion_shapes(client, model: str) -> None:  # noqa: ANN001
    resp = await client.post(COMPLETIONS, json={"model": model, "prompt": [EXCLAIM], "max_tokens": 3,
                                                "temperature": 0})
    body = await resp.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"text": " Hello world!", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4,
                             "prompt_tokens_details": {"cached_tokens": 0}}


@BOTH
async def test_completion_end_token_is_stop(client, model: str) -> None:  # noqa: ANN001
    body = await (await client.post(COMPLETIONS, json={"model": model, "prompt": " bye", "max_tokens": 5})).json()
    assert body["choices"][0]["text"] == "" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 0


@BOTH
async def test_completion_stream_echo_and_lists(client, model: str) -> None:  # noqa: ANN001
    request = {"model": model, "prompt": [[EXCLAIM], [WORLD]], "max_tokens": 2, "temperature": 0, "echo": True}
    body = await (await client.post(COMPLETIONS, json=request)).json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "! Hello world"), (1, " world! Hello")]
    events = await sse_events(await client.post(COMPLETIONS, json={**request, "stream": True}))
    assert all(e["object"] == "text_completion" for e in events)
    for index, expected in ((0, "! Hello world"), (1, " world! Hello")):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == expected
        assert [c["finish_reason"] for c in mine].count("length") == 1


@pytest.mark.llama
async def test_completion_token_prompts_and_logprobs(client) -> None:  # noqa: ANN001
    hello = HELLO
    body = await (await client.post(COMPLETIONS, json={"model": "tiny-llama", "prompt": [[hello], [hello, 262]],
                                                       "max_tokens": 2, "temperature": 0, "logprobs": 1})).json()
    assert [c["text"] for c in body["choices"]] == [" world!", "! Hello"]
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == [" world", "!"] and lp["text_offset"] == [0, 6]
    assert [list(t) for t in lp["top_logprobs"]] == [[" world"], ["!"]]
    assert body["usage"]["prompt_tokens"] == 3
    events = await sse_events(await client.post(COMPLETIONS, json={
        "model": "tiny-llama", "prompt": [[hello]], "max_tokens": 3, "temperature": 0, "logprobs": 0, "stream": True}))
    streamed = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    # each chunk's offsets count from the start of the whole text, as in the non-streamed answer
    assert [(p["tokens"], p["text_offset"]) for p in streamed] == [([" world"], [0]), (["!"], [6]), ([" Hello"], [7])]
    resp = await client.post(COMPLETIONS, json={"model": "tiny-llama", "prompt": [[999999]]})
    assert resp.status == 400 and "vocabulary" in (await resp.json())["error"]["message"]


@pytest.mark.llama
async def test_completion_suffix_needs_fim_tokens(client) -> None:  # noqa: ANN001
    resp = await client.post(COMPLETIONS, json={"model": "tiny-llama", "prompt": "a", "suffix": "b"})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "suffix"


@pytest.mark.parametrize("prompt", [None, 5, [], [1.5], [["a"]], {"x": 1}])
async def test_completion_bad_prompts(client, prompt) -> None:  # noqa: ANN001
    body = {"model": "tiny-llama", "max_tokens": 1}
    if prompt is not None:
        body["prompt"] = prompt
    resp = await client.post(COMPLETIONS, json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "prompt"


PARIS = 271  # " Paris" in the tiny vocabulary


@pytest.mark.llama
async def test_logit_bias_steers_and_bans_tokens(client) -> None:  # noqa: ANN001
    async def say(**extra: object) -> str:
        body = await (await client.post(CHAT, json={"model": "tiny-llama", "messages": HI, "max_tokens": 3,
                                                    "temperature": 0, **extra})).json()
        return body["choices"][0]["message"]["content"]

    assert await say() == " Hello world!"
    assert await say(logit_bias={str(PARIS): 100}) == " Paris Paris Paris"
    banned = await say(logit_bias={str(HELLO): -100})
    assert not banned.startswith(" Hello")
    resp = await client.post(CHAT, json={"model": "tiny-llama", "messages": HI, "logit_bias": {"99999": 5}})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "logit_bias"


@pytest.mark.llama
async def test_sampling_fields_reach_llama_cpp(client, monkeypatch) -> None:  # noqa: ANN001
    """typical_p, mirostat (v1 and v2) and repeat_last_n are handed to llama.cpp's samplers as asked."""
    import llama_cpp

    calls: dict[str, list[tuple]] = {}

    def spy(name: str) -> None:
        original = getattr(llama_cpp, name)

        def wrapper(*args):  # noqa: ANN002, ANN202
            calls.setdefault(name, []).append(tuple(round(a, 4) if isinstance(a, float) else a for a in args))
            return original(*args)

        monkeypatch.setattr(llama_cpp, name, wrapper)

    for name in ("llama_sampler_init_typical", "llama_sampler_init_mirostat", "llama_sampler_init_mirostat_v2",
                 "llama_sampler_init_penalties", "llama_sampler_init_top_k"):
        spy(name)
    base = {"model": "tiny-llama", "messages": HI, "max_tokens": 2, "temperature": 0.8, "seed": 7}
    for extra in ({"typical_p": 0.5}, {"mirostat": 1, "mirostat_tau": 3.0, "mirostat_eta": 0.2},
                  {"mirostat": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.3},
                  {"repeat_penalty": 1.3, "repeat_last_n": 16}, {"repeat_penalty": 1.1, "repeat_last_n": 10**9}):
        resp = await client.post(CHAT, json={**base, **extra})
        assert resp.status == 200, await resp.text()
    assert calls["llama_sampler_init_typical"][0] == (0.5, 1)
    assert calls["llama_sampler_init_mirostat"] == [(327, 7, 3.0, 0.2, 100)]
    assert calls["llama_sampler_init_mirostat_v2"] == [(7, 4.0, 0.3)]
    # a look-back past the context is the context (llama.cpp would try to allocate it, and abort)
    assert [c[1:3] for c in calls["llama_sampler_init_penalties"]] == [(16, 1.3), (256, 1.1)]
    assert len(calls["llama_sampler_init_top_k"]) == 3  # of 5 requests: Mirostat replaces top-k, top-p and min-p


@pytest.mark.parametrize(("model", "extra", "param"), [
    pytest.param("tiny-llama", {"tfs_z": 0.9}, "tfs_z", marks=pytest.mark.llama),
    pytest.param("tiny-llama", {"n_keep": 8}, "n_keep", marks=pytest.mark.llama),
    pytest.param("tiny-llama", {"mirostat": 3}, "mirostat", marks=pytest.mark.llama),
    pytest.param("tiny-llama", {"logit_bias": {"x": 1}}, "logit_bias", marks=pytest.mark.llama),
    pytest.param("tiny-ct", {"logit_bias": {str(PARIS): 5}}, "logit_bias", marks=pytest.mark.ctransformers),
    pytest.param("tiny-ct", {"mirostat": 2}, "mirostat", marks=pytest.mark.ctransformers),
    pytest.param("tiny-ct", {"typical_p": 0.5}, "typical_p", marks=pytest.mark.ctransformers),
])
async def test_sampling_nobody_applies_is_400(client, model: str, extra: dict, param: str) -> None:  # noqa: ANN001
    """Nothing accepted is ignored: what the model's engine cannot apply gets 400 naming the field."""
    resp = await client.post(CHAT, json={"model": model, "messages": HI, "max_tokens": 2, **extra})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param
    ok = await client.post(CHAT, json={"model": model, "messages": HI, "max_tokens": 2, "tfs_z": 1.0, "n_keep": 0})
    assert ok.status == 200  # the neutral values are no request for anything


@pytest.mark.llama
async def test_system_fingerprint_in_answers_and_chunks(client) -> None:  # noqa: ANN001
    body = await (await client.post(CHAT, json={"model": "tiny-llama", "messages": HI, "max_tokens": 2})).json()
    fingerprint = body["system_fingerprint"]
    assert fingerprint.startswith("fp_") and len(fingerprint) == 13
    resp = await client.post(CHAT, json={"model": "tiny-llama", "messages": HI, "max_tokens": 2, "stream": True})
    chunks = await sse_events(resp)
    assert chunks and all(chunk["system_fingerprint"] == fingerprint for chunk in chunks)
    completion = await (await client.post(COMPLETIONS, json={"model": "tiny-llama", "prompt": "hi",
                                                              "max_tokens": 2})).json()
    assert completion["system_fingerprint"] == fingerprint  # the same model and configuration
    other = await (await client.post(CHAT, json={"model": "tiny-ct", "messages": HI, "max_tokens": 2})).json()
    assert other["system_fingerprint"] != fingerprint
