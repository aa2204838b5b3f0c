"""How each choice picks its next token from a decode's logits.

Each choice samples with its own llama.cpp sampler chain (logit bias, penalties, then top-k, typical,
top-p, min-p, temperature and a seeded draw, or Mirostat); greedy choices take the arg-max directly.
A grammar is checked on the token drawn, through llguidance (see ``constraint``), never as a link of
the chain: sample first, ask the matcher about that one token, and only when it is refused compute the
mask of the whole vocabulary and draw again among the allowed tokens.
"""

from __future__ import annotations

import ctypes
import logging
import random
from typing import Any

import numpy as np

from localai_aio.backends.base import ConstraintError
from localai_aio.backends.constraint import Grammars, allowed
from localai_aio.backends.llama_cpp.vocabulary import Vocabulary
from localai_aio.backends.text import GenParams, TokenStep

log = logging.getLogger(__name__)


class Picker:
    """One choice's sampling state: its sampler chain (None: greedy), its grammar's llguidance matcher
    once the grammar applies, a lazy grammar's trigger until the output has it (with the output's last
    bytes, to find it in), and the special tokens this request writes out as text."""

    __slots__ = ("params", "chain", "matcher", "awaiting", "tail", "shown")

    def __init__(self, params: GenParams, chain: Any, matcher: Any, shown: dict[int, bytes]):
        self.params = params
        self.chain = chain
        self.matcher = matcher
        self.awaiting = params.grammar_trigger.encode("utf-8") if params.grammar_trigger else None
        self.tail = b""
        self.shown = shown


