"""JSON schema -> GBNF, with strings as JSON defines them.

llama-cpp-python's converter (a port of an older llama.cpp script) lets a string hold any character
but ``"`` and ``\\``, so a model sampling at temperature 1 writes raw newlines and other control
characters into strings, and the answer fails to parse. llama.cpp's own converter has since excluded
them; this one does the same by giving the converter JSON's ``char`` rule: a character other than ``"``,
``\\``, U+0000-U+001F and DEL (as llama.cpp does), surrogates and code points past U+10FFFF (which
llama.cpp's UTF-8 reader would otherwise build from bytes that are not UTF-8), or an escape. A type
list (``["string", "null"]``) keeps the schema's other keywords for each type, as llama.cpp's converter
does, so ``maxLength`` and the like still bound the answer.

Imported only where llama-cpp-python is installed.
"""

from __future__ import annotations

from typing import Any

from llama_cpp.llama_grammar import RESERVED_NAMES, BuiltinRule, SchemaConverter

JSON_CHAR = BuiltinRule(
    r'[\x20-\x21\x23-\x5B\x5D-\x7E\x80-\uD7FF\uE000-\U0010FFFF] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] '
    r'[0-9a-fA-F] [0-9a-fA-F])', [])


class JSONSchemaConverter(SchemaConverter):
    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return super()._add_primitive(name, JSON_CHAR if name == "char" else rule)

    def visit(self, schema: Any, name: str) -> str:
        kinds = schema.get("type") if isinstance(schema, dict) else None
        if isinstance(kinds, list) and not {"$ref", "oneOf", "anyOf"} & schema.keys():
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, self._generate_union_rule(name, [{**schema, "type": t} for t in kinds]))
        return super().visit(schema, name)


def schema_grammar(schema: Any) -> str:
    converter = JSONSchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "request"), "")
    return converter.format_grammar()
