"""GBNF syntax, checked the way llama.cpp's grammar parser checks it, in Python.

llama.cpp reports why a grammar does not parse only by printing to the process's stderr; the C API
returns just "no sampler". Capturing that would mean redirecting file descriptor 2 for everyone, so a
request's grammar is checked here first, with the same rules and the same messages
(``llama_grammar_parser::parse`` in llama-grammar.cpp). What only llama.cpp can judge (``<token>``
names, left recursion, a missing root) is still judged by it, through its log callback.
"""

from __future__ import annotations

#: llama.cpp refuses repetitions that would expand into more rules than this.
MAX_REPETITION = 2000
_ESCAPES = {"t", "r", "n", "\\", '"', "[", "]", "-"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


class GrammarSyntaxError(ValueError):
    pass


def _is_word(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch == "-")


class _Parser:
    def __init__(self, text: str):
        self.text = text.split("\0", 1)[0]  # llama.cpp reads a C string
        self.defined: set[str] = set()
        self.referenced: list[str] = []
        self.generated = 0  # rules that groups and repetitions synthesize

    def at(self, pos: int, offset: int = 0) -> str:
        index = pos + offset
        return self.text[index] if index < len(self.text) else ""

    def fail(self, what: str, pos: int | None = None) -> GrammarSyntaxError:
        if pos is None:
            return GrammarSyntaxError(what)
        rest = self.text[pos:pos + 40].replace("\n", "\\n")
        return GrammarSyntaxError(f"{what} at '{rest}'" if rest else f"{what} at the end")

    def space(self, pos: int, newline_ok: bool) -> int:
        while True:
            ch = self.at(pos)
            if ch == "#":
                while self.at(pos) not in ("", "\r", "\n"):
                    pos += 1
            elif ch in (" ", "\t") or (newline_ok and ch in ("\r", "\n")):
                pos += 1
            else:
                return pos

    def name(self, pos: int) -> int:
        end = pos
        while _is_word(self.at(end)):
            end += 1
        if end == pos:
            raise self.fail("expecting name", pos)
        return end

    def integer(self, pos: int) -> int:
        end = pos
        while self.at(end).isdigit() and self.at(end).isascii():
            end += 1
        if end == pos:
            raise self.fail("expecting integer", pos)
        return end

    def char(self, pos: int) -> int:
        ch = self.at(pos)
        if ch == "\\":
            kind = self.at(pos, 1)
            if kind in _HEX_DIGITS:
                size = _HEX_DIGITS[kind]
                digits = self.text[pos + 2:pos + 2 + size]
                if len(digits) != size or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    raise self.fail(f"expecting {size} hex chars", pos + 2)
                return pos + 2 + size
            if kind in _ESCAPES:
                return pos + 2
            raise self.fail("unknown escape", pos)
        if ch:
            return pos + 1
        raise self.fail("unexpected end of input")

    def token(self, pos: int) -> int:
        if self.at(pos) != "<":
            raise self.fail("expecting '<'", pos)
        pos += 1
        if self.at(pos) == "[":
            end = self.integer(pos + 1)
            if int(self.text[pos + 1:end]) > 0xFFFFFFFF:
                raise self.fail("parsed token id is too big", pos + 1)
            for expected in ("]", ">"):
                if self.at(end) != expected:
                    raise self.fail(f"expecting '{expected}'", end)
                end += 1
            return end
        end = self.text.find(">", pos)
        if end < 0:
            raise self.fail("expecting '>'", len(self.text))
        return end + 1  # whether the text is one token of the vocabulary is llama.cpp's to say

    def sequence(self, pos: int, nested: bool) -> int:
        has_item = False
        prev_rules = 1

        def repeat(low: int, high: int | None) -> None:
            nonlocal prev_rules
            if not has_item:
                raise self.fail("expecting preceding item to */+/?/{", pos)
            total = high if high else (low or 1)
            if prev_rules * total > MAX_REPETITION:
                raise self.fail("number of rules that are going to be repeated multiplied by the new repetition "
                                "exceeds sane defaults, please reduce the number of repetitions or rule complexity")
            prev_rules *= total
            self.generated += 1 if high is None else max(high - low, 0)

        while (ch := self.at(pos)):
            if ch in ('"', "["):
                close = '"' if ch == '"' else "]"
                pos += 1
                if ch == "[" and self.at(pos) == "^":
                    pos += 1
                while self.at(pos) != close:
                    if not self.at(pos):
                        raise self.fail("unexpected end of input")
                    pos = self.char(pos)
                    if ch == "[" and self.at(pos) == "-" and self.at(pos, 1) != "]":
                        if not self.at(pos, 1):
                            raise self.fail("unexpected end of input")
                        pos = self.char(pos + 1)
                pos = self.space(pos + 1, nested)
            elif ch in ("<", "!"):
                pos = self.space(self.token(pos + (ch == "!")), nested)
            elif _is_word(ch):
                end = self.name(pos)
                self.referenced.append(self.text[pos:end])
                pos = self.space(end, nested)
            elif ch == "(":
                before = self.generated
                self.generated += 1
                pos = self.alternates(self.space(pos + 1, True), True)
                if self.at(pos) != ")":
                    raise self.fail("expecting ')'", pos)
                pos = self.space(pos + 1, nested)
                has_item, prev_rules = True, max(1, self.generated - before)
                continue
            elif ch == ".":
                pos = self.space(pos + 1, nested)
            elif ch in ("*", "+", "?"):
                pos = self.space(pos + 1, nested)
                repeat({"*": 0, "+": 1, "?": 0}[ch], 1 if ch == "?" else None)
                continue
            elif ch == "{":
                pos = self.space(pos + 1, nested)
                if not (self.at(pos).isascii() and self.at(pos).isdigit()):
                    raise self.fail("expecting an int", pos)
                end = self.integer(pos)
                low, high = int(self.text[pos:end]), None
                pos = self.space(end, nested)
                if self.at(pos) == "}":
                    high = low
                elif self.at(pos) == ",":
                    pos = self.space(pos + 1, nested)
                    if self.at(pos).isascii() and self.at(pos).isdigit():
                        end = self.integer(pos)
                        high = int(self.text[pos:end])
                        pos = self.space(end, nested)
                    if self.at(pos) != "}":
                        raise self.fail("expecting '}'", pos)
                else:
                    raise self.fail("expecting ','", pos)
                pos = self.space(pos + 1, nested)
                if low > MAX_REPETITION:
                    raise self.fail("number of repetitions exceeds sane defaults, please reduce the number of "
                                    "repetitions")
                repeat(low, None if high is not None and high > MAX_REPETITION else high)
                continue
            else:
                break
            has_item, prev_rules = True, 1
        return pos

    def alternates(self, pos: int, nested: bool) -> int:
        pos = self.sequence(pos, nested)
        while self.at(pos) == "|":
            pos = self.sequence(self.space(pos + 1, True), nested)
        return pos

    def rule(self, pos: int) -> int:
        end = self.name(pos)
        self.defined.add(self.text[pos:end])
        pos = self.space(end, False)
        if self.text[pos:pos + 3] != "::=":
            raise self.fail("expecting ::=", pos)
        pos = self.alternates(self.space(pos + 3, True), False)
        if self.at(pos) == "\r":
            pos += 2 if self.at(pos, 1) == "\n" else 1
        elif self.at(pos) == "\n":
            pos += 1
        elif self.at(pos):
            raise self.fail("expecting newline or end", pos)
        return self.space(pos, True)

    def parse(self) -> None:
        pos = self.space(0, True)
        while pos < len(self.text):
            pos = self.rule(pos)
        for name in self.referenced:
            if name not in self.defined:
                raise self.fail(f"Undefined rule identifier '{name}'")


def syntax_error(grammar: str, root: str = "root") -> str | None:
    """Why llama.cpp would refuse to parse ``grammar``, or None when its syntax is fine."""
    parser = _Parser(grammar)
    try:
        parser.parse()
    except GrammarSyntaxError as exc:
        return str(exc)
    if not parser.defined:
        return "the grammar has no rules"
    if root not in parser.defined:
        return f"the grammar has no '{root}' rule"
    return None
