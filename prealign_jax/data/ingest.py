"""Raw text in, tagged documents out (`prealign prepare --from_text SOURCE... --mode human`).

Sources, by name:
- `*.jsonl`: one JSON object per line with a `text` field;
- `*.parquet`: a Parquet file with a string (or UTF-8 binary) column `text`;
- `tfds:NAME[/CONFIG][:VERSION]:SPLIT[#FEATURE]`: a TensorFlow Datasets split already
  prepared in the TFDS data dir ($TFDS_DATA_DIR, else TFDS's default), e.g.
  `tfds:wiki40b/en:1.3.0:train[:1%]#text`; FEATURE (default `text`) is a string feature;
- anything else: plain UTF-8 text, documents separated by blank lines.
Files are read through `tf.io.gfile`, so a path may be a URL such as `gs://bucket/a.jsonl`.

Untrusted text is wrapped in one span of `mode` (or left bare for mode `doc`) through
`tags.serialize`, which escapes every tag-like string: a literal `<ai>` in the input can
never become the tag token. With `tagged=True` the records' text is *already* tagged (a
source not named as above is read as JSONL); each is validated against the grammar
(`tags.parse`) instead. With `label_fn` a labelling function (see `labelling.py`) turns
each record's raw text into nodes, which are serialized (escaped) and validated the same
way; `mode` is then unused.

Bad inputs (invalid UTF-8, a line that is not JSON or lacks `text`, a null Parquet value,
malformed tags, a labelling function that fails) follow the bad-record policy: `error`
stops with the source, record number and reason; `skip` logs and counts.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
import re
from typing import Callable, Iterator

from prealign_jax import console, modes, tags, tf_cpu
from prealign_jax.data import records
from prealign_jax.errors import UserError

INGEST_MODES = ("human", "ai", "doc")
_BLANK_LINES = re.compile(rb"\n[ \t\r]*\n")
_TFDS_SOURCE = re.compile(r"tfds:(?P<name>[^:#]+)(?::(?P<version>[\d*]+\.[\d*]+\.[\d*]+))?"
                          r":(?P<split>[^#]+)(?:#(?P<feature>.+))?")
_SPAN_MODES = tuple(m for m in modes.MODES if m != "doc")
_PARQUET_BATCH_ROWS = 1024  # python objects held at once, whatever the row-group size

Record = tuple[int, str, "str | None"]  # (record number, text, problem or None)


class IngestError(UserError):
    """An input file or record that cannot be ingested (names file, line and reason)."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """An input record that cannot become a document: where it is and why."""
    source: str  # the input it came from (or the document's source)
    location: str  # file:line, or a document id
    reason: str

    def message(self) -> str:
        return (f"{self.location}: {self.reason} (pass --bad_records=skip to drop such "
                "records)")


def read_input(path: str, mode: str = "human", tagged: bool = False, label_fn=None
               ) -> Iterator[records.Document | BadRecord]:
    """Documents of one input, in order (`doc_id` is `<source name>:<record>`), and a
    BadRecord for each record that cannot be one (the caller applies the policy)."""
    if mode not in INGEST_MODES:
        raise IngestError(f"--mode={mode}: use one of {INGEST_MODES}")
    for line, text, problem in _raw_records(path, tagged, label_fn):
        if problem is None:
            try:
                yield _document(text, mode, tagged or label_fn is not None,
                                f"{_source_name(path)}:{line}")
                continue
            except tags.TagError as e:
                problem = f"malformed tags at {e}"
        yield BadRecord(path, f"{path}:{line}", problem)


def read_records(path: str) -> Iterator[records.Document | BadRecord]:
    """Document records of a JSONL file (`records.to_json` lines: `prealign synthesize`'s
    corpus), kept as they are (their tags are checked when they are tokenized)."""
    data = _read_bytes(path, "--documents")
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            try:
                yield records.from_json(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield BadRecord(path, f"{path}:{number}", f"invalid UTF-8 at byte {e.start}")
            except (ValueError, TypeError) as e:
                yield BadRecord(path, f"{path}:{number}", _one_line(str(e)))


def read_documents(paths, mode: str = "human", tagged: bool = False,
                   bad_records: str = "error", label_fn=None) -> Iterator[records.Document]:
    """Documents of the given inputs, in order, with the bad-record policy applied:
    `error` stops at the first bad record, `skip` logs it with a running count."""
    skipped = 0
    for path in paths:
        for item in read_input(path, mode, tagged, label_fn):
            if not isinstance(item, BadRecord):
                yield item
                continue
            if bad_records == "error":
                raise IngestError(item.message())
            skipped += 1
            console.LOG.warning("prealign ingest: skipped %s: %s (%d skipped so far)",
                                item.location, item.reason, skipped)


def _document(text: str, mode: str, tagged: bool, doc_id: str) -> records.Document:
    if tagged:
        nodes = tags.parse(text)
        labels = [-1] * sum(isinstance(n, tags.Span) for n, _ in tags.walk(nodes))
        return records.Document(text=text, source="ingested", doc_id=doc_id,
                                span_labels=tuple(labels))
    nodes = [text] if mode == "doc" else [tags.Span(mode, (text,))]
    return records.Document(text=tags.serialize(nodes), source="ingested", doc_id=doc_id,
                            span_labels=() if mode == "doc" else (-1,))


def label_function(spec: str | Callable | None) -> Callable | None:
    """The labelling function a `--label_fn` spec names (`package.module:function`), a
    callable as is, or None; a spec that names no function is a one-line IngestError."""
    if spec is None or callable(spec):
        return spec
    module, _, name = str(spec).partition(":")
    if not module or not name or ":" in name:
        raise IngestError(f"--label_fn {spec}: write it as package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise IngestError(f"--label_fn {spec}: no module {e.name!r} (is its package "
                          "installed or on PYTHONPATH?)") from None
    except AttributeError:
        raise IngestError(f"--label_fn {spec}: module {module} has no {name!r}") from None
    except Exception as e:  # the module's own code failed while importing
        raise IngestError(f"--label_fn {spec}: importing {module} raised "
                          f"{_one_line(f'{type(e).__name__}: {e}')}") from None
    if not callable(fn):
        raise IngestError(f"--label_fn {spec}: {module}.{name} is a {type(fn).__name__}, "
                          "not a function")
    return fn


def _labelled(fn: Callable, text: str) -> tuple[str, str | None]:
    """(tagged text, problem or None) of `fn`'s nodes for a record's raw text; everything
    that can go wrong in user code is a problem naming it, never a traceback."""
    who = f"--label_fn {getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"
    try:
        nodes = fn(text)
    except Exception as e:
        return "", f"{who} raised {_one_line(f'{type(e).__name__}: {e}')}"
    problem = _nodes_problem(nodes)
    if problem:
        return "", f"{who} returned {problem}"
    tagged = tags.serialize(list(nodes))
    try:
        tags.parse(tagged)
    except tags.TagError as e:
        return "", f"{who} returned malformed tags at {e}"
    if not tagged.strip():
        return "", f"{who} returned an empty document"
    return tagged, _surrogate_problem(tagged)


def _nodes_problem(nodes) -> str | None:
    """What makes `nodes` something other than `tags.serialize`'s input, or None. Span
    modes are checked here because `serialize` writes them verbatim: a mode `ai><human`
    would be a tag injection."""
    if not isinstance(nodes, (list, tuple)):
        return f"a {type(nodes).__name__}, not a list of str and tags.Span"
    for node in nodes:
        if isinstance(node, tags.Span):
            if node.mode not in _SPAN_MODES:
                return f"a Span of mode {node.mode!r} (use {', '.join(_SPAN_MODES)})"
            problem = _nodes_problem(node.children)
            if problem:
                return problem
        elif not isinstance(node, (str, tags.Redacted)):
            return (f"a node of type {type(node).__name__} (nodes are str, tags.Span and "
                    "tags.REDACTED)")
    return None


def _surrogate_problem(text: str) -> str | None:
    """JSON may escape a lone surrogate (`"\\ud800"`); such a string cannot be written as
    UTF-8, so it is a bad record here rather than a crash in the shard writer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"'text' holds a lone surrogate (U+{ord(text[e.start]):04X} at character "
                f"{e.start}), which is not Unicode text")
    return None


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _source_name(path: str) -> str:
    """The source as named in doc ids: a file's base name, a TFDS source in full."""
    return path if path.startswith("tfds:") else os.path.basename(path)


