"""Whether a request fits the engine it goes to: its prompt within the context, and only the
capabilities (grammars, logprobs, extra sampling) that engine has. Refusals are the client's 400s,
answered before the engine is handed anything."""

from __future__ import annotations

from collections.abc import Sequence

from localai_aio.backends.text import GenParams, TextEngine, asked_sampling
from localai_aio.errors import ContextLengthExceeded, InvalidRequest, NotImplementedForModel


def tokenize_prompt(engine: TextEngine, text: str, *, add_bos: bool, special: bool) -> list[int]:
    """``engine.tokenize`` for a prompt, refusing at once a text that cannot fit the context whatever its
    tokens: no token stands for more characters than the vocabulary's longest piece, so a 10 MB prompt
    to a 4k-token model is a 400 in microseconds instead of after seconds of tokenizing."""
    longest = getattr(engine, "longest_piece", 0)
    if longest and len(text) > engine.n_ctx * longest:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {engine.n_ctx} tokens; the prompt has at least "
            f"{len(text) // longest} tokens. Shorten the prompt.", param="messages")
    return engine.tokenize(text, add_bos=add_bos, special=special)


def check_prompt_fits(engine: TextEngine, prompt: Sequence[int]) -> None:
    if not prompt:
        raise InvalidRequest("The prompt is empty: it has no tokens for the model to continue", param="prompt")
    if len(prompt) >= engine.n_ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {engine.n_ctx} tokens; the prompt has {len(prompt)} "
            "tokens and leaves no room for an answer. Shorten the prompt.", param="messages")


def check_capabilities(engine: TextEngine, params: GenParams, backend: str) -> None:
    if params.grammar is not None:
        if not engine.supports_grammar:
            raise NotImplementedForModel(
                f"The '{backend}' backend cannot constrain output (tools, response_format or grammar); "
                "use a model with `backend: llama-cpp`", param="grammar")
        problem = engine.check_grammar(params.grammar)
        if problem:
            raise InvalidRequest(f"Invalid grammar: {problem}", param=params.grammar_param)
    if params.logprobs is not None and not engine.supports_logprobs:
        raise NotImplementedForModel(f"The '{backend}' backend does not report logprobs", param="logprobs")
    for name in asked_sampling(params):
        if name not in engine.sampling:
            raise NotImplementedForModel(f"The '{backend}' backend cannot apply '{name}'; use a model with "
                                         "`backend: llama-cpp`", param=name)
    vocab = engine.n_vocab
    for token, _ in params.logit_bias:
        if token >= vocab:
            raise InvalidRequest(f"Invalid value for 'logit_bias': token id {token} is outside the model's "
                                 f"vocabulary of {vocab}", param="logit_bias")
