"""Raw text in, tagged documents out (`prealign prepare --from_text FILE... --mode human`).

Inputs, by file name:
- `*.jsonl`: one JSON object per line with a `text` field;
- anything else: plain UTF-8 text, documents separated by blank lines.

Untrusted text is wrapped in one span of `mode` (or left bare for mode `doc`) through
`tags.serialize`, which escapes every tag-like string: a literal `<ai>` in the input can
never become the tag token. With `tagged=True` the input is JSONL of documents that are
*already* tagged; each is validated against the grammar (`tags.parse`) instead.

Bad inputs (invalid UTF-8, a line that is not JSON or lacks `text`, malformed tags) follow
the bad-record policy: `error` stops with the file, line and reason; `skip` logs and counts.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator

from prealign_jax import console, tags
from prealign_jax.data import records
from prealign_jax.errors import UserError

INGEST_MODES = ("human", "ai", "doc")
_BLANK_LINES = re.compile(rb"\n[ \t\r]*\n")


class IngestError(UserError):
    """An input file or record that cannot be ingested (names file, line and reason)."""


def read_documents(paths, mode: str = "human", tagged: bool = False,
                   bad_records: str = "error") -> Iterator[records.Document]:
    """Documents of the given files, in order; `doc_id` is `<file name>:<line>`."""
    if mode not in INGEST_MODES:
        raise IngestError(f"--mode={mode}: use one of {INGEST_MODES}")
    skipped = 0
    for path in paths:
        for line, text, problem in _raw_records(path, tagged):
            where = f"{path}:{line}"
            if problem is None:
                try:
                    yield _document(text, mode, tagged, f"{os.path.basename(path)}:{line}")
                    continue
                except tags.TagError as e:
                    problem = f"malformed tags at {e}"
            if bad_records == "error":
                raise IngestError(f"{where}: {problem} (pass --bad_records=skip to drop such "
                                  "records)")
            skipped += 1
            console.LOG.warning("prealign ingest: skipped %s: %s (%d skipped so far)", where,
                            problem, skipped)


def _document(text: str, mode: str, tagged: bool, doc_id: str) -> records.Document:
    if tagged:
        nodes = tags.parse(text)
        labels = [-1] * sum(isinstance(n, tags.Span) for n, _ in tags.walk(nodes))
        return records.Document(text=text, source="ingested", doc_id=doc_id,
                                span_labels=tuple(labels))
    nodes = [text] if mode == "doc" else [tags.Span(mode, (text,))]
    return records.Document(text=tags.serialize(nodes), source="ingested", doc_id=doc_id,
                            span_labels=() if mode == "doc" else (-1,))


def _surrogate_problem(text: str) -> str | None:
    """JSON may escape a lone surrogate (`"\\ud800"`); such a string cannot be written as
    UTF-8, so it is a bad record here rather than a crash in the shard writer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"'text' holds a lone surrogate (U+{ord(text[e.start]):04X} at character "
                f"{e.start}), which is not Unicode text")
    return None


def _raw_records(path: str, tagged: bool) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, problem or None) of each record of a file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise IngestError(f"--from_text {path}: cannot read it ({e.strerror})") from None
    if path.endswith(".jsonl") or tagged:
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield number, "", f"invalid UTF-8 at byte {e.start}"
                continue
            except ValueError as e:
                yield number, "", f"not a JSON object ({e})"
                continue
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                yield number, "", "no string field 'text'"
            elif not text.strip():
                yield number, "", "empty text"
            else:
                yield number, text, _surrogate_problem(text)
        return
    start, number = 0, 1
    for sep in list(_BLANK_LINES.finditer(data)) + [None]:
        end = len(data) if sep is None else sep.start()
        chunk = data[start:end]
        if chunk.strip():
            first = number + data.count(b"\n", start, start + len(chunk) - len(chunk.lstrip()))
            try:
                yield first, chunk.decode("utf-8").strip(), None
            except UnicodeDecodeError as e:
                yield first, "", f"invalid UTF-8 at byte {e.start} of the document"
        if sep is not None:
            number += data.count(b"\n", start, sep.end())
            start = sep.end()
