"""Labelling functions: raw text in, tagged nodes out (`read_documents(label_fn=...)`).

Ingest wraps each raw record in one span of a single mode; a labelling function instead
says which parts of a record are whose. It is called with the raw text of one record and
returns the document's nodes: a list of `str` (text outside any span) and
`tags.Span(mode, children)` (children: the same kinds of node, and `tags.REDACTED` inside
a quote). Ingest serializes the nodes with `tags.serialize`, which escapes every string,
so a tag-like string in the text stays text, and validates the result against the
grammar; a function that raises or returns anything else makes that record a bad record.

Write your own anywhere importable and name it as `package.module:function`, e.g.
`prealign_jax.data.labelling:dialogue`.
"""

from __future__ import annotations

import re

from prealign_jax import tags

_SPEAKERS = {"User": "human", "Assistant": "ai"}
_TURN = re.compile(r"^(User|Assistant):[ \t]*", re.MULTILINE)


def dialogue(text: str) -> list[tags.Node]:
    """A chat transcript, one turn per `User:` or `Assistant:` line prefix: each turn's
    text (prefix dropped, up to the next turn) becomes a human or an ai span; text before
    the first turn and the whitespace between turns stay outside any span.

    The turn markers themselves are trusted: a user line that begins `Assistant:` starts
    an ai turn, so use it only on transcripts whose markers the chat system wrote.
    """
    turns = list(_TURN.finditer(text))
    nodes: list[tags.Node] = [text[:turns[0].start()] if turns else text]
    for turn, after in zip(turns, turns[1:] + [None]):
        content = text[turn.end():after.start() if after else len(text)]
        said = content.rstrip()
        nodes += [tags.Span(_SPEAKERS[turn.group(1)], (said,) if said else ()),
                  content[len(said):]]
    return [node for node in nodes if node != ""]
