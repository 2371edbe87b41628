"""The pipeline language: ``cleanup,cast(dtype=bf16)`` → a list of configured :class:`Pass` objects.

Grammar::

    pipeline := item (',' item)*
    item     := NAME [ '(' [ option (',' option)* ] ')' ]
    option   := NAME '=' VALUE          VALUE: a bare word (letters, digits, _ . - + * / : ;) or a quoted string

Values are converted to the option's declared type (int, float, bool, str, a ``Literal`` of choices, a tuple
written ``a;b;c``). A bad spec raises :class:`SpecError` with a caret under the offending token and the nearest
valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass

from passforge.passes import registry
from passforge.passes.base import Pass

MAX_SPEC_CHARS = 10_000


class SpecError(ValueError):
    """A pipeline spec that cannot be parsed or names an unknown pass, option or value."""

    def __init__(self, spec: str, position: int, message: str) -> None:
        shown = spec if len(spec) <= 200 else spec[:200] + "..."
        caret = " " * min(position, len(shown)) + "^"
        super().__init__(f"bad pipeline spec: {message}\n  {shown}\n  {caret}")
        self.position = position


@dataclass(frozen=True)
class _Token:
    kind: str  # "word", "punct", "string"
    text: str
    pos: int


_TOKEN = re.compile(r"\s*(?:(?P<string>\"[^\"]*\"|'[^']*')|(?P<word>[A-Za-z0-9_.\-+*/:;]+)|(?P<punct>[(),=]))")


def _tokenize(spec: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(spec):
        if spec[pos:].strip() == "":
            break
        match = _TOKEN.match(spec, pos)
        if match is None:
            bad = pos + len(spec[pos:]) - len(spec[pos:].lstrip())
            raise SpecError(spec, bad, f"unexpected character {spec[bad]!r}")
        kind = match.lastgroup or "word"
        text = match.group(kind)
        tokens.append(_Token(kind, text.strip("\"'") if kind == "string" else text, match.start(kind)))
        pos = match.end()
    return tokens


def parse_pipeline(spec: str) -> list[Pass]:
    """Parse ``spec`` into configured passes (see module docstring)."""
    if len(spec) > MAX_SPEC_CHARS:
        raise SpecError(spec, MAX_SPEC_CHARS, f"spec is {len(spec)} characters; the limit is {MAX_SPEC_CHARS}")
    tokens = _tokenize(spec)
    if not tokens:
        raise SpecError(spec, 0, "empty pipeline; name at least one pass (see `passforge passes`)")
    passes: list[Pass] = []
    i = 0
    while True:
        pass_, i = _parse_item(spec, tokens, i)
        passes.append(pass_)
        if i == len(tokens):
            return passes
        tok = tokens[i]
        if tok.text != ",":
            raise SpecError(spec, tok.pos, f"expected ',' between passes, found {tok.text!r}")
        i += 1
        if i == len(tokens):
            raise SpecError(spec, len(spec), "trailing ',' — a pass name must follow")


def _parse_item(spec: str, tokens: list[_Token], i: int) -> tuple[Pass, int]:
    tok = tokens[i]
    if tok.kind != "word":
        raise SpecError(spec, tok.pos, f"expected a pass name, found {tok.text!r}")
    cls = registry.lookup(tok.text)
    if cls is None:
        raise SpecError(spec, tok.pos, f"unknown pass '{tok.text}'{suggest(tok.text, registry.available())}")
    i += 1
    options: dict[str, object] = {}
    if i < len(tokens) and tokens[i].text == "(":
        i += 1
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        while i < len(tokens) and tokens[i].text != ")":
            key = tokens[i]
            if key.kind != "word":
                raise SpecError(spec, key.pos, f"expected an option name, found {key.text!r}")
            if key.text not in fields:
                hint = suggest(key.text, fields) or f"; '{cls.name}' takes {_list_or_none(fields)}"
                raise SpecError(spec, key.pos, f"pass '{cls.name}' has no option '{key.text}'{hint}")
            if key.text in options:
                raise SpecError(spec, key.pos, f"option '{key.text}' given twice")
            if i + 2 >= len(tokens) or tokens[i + 1].text != "=":
                raise SpecError(spec, key.pos + len(key.text), f"expected '=' and a value after '{key.text}'")
            value = tokens[i + 2]
            if value.kind == "punct":
                raise SpecError(spec, value.pos, f"expected a value for '{key.text}', found {value.text!r}")
            try:
                options[key.text] = convert_value(value.text, hints[key.text])
            except ValueError as exc:
                raise SpecError(spec, value.pos, f"{cls.name}: option '{key.text}': {exc}") from None
            i += 3
            if i < len(tokens) and tokens[i].text == ",":
                i += 1
        if i == len(tokens):
            raise SpecError(spec, len(spec), f"unclosed '(' after '{cls.name}'")
        i += 1
    try:
        return cls(**options), i
    except (TypeError, ValueError) as exc:
        raise SpecError(spec, tok.pos, f"{cls.name}: {exc}") from None


def convert_value(text: str, annotation: object) -> object:
    """Convert an option's text to its declared type; ``ValueError`` says what was expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        for choice in args:
            if str(choice).lower() == text.lower():
                return choice
        raise ValueError(f"'{text}' is not one of {', '.join(map(str, args))}{suggest(text, map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if text.lower() == "none" and len(non_none) < len(args):
            return None
        errors = []
        for candidate in non_none:
            try:
                return convert_value(text, candidate)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        item_type = args[0] if args else str
        return tuple(convert_value(part, item_type) for part in text.split(";") if part)
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got '{text}'")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got '{text}'") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got '{text}'") from None
    return text


def suggest(word: str, names: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _list_or_none(names: typing.Iterable[str]) -> str:
    names = list(names)
    return "options " + ", ".join(names) if names else "no options"


def format_pipeline(passes: typing.Sequence[Pass]) -> str:
    return ",".join(p.spec for p in passes)
