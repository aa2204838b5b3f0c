"""How a model writes tool calls, read from its chat template.

Models trained for function calling write calls in their own markup, and their chat templates show
which: Hermes and Qwen wrap each call in ``<tool_call>...</tool_call>``, Mistral writes ``[TOOL_CALLS]``
and a JSON array, Llama 3.x answers with one JSON object whose arguments are under ``parameters``. A
model held to another markup calls worse, and a server that does not know the model's markup hands
it to the client as text. Templates without a native format get the generic one, which our own tool
instructions teach: the whole answer is a JSON call (or an array of them), decided by its first
character.

For formats with an opening marker the grammar is lazy, as in llama.cpp's server: the model writes
freely until it writes the marker, and from there on the grammar holds it to well-formed calls of the
offered tools. A call never reaches ``content``: ``CallSplitter`` keeps the markup out of the text as
it streams, and ``ToolFormat.parse`` turns it into OpenAI ``tool_calls``.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from localai_aio.text.reasoning import partial_suffix

# Grammar rules in llguidance's Lark dialect. Whitespace between markup and JSON is bounded, so a grammar
# never lets a model loop on blanks; free text is anything that does not open a JSON call.
WS_RULE = r"TOOL_WS: /[ \t\n]{0,3}/"
FREE_TEXT_RULE = r"FREE_TEXT: /[^{\[ \t\n](.|\n)*/"
ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolFormat:
    name: str
    opener: str | None = None  # the marker calls start with; None: the answer itself is the call JSON
    closer: str | None = None  # each call ends with this, and the next one starts with the opener again
    key: str = "arguments"  # where a call object holds its arguments
    array: bool = False  # the calls are one JSON array after the opener
    parallel: bool = True  # the format can hold several calls in one answer
    id_length: int | None = None  # a fixed length of alphanumeric call ids (Mistral's templates check it)

    def new_id(self) -> str:
        if self.id_length:
            return "".join(secrets.choice(ID_ALPHABET) for _ in range(self.id_length))
        return "call_" + secrets.token_hex(12)

    # -- the constraint -----------------------------------------------------------------------------------

    def grammar(self, call: str, *, parallel: bool, required: bool) -> tuple[str, str | None]:
        """The grammar for calls made of the ``tool_call`` rule in ``call``, and the trigger: the text
        after which it applies (None: from the first token). ``required`` forces a call; otherwise the
        model may answer in text instead (before the opener, or by its first character)."""
        several = parallel and self.parallel
        rules = f"{call}\n{WS_RULE}\n"
        if self.opener is None:
            calls = 'tool_call | "[" TOOL_WS tool_call (TOOL_WS "," TOOL_WS tool_call)* TOOL_WS "]"' \
                if several else "tool_call"
            start = "tool_calls" if required else "tool_calls | FREE_TEXT"
            return f"%llguidance {{}}\nstart: {start}\ntool_calls: {calls}\n{rules}{FREE_TEXT_RULE}\n", None
        if self.array:
            more = '(TOOL_WS "," TOOL_WS tool_call)*' if several else ""
            after = f'TOOL_WS "[" TOOL_WS tool_call {more} TOOL_WS "]"'
        else:
            one = f'TOOL_WS tool_call TOOL_WS {_literal(self.closer or "")}'
            after = f"{one} (TOOL_WS {_literal(self.opener)} {one})*" if several else one
        start = f"{_literal(self.opener)} tool_after" if required else "tool_after"
        return f"%llguidance {{}}\nstart: {start}\ntool_after: {after}\n{rules}", \
            None if required else self.opener

    # -- the answer ---------------------------------------------------------------------------------------

    def parse(self, text: str, names: frozenset[str] = frozenset()) -> list[dict[str, Any]] | None:
        """OpenAI ``tool_calls`` from the calls' text (from the opener on), or None when it is not a
        complete call of an offered tool."""
        if self.opener is None:
            payloads = [text]
        elif self.closer is None:
            payloads = [text[len(self.opener):]]
        else:
            payloads = re.findall(re.escape(self.opener) + r"(.*?)" + re.escape(self.closer), text, re.S)
            if not payloads or text.count(self.opener) != len(payloads):
                return None  # a call left open (cut by max_tokens)
        items: list[Any] = []
        for payload in payloads:
            try:
                value = json.loads(payload)
            except ValueError:
                return None
            items += value if isinstance(value, list) else [value]
        calls = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            if names and item["name"] not in names:
                return None
            arguments = item.get(self.key, item.get("arguments", item.get("parameters", {})))
            calls.append({"id": self.new_id(), "type": "function",
                          "function": {"name": item["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
        return calls or None


GENERIC = ToolFormat("json")
HERMES = ToolFormat("hermes", opener="<tool_call>", closer="</tool_call>")
MISTRAL = ToolFormat("mistral", opener="[TOOL_CALLS]", array=True, id_length=9)
LLAMA3 = ToolFormat("llama3", key="parameters", parallel=False)


def detect(template: str) -> ToolFormat:
    """The tool format a chat template teaches; the generic one when it renders no tools itself."""
    if "tools" not in template:
        return GENERIC
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return GENERIC


def object_arguments(template: str) -> bool:
    """Whether the template writes earlier calls' arguments with ``tojson`` (most native ones do), so it
    must get them as an object, not as OpenAI's JSON string (which it would quote a second time)."""
    return re.search(r"arguments\s*\|\s*tojson", template) is not None


def _literal(text: str) -> str:
    return json.dumps(text)


class CallSplitter:
    """Feed an answer's text as it comes; get back the text that is content, holding back what could
    still be the start of a call. ``finish`` returns the remaining content and the calls' text."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.state = "undecided" if fmt.opener is None else "text"
        self.held = ""

    def feed(self, text: str) -> str:
        self.held += text
        if self.state == "call":
            return ""
        if self.state == "undecided":  # generic: the first character says whether this is a call
            stripped = self.held.lstrip()
            if not stripped:
                return ""
            self.state = "call" if stripped[0] in "{[" else "text"
            if self.state == "call":
                return ""
            out, self.held = self.held, ""
            return out
        if self.fmt.opener is None:
            out, self.held = self.held, ""
            return out
        at = self.held.find(self.fmt.opener)
        if at >= 0:
            out, self.held, self.state = self.held[:at], self.held[at:], "call"
            return out
        keep = partial_suffix(self.held, self.fmt.opener)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str, str | None]:
        held, self.held = self.held, ""
        if self.state == "call":
            return "", held
        return held, None
