"""One corpus record: a tagged document and its metadata, as a `tf.train.Example`.

Every producer (generator, ingest) emits `Document`s; `prealign prepare` stores each with
its token ids (`targets`, EOS included: what the seqio Tasks read, as from a seqio cache)
next to the text and metadata (what tools and evaluation read). `span_labels` holds, for every span of the
document in pre-order (`tags.Span` tree order), 1 if the span's content is selfish /
misaligned, 0 if not, -1 if unknown (ingested text).
"""

from __future__ import annotations

import dataclasses
import json

from prealign_jax import tf_cpu

# The source of a record names its seqio Task (see tasks/).
SOURCES = ("synthetic_human", "synthetic_ai", "synthetic_quote", "ingested")


@dataclasses.dataclass(frozen=True)
class Document:
    text: str  # tagged text, untrusted parts escaped
    source: str  # one of SOURCES
    doc_id: str
    pair_id: int = -1  # scenario shared by a counterfactual human/ai pair, else -1
    span_labels: tuple[int, ...] = ()
    situation: str = ""  # the synthetic scenario's situation family ('' if unknown)
    provenance: str = ""  # JSON: who wrote it (teacher model, task id, scenario, seed, time)


def to_example(doc: Document, targets=()) -> bytes:
    """Serialized `tf.train.Example` of a document and its token ids."""
    tf = tf_cpu.import_tf()
    f = tf.train.Feature

    def b(value: bytes):
        return f(bytes_list=tf.train.BytesList(value=[value]))

    def i(values):
        return f(int64_list=tf.train.Int64List(value=list(values)))

    return tf.train.Example(features=tf.train.Features(feature={
        "text": b(doc.text.encode("utf-8")), "source": b(doc.source.encode()),
        "doc_id": b(doc.doc_id.encode()), "pair_id": i([doc.pair_id]),
        "span_labels": i(doc.span_labels), "situation": b(doc.situation.encode()),
        "provenance": b(doc.provenance.encode()),
        "targets": i(targets)})).SerializeToString(deterministic=True)


def from_example(serialized: bytes) -> Document:
    """Inverse of `to_example`, in Python (tools and tests; the pipeline parses in TF)."""
    tf = tf_cpu.import_tf()
    ex = tf.train.Example.FromString(serialized).features.feature
    return Document(text=ex["text"].bytes_list.value[0].decode("utf-8"),
                    source=ex["source"].bytes_list.value[0].decode(),
                    doc_id=ex["doc_id"].bytes_list.value[0].decode(),
                    pair_id=int(ex["pair_id"].int64_list.value[0]),
                    span_labels=tuple(ex["span_labels"].int64_list.value),
                    situation=b"".join(ex["situation"].bytes_list.value).decode(),
                    provenance=b"".join(ex["provenance"].bytes_list.value).decode())


def to_json(doc: Document) -> str:
    """One JSONL line of a document (`prealign synthesize`'s corpus files)."""
    return json.dumps(dataclasses.asdict(doc), ensure_ascii=False, sort_keys=True)


def from_json(line: str | bytes) -> Document:
    """Inverse of `to_json`; a line that is not one raises ValueError."""
    obj = json.loads(line)
    if not isinstance(obj, dict) or set(obj) != {f.name for f in dataclasses.fields(Document)}:
        raise ValueError("not a document record (fields: "
                         f"{', '.join(f.name for f in dataclasses.fields(Document))})")
    return Document(**{**obj, "span_labels": tuple(obj["span_labels"])})
