"""Strict structured output always parses: hundreds of answers sampled at temperature 1 from a tiny
model with near-uniform output, over schemas of every shape, each parsed by Python's (strict) JSON
parser and validated against its schema. Random sampling reaches every character the grammar allows,
so a grammar that let a raw control character into a string would fail here."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from conftest import write_model_yaml
from localai_aio.config import ServerSettings
from localai_aio.text.tools import schema_grammar
from tiny_models import vocabulary, write_tiny_gguf

pytestmark = pytest.mark.llama

NAME = {"type": "string", "maxLength": 6}
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {"name": NAME, "tags": {"type": "array", "items": NAME,
                                                                           "maxItems": 3}},
                   "required": ["name", "tags"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
    "enums-and-numbers": {"type": "object", "properties": {
        "unit": {"enum": ["c", "f", "k"]}, "value": {"type": "number"}, "ok": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 4}},
        "required": ["unit", "value", "ok", "note"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"a": NAME, "b": {"type": "integer"}, "c": {"const": "x"}},
                 "required": ["c"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "object", "properties": {"k": NAME},
                                         "required": ["k"], "additionalProperties": False}, "maxItems": 2},
}
ROUNDS = 11  # x 10 choices x 5 schemas = 550 answers


@pytest.fixture
async def flat_client(make_client, tmp_path: Path):  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_gguf(models / "flat.gguf", logit_scale=0.05)  # near-uniform: every allowed token gets sampled
    write_model_yaml(models, "flat", backend="llama-cpp", context_size=4096, parameters={"model": "flat.gguf"})
    return await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))


def test_strings_exclude_control_characters(tmp_path: Path) -> None:
    """A string's raw text may not hold a control character, nor a byte that is not UTF-8; its escape
    may. Checked token by token on a vocabulary with every byte."""
    from localai_aio.backends.llama_cpp import load
    from localai_aio.config import load_model_configs

    write_tiny_gguf(tmp_path / "t.gguf")
    write_model_yaml(tmp_path, "t", backend="llama-cpp", context_size=256, parameters={"model": "t.gguf"})
    engine = load(load_model_configs(tmp_path)[0]["t"], ServerSettings(models_path=str(tmp_path)))
    try:
        grammar = schema_grammar({"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]})

        pieces = vocabulary()[0]

        def accepted(text: bytes) -> bool:
            matcher = engine.grammars.matcher(grammar)
            tokens = [pieces.index(f"<0x{b:02X}>") for b in text]  # byte by byte
            return matcher.validate_tokens(tokens) == len(tokens)

        assert accepted(b'{"s": "a\\n\\u0001b"}')
        for bad in (b"\n", b"\x01", b"\x1f", b"\xc0\x80", b"\xed\xa0\x80", b"\xf5"):
            assert not accepted(b'{"s": "a' + bad), bad
    finally:
        engine.close()


async def test_sampled_strict_answers_all_parse_and_validate(flat_client) -> None:  # noqa: ANN001
    checked = 0
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        for seed in range(ROUNDS):
            resp = await flat_client.post("/v1/chat/completions", json={
                "model": "flat", "messages": [{"role": "user", "content": "Answer in JSON"}], "n": 10,
                "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": seed, "max_tokens": 400,
                "response_format": fmt})
            body = await resp.json()
            assert resp.status == 200, body
            for choice in body["choices"]:
                assert choice["finish_reason"] == "stop", choice  # every schema here has a bounded answer
                value = json.loads(choice["message"]["content"])  # strict: no raw control characters
                jsonschema.validate(value, schema)
                checked += 1
    assert checked == len(SCHEMAS) * ROUNDS * 10


async def test_a_strict_answer_cut_short_says_length(flat_client) -> None:  # noqa: ANN001
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
              "additionalProperties": False}
    resp = await flat_client.post("/v1/chat/completions", json={
        "model": "flat", "messages": [{"role": "user", "content": "A long story in JSON"}], "temperature": 1.0,
        "top_k": 0, "min_p": 0.0, "seed": 1, "max_tokens": 12,
        "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": schema,
                                                                   "strict": True}}})
    [choice] = (await resp.json())["choices"]
    assert choice["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(choice["message"]["content"])  # cut: the client is told so, not handed it as complete
