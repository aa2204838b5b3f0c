"""Reasoning text goes to reasoning_content, never to content: the splitter, and the tiny GGUF behind a
template that opens the reasoning in the prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import sse_events, write_model_yaml
from localai_aio.config import ServerSettings
from localai_aio.text.reasoning import Markers, ReasoningSplitter, markers_for
from tiny_models import CHATML, write_tiny_gguf

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def split(pieces: list[str], markers: Markers = Markers(), inside: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(markers, inside=inside)
    thoughts, answers = [], []
    for piece in pieces:
        thought, answer = splitter.feed(piece)
        thoughts.append(thought)
        answers.append(answer)
    thought, answer = splitter.finish()
    return "".join(thoughts) + thought, "".join(answers) + answer


@pytest.mark.parametrize(("pieces", "expected"), [
    (["<think>", "plan", "</think>", "answer"], ("plan", "answer")),
    (["\n <th", "ink>\nsome ", "plan</th", "ink>\n\nThe answer"], ("some plan", "The answer")),
    (["Just an answer with <think> later"], ("", "Just an answer with <think> later")),
    (["<", "b>bold</b>"], ("", "<b>bold</b>")),
    (["<think>never closed"], ("never closed", "")),
    (["", "  "], ("", "  ")),
])
def test_splitter(pieces: list[str], expected: tuple[str, str]) -> None:
    assert split(pieces) == expected
    assert split(list("".join(pieces))) == expected  # however the text is cut into pieces


def test_splitter_inside_and_own_markers() -> None:
    assert split(["still thinking", "</think>", "done"], inside=True) == ("still thinking", "done")
    assert split(["[T]x[/T]y"], Markers("[T]", "[/T]")) == ("x", "y")
    assert markers_for(None) == Markers() and markers_for({"disable": True}) is None
    assert markers_for({"start": "<r>", "end": "</r>"}) == Markers("<r>", "</r>")


@pytest.fixture
async def thinking(make_client, tmp_path: Path):  # noqa: ANN001
    """The tiny model behind a template whose generation prompt opens the reasoning, as DeepSeek-R1's does:
    all it writes is reasoning (it never closes it)."""
    models = tmp_path / "models"
    models.mkdir()
    opening = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    assert opening != CHATML
    write_tiny_gguf(models / "t.gguf", chat_template=opening)
    write_model_yaml(models, "thinker", context_size=512, parameters={"model": "t.gguf"})
    write_model_yaml(models, "plain", context_size=512, parameters={"model": "t.gguf"}, reasoning={"disable": True})
    return await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))


@pytest.mark.llama
async def test_reasoning_never_reaches_content(thinking) -> None:  # noqa: ANN001
    ask = {"model": "thinker", "messages": HI, "max_tokens": 5, "temperature": 0, "reasoning_effort": "low"}
    message = (await (await thinking.post(CHAT, json=ask)).json())["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "", "reasoning_content": " Hello world! Hello world"}
    events = await sse_events(await thinking.post(CHAT, json={**ask, "stream": True}))
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == " Hello world! Hello world"
    assert not any(d.get("content") for d in deltas)
    response = await (await thinking.post("/v1/responses", json={"model": "thinker", "input": "hi",
                                                                  "max_output_tokens": 5, "store": False})).json()
    assert all(item["type"] != "message" or not item["content"][0]["text"] for item in response["output"])
    plain = (await (await thinking.post(CHAT, json={**ask, "model": "plain"})).json())["choices"][0]["message"]
    assert plain == {"role": "assistant", "content": " Hello world! Hello world"}  # YAML: reasoning disabled
