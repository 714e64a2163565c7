"""The Apache Beam pipeline of `prealign prepare` (seqio's own caching engine).

    units ─ Reshuffle ─ read ─ tokenize ─┬─ key by shard ─ GroupByKey ─ write shard ─┐
                                         ├─ corpus report (CombineGlobally)          ├─ parts/
                                         └─ bad records (count per source, reason)   ┘

- **units**: work items a worker reads alone, in a fixed order: a range of synthetic
  scenarios (or of an attack corpus's documents, `attacks.py`), one input (file or TFDS split), or a file of document records (what
  `prealign synthesize` writes). Reshuffle spreads them over workers.
- **read**: the generator renders its scenarios (the embedded default; its documents do not
  depend on how scenarios are grouped), ingest escapes and tags raw text, or validates
  tagged JSONL; a record that cannot be read is a `BadRecord`, never a silent drop.
- **tokenize**: token ids + EOS, checked by the grammar's FSM on token classes (the same
  tables the seqio Tasks and the decoder use), modes per token for the report.
- **write**: a document's shard is a hash of its id (deterministic whatever the runner's
  bundling); a shard's records are sorted by their place in the input, so a rerun writes
  the same bytes. Shards are TFRecords of `tf.train.Example`s in seqio's cache layout
  (`<source>/<split>.tfrecord-00000-of-00008`), holding `targets` (what the Tasks read,
  without tokenizing again) and the text and metadata (what tools read).

Everything a worker writes goes under the build directory, which no reader opens until the
driver commits the manifest (`prepare.py`). The same code runs on the DirectRunner here
and on Dataflow / Flink / Spark: paths are URLs through `tf.io.gfile`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from typing import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np

from prealign_jax import fileio, modes, vocab as vocab_lib
from prealign_jax.data import (attacks, generator, ingest, records, report as report_lib,
                               shards)
from prealign_jax.errors import UserError

SCENARIOS_PER_UNIT = 2000
PARTS = "parts"  # the pipeline's results for the driver, inside the build dir
FIRST_BAD = 5  # locations kept per (source, reason)
# Marks a bad record raised inside a worker under bad_records=error, so the driver can
# report it as one line whatever the runner wraps it in.
ERROR_MARKER = "prealign-bad-record:"


@dataclasses.dataclass(frozen=True)
class Sources:
    """What the pipeline reads (plain, picklable: it travels to the workers)."""
    num_scenarios: int
    seed: int
    mix: generator.Mix
    inputs: tuple[str, ...] = ()
    mode: str = "human"
    tagged: bool = False
    validation_fraction: float = 0.02
    label_fn: str | None = None  # `package.module:function` (see data/labelling.py)
    documents: tuple[str, ...] = ()  # JSONL of document records (`prealign synthesize`)
    attack: str | None = None  # render this attack corpus (`attacks.KINDS`) instead


def work_units(sources: Sources) -> list[tuple]:
    """The pipeline's units, in input order."""
    units: list[tuple] = [("synthetic", start, min(SCENARIOS_PER_UNIT,
                                                  sources.num_scenarios - start))
                          for start in range(0, sources.num_scenarios, SCENARIOS_PER_UNIT)]
    return (units + [("input", path) for path in sources.inputs]
            + [("documents", path) for path in sources.documents])


def read_unit(unit: tuple, sources: Sources) -> Iterator[tuple[records.Document, str]
                                                           | ingest.BadRecord]:
    """(document, split) of a unit, or a BadRecord, in order."""
    if unit[0] == "synthetic":
        docs = (attacks.generate(sources.attack, unit[2], sources.seed, unit[1])
                if sources.attack else generator.generate(unit[2], sources.seed, sources.mix,
                                                          unit[1]))
        for doc in docs:
            # both documents of a counterfactual pair land in the same split
            yield doc, split_of(doc.doc_id.rsplit("-", 1)[0], sources.validation_fraction)
        return
    if unit[0] == "documents":
        for item in ingest.read_records(unit[1]):
            if isinstance(item, ingest.BadRecord):
                yield item
            else:  # the documents of a scenario share their id up to the last "-"
                yield item, split_of(item.doc_id.rsplit("-", 1)[0],
                                     sources.validation_fraction)
        return
    for item in ingest.read_input(unit[1], sources.mode, sources.tagged, sources.label_fn):
        if isinstance(item, ingest.BadRecord):
            yield item
        else:
            yield item, split_of(item.doc_id, sources.validation_fraction)


def split_of(key: str, fraction: float) -> str:
    return "validation" if zlib.crc32(key.encode()) % 10_000 < fraction * 10_000 else "train"


