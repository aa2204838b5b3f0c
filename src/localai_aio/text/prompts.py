"""Turning OpenAI messages into a model's prompt.

The chat template is, in order: the model YAML's ``template.chat`` (a named format or Jinja source),
else the template stored in the GGUF (``tokenizer.chat_template``). Templates are rendered in a
Jinja2 sandbox the way transformers' ``apply_chat_template`` does (``messages``, ``bos_token``,
``eos_token``, ``add_generation_prompt``, ``tools``, ``raise_exception``, ``strftime_now``), so a
model's own template gives the prompt it was trained on.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localai_aio.backends.text import TextEngine
from localai_aio.errors import InvalidRequest, NotImplementedForModel

NAMED_FORMATS: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\n' + messages[0]['content'] + "
        "'\n<</SYS>>\n\n' %}{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first "
        "else '') + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
        "' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% else %}"
        "{{ m['content'] + '\n\n' }}{% endif %}{% endfor %}"
    ),
    "phi-3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


class TemplateMissing(InvalidRequest):
    code = "chat_template_missing"


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def text_of(content: Any, where: str) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(f"Invalid value for '{where}.{i}': each part must be an object with a 'type'",
                                     param=f"{where}.{i}")
            if part["type"] != "text":
                raise InvalidRequest(f"Invalid value for '{where}.{i}.type': {part['type']!r} parts are not "
                                     "supported by these text models; send 'text' parts", param=f"{where}.{i}.type")
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"Invalid value for '{where}.{i}.text': must be a string",
                                     param=f"{where}.{i}.text")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequest(f"Invalid value for '{where}': must be a string or a list of parts", param=where)


#: Messages in one conversation at most (the request's and, for the Responses API, the stored turns before
#: it): every one is checked and rendered before generating, so their number bounds that work.
MAX_MESSAGES = 50_000


def normalize_messages(messages: Any, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Validate OpenAI messages and shape them for templates (text content, ``developer`` -> ``system``)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"Too many messages: {len(messages)}; at most {MAX_MESSAGES} per conversation",
                             param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise InvalidRequest(f"Invalid value for '{where}': must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"Invalid value for '{where}.role': must be one of "
                                 f"{', '.join(sorted(ROLES))}", param=f"{where}.role")
        shaped = {k: v for k, v in message.items() if v is not None}
        shaped["role"] = "system" if role == "developer" else role
        shaped["content"] = text_of(message.get("content"), f"{where}.content")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise InvalidRequest(f"'{where}.tool_call_id' is required for tool messages",
                                 param=f"{where}.tool_call_id")
        out.append(shaped)
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def chat_template_source(template_cfg: Mapping[str, Any], gguf_template: str | None, model: str) -> str:
    configured = template_cfg.get("chat")
    if isinstance(configured, str) and configured.strip():
        return NAMED_FORMATS.get(configured.strip().lower(), configured)
    if gguf_template:
        return gguf_template
    raise TemplateMissing(
        f"Model '{model}' has no chat template: its file stores none and its config sets no `template.chat`. "
        f"Set `template.chat` to a Jinja template or one of: {', '.join(NAMED_FORMATS)}", param="model")


def render_chat(source: str, messages: Sequence[Mapping[str, Any]], *, bos_token: str, eos_token: str,
                tools: list[Any] | None = None, add_generation_prompt: bool = True) -> str:
    try:
        return compile_template(source).render(
            messages=list(messages), bos_token=bos_token, eos_token=eos_token, tools=tools,
            add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        raise InvalidRequest(f"The model's chat template rejected these messages: {exc}", param="messages") from None


def render_completion(template_cfg: Mapping[str, Any], prompt: str) -> str:
    """``template.completion`` wraps a completion prompt; LocalAI's ``{{.Input}}`` is understood too."""
    source = template_cfg.get("completion")
    if not isinstance(source, str) or not source.strip():
        return prompt
    source = source.replace("{{.Input}}", "{{ prompt }}").replace("{{ .Input }}", "{{ prompt }}")
    try:
        return compile_template(source).render(prompt=prompt, input=prompt)
    except jinja2.TemplateError as exc:
        raise InvalidRequest(f"The model's completion template failed: {exc}", param="prompt") from None


#: Fill-in-the-middle control tokens (prefix, suffix, middle) that models store in their vocabulary.
FIM_TOKENS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"),
)


def fill_in_middle(engine: TextEngine, prefix: str, suffix: str) -> list[int]:
    """The prompt that asks the model for the text between ``prefix`` and ``suffix``, in its own
    fill-in-the-middle tokens."""
    specials = engine.info.special_tokens
    for pre, suf, mid in FIM_TOKENS:
        if pre in specials and suf in specials and mid in specials:
            return ([specials[pre]] + engine.tokenize(prefix, add_bos=False, special=False)
                    + [specials[suf]] + engine.tokenize(suffix, add_bos=False, special=False) + [specials[mid]])
    raise NotImplementedForModel("This model has no fill-in-the-middle tokens, so 'suffix' cannot be used",
                                 param="suffix")