class Sampling:
    """Builds each choice's ``Picker`` and draws its tokens from the logits of a decode's batch row."""

    def __init__(self, ll: Any, ctx: Any, vocabulary: Vocabulary, n_ctx: int, name: str):
        self._ll = ll
        self._ctx = ctx
        self._vocabulary = vocabulary
        self._grammars: Grammars = vocabulary.grammars
        self._n_vocab = vocabulary.n_vocab
        self._n_ctx = n_ctx
        self._name = name
        self._candidates: np.ndarray | None = None  # see _draw

    def picker(self, params: GenParams) -> Picker:
        """A choice's picker; a grammar that is not lazy applies from the first token."""
        chain = self._sampler_for(params)
        try:
            lazy = bool(params.grammar_trigger)
            matcher = self._grammars.matcher(params.grammar, params.grammar_param) \
                if params.grammar is not None and not lazy else None
            return Picker(params, chain, matcher, self._vocabulary.special_pieces(params.shown_tokens))
        except BaseException:
            if chain:
                self._ll.llama_sampler_free(chain)
            raise

    def free(self, picker: Picker) -> None:
        if picker.chain:
            self._ll.llama_sampler_free(picker.chain)
            picker.chain = None
        picker.matcher = None

    def pick(self, picker: Picker, row: int) -> int | None:
        """The next token from the logits of batch ``row``, or None when the grammar is complete (the
        choice ends there). Raises ``ConstraintError`` when the grammar allows no token at all."""
        if picker.matcher is not None:
            return self._constrained(picker, row)
        if picker.chain is None:
            return int(self._logits(row).argmax())
        return self._ll.llama_sampler_sample(picker.chain, self._ctx, row)

    def step_for(self, picker: Picker, token: int, piece: bytes, row: int) -> TokenStep:
        """The token as its client sees it, with its log-probability and the best alternatives if asked."""
        top_n = picker.params.logprobs
        if top_n is None:
            return TokenStep(token, piece)
        logits = self._logits(row)
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        top: tuple[tuple[bytes, float], ...] = ()
        if top_n:
            best = np.argpartition(-logprobs, min(top_n, len(logprobs) - 1))[:top_n]
            best = best[np.argsort(-logprobs[best])]
            top = tuple((self._vocabulary.token_bytes(int(t)), float(logprobs[t])) for t in best)
        return TokenStep(token, piece, float(logprobs[token]), top)

    def watch_trigger(self, picker: Picker, piece: bytes) -> None:
        """A lazy grammar starts once the output has its trigger (a tool call's opening marker): from
        there on a matcher holds the rest of the output. Raises ``ConstraintError`` when the grammar
        cannot be used.

        The trigger is looked for here, in Python: text after the trigger in the same token belongs to
        no grammar, so then the output stays free and the answer's parser judges it.
        """
        trigger = picker.awaiting
        picker.tail = (picker.tail + piece)[-(len(trigger) + 16):]
        at = picker.tail.find(trigger)
        if at < 0:
            return
        picker.awaiting = None
        if picker.tail[at + len(trigger):].strip():
            return
        picker.matcher = self._grammars.matcher(picker.params.grammar, picker.params.grammar_param)

    def _sampler_for(self, params: GenParams) -> Any:
        """A llama.cpp sampler chain in llama-cpp-python's order, or None for plain greedy decoding (the
        arg-max of the logits, without building the candidate list of the whole vocabulary)."""
        ll, n_vocab = self._ll, self._n_vocab
        penalties = (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) != (1.0, 0.0, 0.0)
        greedy = params.temperature <= 0
        if greedy and not penalties and not params.logit_bias:
            return None
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if params.logit_bias:
            biases = (ll.llama_logit_bias * len(params.logit_bias))(
                *[ll.llama_logit_bias(token, bias) for token, bias in params.logit_bias])
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
        if penalties:
            last_n = self._n_ctx if params.repeat_last_n < 0 else min(params.repeat_last_n, self._n_ctx)
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(
                n_vocab, last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty))
        if greedy:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        elif params.mirostat:  # Mirostat steers perplexity itself, in place of top-k, top-p and min-p
            seed = params.seed if params.seed is not None else random.randrange(2**31)
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_mirostat(
                n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100) if params.mirostat == 1 else
                ll.llama_sampler_init_mirostat_v2(seed, params.mirostat_tau, params.mirostat_eta))
        else:
            seed = params.seed if params.seed is not None else random.randrange(2**31)
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(params.top_k))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_typical(params.typical_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(params.min_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    def _logits(self, row: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, row), shape=(self._n_vocab,))

    def _constrained(self, picker: Picker, row: int) -> int | None:
        """The next token of a choice held by a grammar, or None when the grammar is complete.

        Sample first, then ask the matcher about that one token; only a refused token costs the mask of
        the whole vocabulary and a second draw among the allowed tokens. A grammar that allows no token
        at all ends the request with an error; the engine and every other request go on.
        """
        matcher = picker.matcher
        if matcher.is_error():  # e.g. no text of this vocabulary can start the grammar
            raise self._refusal(picker, matcher.get_error())
        if matcher.is_stopped():  # complete: nothing may follow
            return None
        logits = self._logits(row)
        token = self._draw(picker, logits)
        if matcher.try_consume_tokens([token]) != 1:  # refused, and the matcher is as it was
            mask = allowed(matcher, self._n_vocab)
            if matcher.is_error() or not mask.any():
                raise self._refusal(picker, matcher.get_error())
            logits[~mask] = -np.inf
            token = self._draw(picker, logits)
            if not matcher.consume_token(token):
                raise self._refusal(picker, matcher.get_error() or "the grammar refused the next token")
        if picker.chain is not None:
            self._ll.llama_sampler_accept(picker.chain, token)
        return token

    def _draw(self, picker: Picker, logits: np.ndarray) -> int:
        """A token from ``logits`` through the choice's sampler chain, without telling the chain (the
        grammar may refuse it): llama.cpp's candidate array over numpy's memory, sampled in place."""
        if picker.chain is None:
            return int(logits.argmax())
        ll = self._ll
        if self._candidates is None:
            self._candidates = np.zeros(self._n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        candidates = self._candidates
        candidates["id"] = np.arange(self._n_vocab, dtype=np.int32)
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = ll.llama_token_data_array(candidates.ctypes.data_as(ll.llama_token_data_p), self._n_vocab, -1, False)
        ll.llama_sampler_apply(picker.chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:  # no finite candidate was left: never read outside the array
            return int(logits.argmax())
        return int(array.data[array.selected].id)

    def _refusal(self, picker: Picker, why: str) -> ConstraintError:
        """The error a client gets when its constraint cannot go on."""
        log.info("%s: a request's constraint stopped: %s", self._name, why)
        reason = why.replace("<non-verbose/>", "").strip()
        if not reason or reason == "NoExtensionBias":  # llguidance's name for "no token can follow"
            reason = "no token of this model's vocabulary can continue the output"
        return ConstraintError(f"The output constraint cannot be continued: {reason}", picker.params.grammar_param)