class Tokenizer:
    """Token ids + EOS of a document, checked by the grammar; modes per token.

    Only tags and EOS change the FSM's state (text keeps it), so the walk visits those few
    tokens and the modes of the text between them follow by repetition: numpy per
    document, Python per tag.
    """

    def __init__(self, vocab_dir: str):
        self.vocab = vocab_lib.load_dir(vocab_dir)
        self.token_class = np.asarray(vocab_lib.token_classes(self.vocab))
        self.tables = modes.grammar_tables()
        self.table = modes.transition_table(self.tables)
        num = self.table.shape[0]
        self.active = (self.table.T != np.arange(num)).any(axis=1)  # per class
        self.state_mode = modes.mode_of_states(self.tables, np.arange(num))

    def __call__(self, doc: records.Document) -> tuple[np.ndarray, dict] | str:
        """(ids with EOS, counts) or the reason the document is bad."""
        ids = np.asarray(self.vocab.encode(doc.text) + [self.vocab.eos_id], np.int32)
        classes = self.token_class[ids]
        where = np.flatnonzero(self.active[classes])
        invalid = self.tables.num_states
        state, after = self.tables.initial, [self.tables.initial]
        for i in where:
            nxt = int(self.table[state, classes[i]])
            if nxt == invalid:
                if i == len(ids) - 1:
                    return (f"unclosed span: the document ends in state "
                            f"{self.tables.states[state]}")
                return (f"malformed tags: token {i} ({modes.CLASSES[classes[i]]}) is not "
                        f"allowed in state {self.tables.states[state]}")
            state = nxt
            after.append(state)
        # The state each token is read in: the state after the active tokens before it.
        before = np.zeros(len(ids) + 1, np.int64)
        before[where + 1] = 1
        read_in = np.asarray(after)[np.cumsum(before)[:-1]]
        text = classes == modes.TEXT
        mode_ids = self.state_mode[read_in[text]]
        counts = {f"tokens.{m}": int(n) for m, n in zip(
            modes.MODES, np.bincount(mode_ids, minlength=len(modes.MODES))) if n}
        counts["tokens.tags"] = int(len(where) - 1)  # EOS is active too
        counts["tokens"] = len(ids)
        return ids, counts


class _Tokenize:
    """The tokenize stage (a DoFn's body; see `build`). Its outputs are plain tuples, which
    Beam encodes without pickling: (shard key, (place in the input, example)); tagged
    `counts` per `<source>/<split>`, `stats` for the report, `bad`."""

    def __init__(self, vocab_dir: str, num_shards: dict, bad_records: str):
        self.vocab_dir, self.num_shards, self.bad_records = (vocab_dir, dict(num_shards),
                                                             bad_records)
        self._tokenizer = None

    def __call__(self, item):
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.vocab_dir)
        order, (doc, split) = item
        got = self._tokenizer(doc)
        if isinstance(got, str):
            bad = ingest.BadRecord(doc.source, doc.doc_id, got)
            yield beam.pvalue.TaggedOutput("bad", raise_or_pass(bad, self.bad_records))
            return
        ids, counts = got
        shard = zlib.crc32(doc.doc_id.encode()) % self.num_shards[split]
        yield (doc.source, split, shard), (order, records.to_example(doc, ids))
        yield beam.pvalue.TaggedOutput("counts", (f"{doc.source}/{split}",
                                                  {"documents": 1, **counts}))
        yield beam.pvalue.TaggedOutput("stats", report_lib.DocStats(
            doc.source, split, doc.situation, ids[:-1], {
                k.split(".", 1)[1]: v for k, v in counts.items() if "." in k}))


def runner_options(runner: str, direct_num_workers: int,
                   pipeline_options: Sequence[str]) -> list[str]:
    """The Beam options of a run; an unknown runner is a one-line error before any work."""
    from apache_beam.runners import runner as beam_runner

    if isinstance(direct_num_workers, bool) or not isinstance(direct_num_workers, int) \
            or direct_num_workers < 1:
        raise UserError(f"--direct_num_workers={direct_num_workers!r}: give a positive "
                        "number of worker processes")
    options = [f"--runner={runner}"]
    if runner == "DirectRunner":
        options += [f"--direct_num_workers={direct_num_workers}", "--direct_running_mode="
                    + ("multi_processing" if direct_num_workers > 1 else "in_memory")]
    options += pipeline_options  # last: they override the defaults above
    try:
        beam_runner.create_runner(runner)
    except (ValueError, ImportError) as e:
        raise UserError(f"--runner={runner}: {str(e).splitlines()[0][:200]}") from None
    return options


def worker_error(error: Exception) -> str | None:
    """The one-line message of a user error raised in a worker (marked with
    ERROR_MARKER and ending in a parenthesis), whatever the runner wrapped it in."""
    found = re.search(re.escape(ERROR_MARKER) + r"(.*?\))(?: \[while|\\n|\n|'|$)",
                      str(error))
    return found.group(1) if found else None