def _raw_records(path: str, tagged: bool, label_fn=None) -> Iterator[Record]:
    """(record number, text, problem or None) of each record of a source; with `label_fn`
    the text is the labelled, tagged document."""
    fn = label_function(label_fn)
    if fn is not None and tagged:
        raise IngestError("--label_fn labels raw text; --tagged input is labelled already "
                          "(drop one of them)")
    if path.startswith("tfds:"):
        raw = _tfds_records(path)
    elif path.endswith(".parquet"):
        raw = _parquet_records(path)
    else:
        raw = _file_records(path, tagged)
    for number, text, problem in raw:
        if fn is not None and problem is None:
            text, problem = _labelled(fn, text)
        yield number, text, problem


def _read_bytes(path: str, flag: str) -> bytes:
    tf = tf_cpu.import_tf()
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.OpError as e:
        raise IngestError(f"{flag} {path}: cannot read it ({_one_line(e.message)})") from None


def _file_records(path: str, tagged: bool) -> Iterator[Record]:
    """Records of a JSONL (line numbers) or plain text file (first line of each)."""
    data = _read_bytes(path, "--from_text")
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


def _value_record(number: int, value: bytes | None, field: str) -> Record:
    """The record of one UTF-8 `text` value of a Parquet row or TFDS example."""
    if value is None:
        return number, "", f"{field!r} is null"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        return number, "", f"invalid UTF-8 at byte {e.start} of {field!r}"
    return (number, text, None) if text.strip() else (number, "", "empty text")


