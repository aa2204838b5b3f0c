"""Tokenize and detokenize on the tiny GGUF, in LocalAI's, vLLM's and llama.cpp's shapes, through both engines."""

from __future__ import annotations

import pytest

HELLO, WORLD, EXCLAIM, BOS = 261, 262, 263, 1  # in the tiny vocabulary
SPACE, LETTER_H, LETTER_I = 274, 282, 283  # its SentencePiece tokenizer spells "hi" as "▁", "h", "i"

BOTH = pytest.mark.parametrize("model", [
    pytest.param("tiny-llama", marks=pytest.mark.llama),
    pytest.param("tiny-ct", marks=pytest.mark.ctransformers),
])


@BOTH
@pytest.mark.parametrize("path", ["/v1/tokenize", "/tokenize"])
async def test_tokenize_shapes(client, model: str, path: str) -> None:  # noqa: ANN001
    async def ask(**body: object) -> dict:
        resp = await client.post(path, json={"model": model, **body})
        assert resp.status == 200, await resp.text()
        return await resp.json()

    assert await ask(content="hi") == {"tokens": [SPACE, LETTER_H, LETTER_I], "count": 3, "max_model_len": 256}
    hi = [SPACE, LETTER_H, LETTER_I]
    assert (await ask(content="hi", add_special=True))["tokens"] == [BOS, *hi]  # llama.cpp: BOS when asked
    assert (await ask(prompt="hi"))["tokens"] == [BOS, *hi]  # vLLM: add_special_tokens defaults to true
    assert (await ask(prompt="hi", add_special_tokens=False))["tokens"] == [SPACE, LETTER_H, LETTER_I]
    assert (await ask(content="<|im_end|>hi"))["tokens"][0] == 4  # control tokens are read as such
    assert (await ask(content="hi", with_pieces=True))["tokens"] == [
        {"id": SPACE, "piece": " "}, {"id": LETTER_H, "piece": "h"}, {"id": LETTER_I, "piece": "i"}]


@BOTH
async def test_detokenize_round_trip(client, model: str) -> None:  # noqa: ANN001
    for path in ("/v1/detokenize", "/detokenize"):
        resp = await client.post(path, json={"model": model, "tokens": [HELLO, WORLD, EXCLAIM]})
        assert await resp.json() == {"content": " Hello world!", "prompt": " Hello world!"}
    for token in (10**6, -75488):  # a negative id used to abort the whole process inside llama.cpp
        bad = await client.post("/v1/detokenize", json={"model": model, "tokens": [token]})
        assert bad.status == 400 and (await bad.json())["error"]["param"] == "tokens"
    assert (await client.get("/healthz")).status == 200


async def test_tokenize_errors(client) -> None:  # noqa: ANN001
    missing = await client.post("/v1/tokenize", json={"model": "tiny-llama"})
    assert missing.status == 400 and (await missing.json())["error"]["param"] == "content"
    typed = await client.post("/v1/detokenize", json={"model": "tiny-llama", "tokens": ["a"]})
    assert typed.status == 400 and (await typed.json())["error"]["param"] == "tokens.0"
    for field in ("content", "prompt"):  # a list here used to reach the tokenizer (a 500)
        listed = await client.post("/v1/tokenize", json={"model": "tiny-llama", field: ["hi"]})
        assert listed.status == 400 and (await listed.json())["error"]["param"] == field
    unknown = await client.post("/v1/tokenize", json={"model": "nope", "content": "x"})
    assert unknown.status == 404
