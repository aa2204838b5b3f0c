"""Grammar errors: the Python syntax check agrees with llama.cpp, and no request's check touches stderr."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from conftest import write_model_yaml
from localai_aio.backends.gbnf import syntax_error
from localai_aio.config import ServerSettings

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]

VALID = [
    'root ::= "yes" | "no"',
    "root ::= [a-z]+ ( \" \" [a-z]+ )*\n",
    'root ::= item{2,5} "."\nitem ::= [^\\n\\x00] # comment\n',
    "root ::= (\"a\" | \"b\")? [\\u00e9\\U0001F600] .\r\n",
    'root ::= x{3}\nx ::= "\\"" [\\-\\]] "\\\\"',
    "root ::= <[12]> !<[3]> \"z\"{0,}",
    'root ::=\n  "multi" |\n  "line"\n',
    "# comment first\nroot ::= ws\nws ::= [ \\t\\n]*",
]
INVALID = {
    "root ::= [a-": "unexpected end of input",
    'root ::= "open': "unexpected end of input",
    "root ::= ( \"a\"": "expecting ')' at the end",
    "root = \"a\"": "expecting ::= at '= \"a\"'",
    "root ::= \"a\" ) ": "expecting newline or end at ') '",
    'root ::= "a" other': "Undefined rule identifier 'other'",
    "root ::= * \"a\"": "expecting preceding item to */+/?/{ at '\"a\"'",
    'root ::= "a"{x}': "expecting an int at 'x}'",
    'root ::= "a"{2 3}': "expecting ',' at '3}'",
    'root ::= "a"{2,3': "expecting '}' at the end",
    'root ::= "\\q"': "unknown escape at '\\q\"'",
    'root ::= "\\x4"': "expecting 2 hex chars at '4\"'",
    "root ::= <[12>": "expecting ']' at '>'",
    "::= \"a\"": "expecting name at '::= \"a\"'",
    'root ::= "a"{3000}': "number of repetitions exceeds sane defaults",
    'other ::= "a"': "the grammar has no 'root' rule",
    "   # nothing\n": "the grammar has no rules",
}


@pytest.mark.parametrize("grammar", VALID)
def test_valid_grammars_pass(grammar: str) -> None:
    assert syntax_error(grammar) is None


@pytest.mark.parametrize(("grammar", "message"), INVALID.items())
def test_invalid_grammars_say_why(grammar: str, message: str) -> None:
    assert message in (syntax_error(grammar) or "")


@pytest.mark.llama
def test_the_check_agrees_with_llama_cpp(tiny_gguf: Path) -> None:
    """Every grammar above: llama.cpp builds a sampler exactly when the Python check finds no problem."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(tiny_gguf).encode(), params)
    assert model
    vocab = llama_cpp.llama_model_get_vocab(model)
    try:
        for grammar in VALID + list(INVALID):
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            assert bool(sampler) == (syntax_error(grammar) is None), grammar
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
    finally:
        llama_cpp.llama_model_free(model)


@pytest.fixture
async def grammar_client(make_client, tmp_path: Path, tiny_gguf: Path):  # noqa: ANN001
    models = tmp_path / "models"
    models.mkdir()
    (models / "t.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "g", backend="llama-cpp", context_size=512, parameters={"model": "t.gguf"})
    return await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=1))


@pytest.mark.llama
@pytest.mark.parametrize(("grammar", "message"), [
    ("root ::= [a-", "Invalid grammar: unexpected end of input"),
    ('root ::= "a" other', "Invalid grammar: Undefined rule identifier 'other'"),
    # syntax that parses, judged by llama.cpp itself and reported from its log on the checking thread
    ('root ::= root "a" | "b"', "Invalid grammar: unsupported grammar, left recursion detected for nonterminal "
                                "at index 0"),
])
async def test_grammar_errors_come_from_the_request_alone(grammar_client, grammar: str, message: str,  # noqa: ANN001
                                                          monkeypatch, capfd) -> None:  # noqa: ANN001
    """Whatever the process prints to stderr while a grammar is checked stays on stderr: it neither
    becomes this client's message nor disappears."""
    import llama_cpp

    original = llama_cpp.llama_sampler_init_grammar

    def another_thread_prints(*args):  # noqa: ANN002, ANN202
        os.write(2, b"error: another request's secret\n")
        return original(*args)

    monkeypatch.setattr(llama_cpp, "llama_sampler_init_grammar", another_thread_prints)
    resp = await grammar_client.post(CHAT, json={"model": "g", "messages": HI, "grammar": grammar})
    assert resp.status == 400
    assert await resp.json() == {"error": {"message": message, "type": "invalid_request_error",
                                           "param": "grammar", "code": None}}
    ok = await grammar_client.post(CHAT, json={"model": "g", "messages": HI, "max_tokens": 3,
                                               "grammar": 'root ::= "yes" | "no"'})
    assert ok.status == 200
    assert (await ok.json())["choices"][0]["message"]["content"] in ("yes", "no")
    assert "error: another request's secret" in capfd.readouterr().err


@pytest.mark.llama
def test_log_capture_is_per_thread(tiny_gguf: Path) -> None:
    """Messages llama.cpp logs on another thread never join this thread's capture."""
    import threading

    import llama_cpp

    from localai_aio.backends import llama_cpp as backend

    backend._install_log_callback(llama_cpp)
    backend._CAPTURE.lines = []
    try:
        other = threading.Thread(
            target=lambda: llama_cpp._localai_log_callback(4, b"another thread's message", ctypes.c_void_p(0)))
        other.start()
        other.join()
        llama_cpp._localai_log_callback(4, b"this thread's message", ctypes.c_void_p(0))
        assert backend._CAPTURE.lines == ["this thread's message"]
    finally:
        backend._CAPTURE.lines = None
