"""Read a GGUF file's header in Python before a C engine touches it.

llama.cpp (and ctransformers' older copy of it) can abort the whole process on a truncated or
malformed file; the ``gguf`` package's reader raises a Python exception instead, because it maps
every tensor it declares. So every GGUF is checked here first, and the metadata the server needs
(architecture, vocabulary kind, chat template, special tokens) comes from the same read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from localai_aio.backends.base import BackendError

CONTROL_TOKEN_TYPES = (3, 4)  # gguf TokenType CONTROL, USER_DEFINED


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    tokenizer_model: str
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    special_tokens: dict[str, int] = field(default_factory=dict)  # text of control tokens -> id
    tokens: tuple[str, ...] = ()

    def token_text(self, token_id: int | None) -> str:
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return ""
        return self.tokens[token_id]


def read_gguf_info(path: str | Path) -> GGUFInfo:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError) as exc:
        raise BackendError(f"not a valid GGUF file ({' '.join(str(exc).split())[:200]})") from None
    fields = reader.fields

    def get(key: str, default=None):  # noqa: ANN001, ANN202
        f = fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            return default

    arch = get("general.architecture")
    if not isinstance(arch, str):
        raise BackendError("not a valid GGUF file (no general.architecture)")
    tokens = tuple(get("tokenizer.ggml.tokens", []) or ())
    types = list(get("tokenizer.ggml.token_type", []) or ())
    special = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types, strict=False))
               if kind in CONTROL_TOKEN_TYPES and tok}
    template = get("tokenizer.chat_template")
    return GGUFInfo(
        architecture=arch,
        tokenizer_model=str(get("tokenizer.ggml.model", "")),
        chat_template=template if isinstance(template, str) and template.strip() else None,
        bos_id=get("tokenizer.ggml.bos_token_id"),
        eos_id=get("tokenizer.ggml.eos_token_id"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
        special_tokens=special,
        tokens=tokens,
    )