class _GFileReader(io.RawIOBase):
    """A `tf.io.gfile.GFile` as the seekable binary file pyarrow reads (GFile lacks
    `closed` and `readinto`)."""

    def __init__(self, gfile):
        super().__init__()
        self._f = gfile

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._f.seek(offset, whence)
        return self._f.tell()

    def tell(self) -> int:
        return self._f.tell()

    def close(self):
        self._f.close()
        super().close()


def _parquet_records(path: str) -> Iterator[Record]:
    """Records of a Parquet file's `text` column (row index + 1), a batch of rows at a time
    so that a large file never becomes python objects all at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tf = tf_cpu.import_tf()
    try:
        with _GFileReader(tf.io.gfile.GFile(path, "rb")) as f:
            parquet = pq.ParquetFile(f)
            schema = parquet.schema_arrow
            if "text" not in schema.names:
                raise IngestError(f"--from_text {path}: no column 'text' (its columns: "
                                  f"{', '.join(schema.names) or 'none'})")
            kind = schema.field("text").type
            if not any(is_kind(kind) for is_kind in (pa.types.is_string, pa.types.is_binary,
                                                     pa.types.is_large_string,
                                                     pa.types.is_large_binary)):
                raise IngestError(f"--from_text {path}: column 'text' holds {kind}, not "
                                  "strings")
            number = 0
            for batch in parquet.iter_batches(_PARQUET_BATCH_ROWS, columns=["text"]):
                for value in batch.column(0).cast(pa.large_binary()).to_pylist():
                    number += 1
                    yield _value_record(number, value, "text")
    except tf.errors.OpError as e:
        raise IngestError(f"--from_text {path}: cannot read it ({_one_line(e.message)})"
                          ) from None
    except pa.ArrowException as e:
        raise IngestError(f"--from_text {path}: not a readable Parquet file "
                          f"({_one_line(str(e))})") from None


def _tfds_records(source: str, data_dir: str | None = None) -> Iterator[Record]:
    """Records of a prepared TFDS split (example index + 1), read from `data_dir`, else
    $TFDS_DATA_DIR, else TFDS's default; never downloads."""
    match = _TFDS_SOURCE.fullmatch(source)
    if not match:
        raise IngestError(f"--from_text {source}: write a TFDS source as "
                          "tfds:NAME[/CONFIG][:VERSION]:SPLIT[#FEATURE]")
    name, version, split, feature = match.group("name", "version", "split", "feature")
    feature = feature or "text"
    tf = tf_cpu.import_tf()
    import tensorflow_datasets as tfds

    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
    not_prepared = (f"--from_text {source}: dataset {name} is not prepared in {data_dir}; "
                    f"run `tfds build {name} --data_dir={data_dir}` (or the builder's "
                    "download_and_prepare()) first, or set TFDS_DATA_DIR to where it is")
    try:
        builder = tfds.builder(f"{name}:{version}" if version else name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise IngestError(not_prepared) from None
    if not builder.is_prepared():
        raise IngestError(not_prepared)
    features = builder.info.features
    if feature not in features:
        raise IngestError(f"--from_text {source}: no feature {feature!r} (its features: "
                          f"{', '.join(sorted(features))}); name one as {source.split('#')[0]}"
                          "#FEATURE")
    if features[feature].tf_dtype != tf.string or features[feature].shape != ():
        raise IngestError(f"--from_text {source}: feature {feature!r} is not a string")
    try:
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except (ValueError, KeyError) as e:
        raise IngestError(f"--from_text {source}: split {split!r}: {_one_line(str(e))}"
                          ) from None
    texts = dataset.map(lambda example: example[feature])
    for number, value in enumerate(tfds.as_numpy(texts), start=1):
        yield _value_record(number, value, feature)