def raise_or_pass(bad: ingest.BadRecord, bad_records: str) -> ingest.BadRecord:
    if bad_records == "error":
        raise ingest.IngestError(ERROR_MARKER + bad.message())
    return bad


def shard_file(source: str, split: str, index: int, count: int) -> str:
    """seqio's cache layout: `<task>/<split>.tfrecord-00000-of-00008`."""
    return f"{source}/{split}.tfrecord-{index:05d}-of-{count:05d}"


def write_shard(build_dir: str, key: tuple, items: Sequence[tuple],
                num_shards: dict) -> dict:
    """Write one shard, its (place, example) items in input order; its manifest entry."""
    source, split, index = key
    name = shard_file(source, split, index, num_shards[split])
    path = os.path.join(build_dir, name)
    shards.write_records(path, [example for _, example in sorted(items)])
    return {"file": f"{os.path.basename(build_dir)}/{name}", "source": source,
            "split": split, "records": len(items), **shards.file_facts(path)}


def sum_counts(counts: Iterable[dict]) -> dict:
    total: dict = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


class _CountAndFirst(beam.CombineFn):
    """Bad records of one (source, reason): how many, and the first few locations (bounded
    whatever the count)."""

    def create_accumulator(self):
        return 0, []

    def add_input(self, acc, location):
        return acc[0] + 1, sorted(acc[1] + [location])[:FIRST_BAD]

    def merge_accumulators(self, accs):
        accs = list(accs)
        return (sum(a[0] for a in accs),
                sorted(loc for a in accs for loc in a[1])[:FIRST_BAD])

    def extract_output(self, acc):
        return {"count": acc[0], "first": acc[1]}


def _bad_summary(per_reason: Sequence[tuple]) -> dict:
    """{source: {reason: {count, first}}} from the combined ((source, reason), counts)."""
    out: dict = {}
    for (source, reason), entry in sorted(per_reason):
        out.setdefault(source, {})[reason] = entry
    return out


def write_json(path: str, obj) -> None:
    fileio.gfile().makedirs(os.path.dirname(path))
    with fileio.gfile().GFile(path, "w") as f:
        json.dump(obj, f, sort_keys=True)


def build(pipeline, sources: Sources, build_dir: str, num_shards: dict,
          bad_records: str) -> None:
    """Add the prepare stages to a `beam.Pipeline`; results land in `<build_dir>/parts`."""
    parts = os.path.join(build_dir, PARTS)
    units = list(enumerate(work_units(sources)))

    def read(indexed):
        index, unit = indexed
        for position, item in enumerate(read_unit(unit, sources)):
            if isinstance(item, ingest.BadRecord):
                yield beam.pvalue.TaggedOutput("bad", raise_or_pass(item, bad_records))
            else:
                yield (index, position), item

    read_out = (pipeline | "Units" >> beam.Create(units) | "Spread" >> beam.Reshuffle()
                | "Read" >> beam.FlatMap(read).with_outputs("bad", main="docs"))
    tokenized = (read_out.docs | "Tokenize" >> beam.FlatMap(
        _Tokenize(build_dir, num_shards, bad_records)).with_outputs(
            "bad", "counts", "stats", main="examples"))
    _ = (tokenized.examples
         | "GroupByShard" >> beam.GroupByKey()
         | "WriteShards" >> beam.MapTuple(
             lambda key, items: write_shard(build_dir, key, list(items), num_shards))
         | "ShardList" >> beam.combiners.ToList()
         | "WriteShardList" >> beam.Map(lambda e: write_json(
             os.path.join(parts, "shards.json"), sorted(e, key=lambda s: s["file"]))))
    _ = (tokenized.counts | "SumCounts" >> beam.CombinePerKey(sum_counts)
         | "CountList" >> beam.combiners.ToDict()
         | "WriteCounts" >> beam.Map(lambda c: write_json(os.path.join(parts, "counts.json"),
                                                          c)))
    _ = ((read_out.bad, tokenized.bad) | "AllBad" >> beam.Flatten()
         | "KeyByReason" >> beam.Map(lambda b: ((b.source, b.reason), b.location))
         | "CountBad" >> beam.CombinePerKey(_CountAndFirst())
         | "BadList" >> beam.combiners.ToList()
         | "WriteBad" >> beam.Map(lambda b: write_json(os.path.join(parts, "bad.json"),
                                                       _bad_summary(b))))
    _ = (tokenized.stats | "Report" >> beam.CombineGlobally(report_lib.CorpusReport())
         | "WriteReport" >> beam.Map(lambda r: write_json(os.path.join(parts, "report.json"),
                                                          r)))
