"""Tagged text: parse into spans, serialize back, validate, and escape untrusted text.

A tagged document is plain text with the seven tags of `modes.TAGS` inline. Text between
tags is stored *escaped*, so that a literal `<ai>` written by a person can never become the
tag token (a SentencePiece user-defined symbol matches anywhere in its input).

Escaping: a word joiner (U+2060, invisible when rendered) is inserted after the `<` of
every tag-like string, and one more after strings already escaped that way:
`<ai>` -> `<\u2060ai>`, `<\u2060ai>` -> `<\u2060\u2060ai>`. `unescape` removes one. Escaped text
never contains a tag, and `unescape(escape(x)) == x` for every string x.

Validation uses the grammar's tables from `modes.py`; this module holds no transition rule.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Sequence, Union

import numpy as np

from prealign_jax import modes
from prealign_jax.errors import UserError

JOINER = "\u2060"
_TAIL = r"(?:/?(?:human|ai|quote)>|redacted/>)"
_TAG_RE = re.compile(r"<" + _TAIL)
_TAGLIKE_RE = re.compile("<(" + JOINER + "*)(" + _TAIL + ")")
_UNESCAPE_RE = re.compile("<" + JOINER + "(" + JOINER + "*" + _TAIL + ")")


def escape(text: str) -> str:
    """Make untrusted text safe to embed in a tagged document (no tag can appear)."""
    return _TAGLIKE_RE.sub(lambda m: "<" + JOINER + m.group(1) + m.group(2), text)


def unescape(text: str) -> str:
    """Inverse of `escape`."""
    return _UNESCAPE_RE.sub(lambda m: "<" + m.group(1), text)


class TagError(UserError):
    """Malformed tagged text; `offset` is the character offset of the offending tag."""

    def __init__(self, message: str, offset: int, tag: str):
        super().__init__(message)
        self.offset, self.tag = offset, tag


@dataclasses.dataclass(frozen=True)
class Redacted:
    """The `<redacted/>` marker inside a quote."""


REDACTED = Redacted()


@dataclasses.dataclass(frozen=True)
class Span:
    """A tagged span: its mode ('human', 'ai' or 'quote') and its children in order."""

    mode: str
    children: tuple["Node", ...] = ()

    def text(self) -> str:
        """The span's own unescaped text, nested spans included, markers dropped."""
        return "".join(n for n, _ in walk(self.children, self.mode) if isinstance(n, str))


Node = Union[str, Span, Redacted]  # a str is unescaped text


def walk(nodes: Sequence[Node], mode: str = "doc") -> Iterator[tuple[Node, str]]:
    """Every node of a span tree in document order (pre-order), each with the mode it is
    read in (a span: the mode around it, where its opening tag is read)."""
    for node in nodes:
        yield node, mode
        if isinstance(node, Span):
            yield from walk(node.children, node.mode)


def pieces(text: str) -> Iterator[tuple[int, str, bool]]:
    """(offset, piece, is_tag) for the maximal text runs and tags of `text`, in order."""
    pos = 0
    for m in _TAG_RE.finditer(text):
        if m.start() > pos:
            yield pos, text[pos:m.start()], False
        yield m.start(), m.group(), True
        pos = m.end()
    if pos < len(text):
        yield pos, text[pos:], False


def _walk(text: str, tables: modes.PolicyTables) -> Iterator[tuple[int, str, bool, int]]:
    """(offset, piece, is_tag, state after it) for each piece, checked against `tables`."""
    state = tables.initial
    for offset, piece, is_tag in pieces(text):
        nxt = tables.delta[state, modes.TAG_CLASS[piece] if is_tag else modes.TEXT]
        if nxt < 0:
            what = piece if is_tag else "text"
            mode = modes.MODES[tables.state_mode[state]]
            raise TagError(f"offset {offset}: {what} is not allowed in mode {mode!r} under "
                           f"policy {tables.name!r} (allowed there: "
                           f"{', '.join(tables.allowed_classes(state))})", offset, what)
        state = int(nxt)
        yield offset, piece, is_tag, state


def prefix_state(text: str, policy: modes.Policy | str = modes.GRAMMAR) -> int:
    """The policy state after `text`, a document prefix (open spans allowed), e.g. a prompt.

    Raises TagError at the first tag the policy forbids."""
    tables = _tables(policy)
    state = tables.initial
    for *_, state in _walk(text, tables):
        pass
    return state


def parse(text: str, policy: modes.Policy | str = modes.GRAMMAR) -> list[Node]:
    """Parse tagged text into a list of top-level nodes, validating it against `policy`.

    Raises TagError naming the character offset and the tag at fault.
    """
    tables = _tables(policy)
    state = tables.initial
    stack: list[tuple[str, int, list]] = [("doc", 0, [])]
    for offset, piece, is_tag, state in _walk(text, tables):
        if not is_tag:
            stack[-1][2].append(unescape(piece))
        elif piece == "<redacted/>":
            stack[-1][2].append(REDACTED)
        elif piece.startswith("</"):
            mode, _, children = stack.pop()
            stack[-1][2].append(Span(mode, tuple(children)))
        else:
            stack.append((piece[1:-1], offset, []))
    if len(stack) > 1:
        mode, opened, _ = stack[-1]
        raise TagError(f"offset {len(text)} (end of text): <{mode}> opened at offset "
                       f"{opened} is never closed", opened, f"<{mode}>")
    if tables.delta[state, modes.EOS_CLASS] < 0:
        raise TagError(f"offset {len(text)} (end of text): the document cannot end in state "
                       f"{tables.states[state]!r} under policy {tables.name!r}",
                       len(text), "eos")
    return stack[0][2]


def validate(text: str, policy: modes.Policy | str = modes.GRAMMAR) -> None:
    """Raise TagError if `text` is not a well-formed document under `policy`."""
    parse(text, policy)


def serialize(nodes: list[Node]) -> str:
    """Tagged text for a node list; `serialize(parse(x)) == x` for every valid x.

    Adjacent strings are joined before escaping, since escaping is not additive across a
    boundary that splits a tag-like string.
    """
    out: list[str] = []
    run: list[str] = []

    def flush():
        out.append(escape("".join(run)))
        run.clear()

    def emit(node: Node):
        if isinstance(node, str):
            run.append(node)
            return
        flush()
        if isinstance(node, Redacted):
            out.append("<redacted/>")
        else:
            out.append(f"<{node.mode}>")
            for child in node.children:
                emit(child)
            flush()
            out.append(f"</{node.mode}>")

    for node in nodes:
        emit(node)
    flush()
    return "".join(out)


def is_copy(pieces: Sequence[str], source: str) -> bool:
    """Whether a quote's text `pieces` (the runs between its redactions, unescaped) are the
    words of `source` in order, each a contiguous copy (whitespace aside), a redaction
    standing for whatever lies between them: a faithful quote."""
    pieces = [p.strip() for p in pieces if p.strip()]
    if not pieces:
        return bool(source.strip())  # redactions alone stand for some of the words
    pattern = r"[\s\S]*?".join(r"\s+".join(map(re.escape, p.split())) for p in pieces)
    return re.search(pattern, source) is not None


def token_classes(text: str) -> np.ndarray:
    """Token classes of a tagged text at the level of tags and text runs (for tests/tools)."""
    return np.array([modes.TAG_CLASS[p] if t else modes.TEXT for _, p, t in pieces(text)],
                    np.int32)


def _tables(policy: modes.Policy | str) -> modes.PolicyTables:
    return modes.get_policy(policy).compile()
