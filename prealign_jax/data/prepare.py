"""`prealign prepare`: the corpus as pre-tokenized shards, by an Apache Beam pipeline.

The driver (this module) checks the configuration, trains the vocabulary on a bounded
sample of the documents, runs the pipeline (`beam_pipeline.py`: DirectRunner here,
Dataflow / Flink / Spark at scale) into a fresh build directory, and commits the build by
writing `manifest.json` last (counts, checksums, bad records, the corpus report, the
config and its hash). Idempotent: same hash and intact shards, the data dir is reused;
otherwise it is rebuilt, and the log says which and why. Every path may be a URL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import time
from typing import Iterator, Mapping, Sequence

from prealign_jax import console, fileio, tf_cpu, vocab as vocab_lib
from prealign_jax.data import attacks, generator, ingest, records, shards
from prealign_jax.errors import UserError

SPLITS = ("train", "validation")
# Files whose content determines the corpus (hashed with the config): code and the scenario spec
_CODE = ("beam_pipeline.py", "generator.py", "attacks.py", "scenarios.py", "scenarios.yaml",
         "ingest.py", "records.py", "shards.py")
RUNNERS_HELP = ("DirectRunner (default) runs here; DataflowRunner, FlinkRunner, SparkRunner "
                "take their own pipeline options (see the README)")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines the corpus (hashed). How it runs (the runner) does not."""
    num_scenarios: int
    seed: int
    vocab_size: int
    vocab_documents: int
    num_shards: Mapping[str, int]
    validation_fraction: float
    mix: generator.Mix
    from_text: tuple[str, ...]
    mode: str
    tagged: bool
    bad_records: str
    tokenizer_file: str | None = None
    label_fn: str | None = None
    documents: tuple[str, ...] = ()
    attack: str | None = None

    def sources(self):
        """What the pipeline reads (`beam_pipeline.Sources`)."""
        from prealign_jax.data import beam_pipeline

        return beam_pipeline.Sources(self.num_scenarios, self.seed, self.mix, self.from_text,
                                     self.mode, self.tagged, self.validation_fraction,
                                     self.label_fn, self.documents, self.attack)


def prepare(workdir: str | None = None, data_dir: str | None = None,
            num_scenarios: int = 20_000, seed: int = 0, vocab_size: int = 2048,
            vocab_documents: int = 20_000, num_shards: Mapping[str, int] | None = None,
            validation_fraction: float = 0.02, mix: generator.Mix | None = None,
            from_text: Sequence[str] = (), mode: str = "human", tagged: bool = False,
            bad_records: str = "error", tokenizer_file: str | None = None,
            label_fn: str | None = None, documents: Sequence[str] = (),
            attack: str | None = None, runner: str = "DirectRunner", direct_num_workers: int = 1,
            pipeline_options: Sequence[str] = ()) -> str:
    """Build (or reuse) the data dir; returns its path.

    Args:
      workdir: run directory; the data dir defaults to `<workdir>/data`.
      data_dir: explicit data dir (overrides workdir); a local path or a URL (gs://...).
      num_scenarios: synthetic scenarios to render (a counterfactual pair gives two docs).
      seed: generator seed.
      vocab_size: SentencePiece vocabulary size.
      vocab_documents: documents (the first ones) the vocabulary is trained on.
      num_shards: shards per split and source, default {'train': 8, 'validation': 1}.
      validation_fraction: fraction of scenarios (and ingested documents) held out.
      mix: `generator.Mix` of renderings.
      from_text, mode, tagged, bad_records, label_fn: raw-text ingest (see `ingest.py`):
        files or URLs (.txt, .jsonl, .parquet) and TFDS splits (tfds:NAME:SPLIT).
      documents: JSONL files of document records, kept as they are (what `prealign
        synthesize` writes: a teacher's documents with their provenance).
      tokenizer_file: the vocabulary to tokenize with instead of training SentencePiece
        (vocab_size is then unused): an imported tokenizer (`prealign import` writes <data
        dir>/tokenizer.json), or another data dir or its SentencePiece `.model` (data to
        fine-tune a run on, in the run's token ids: `prealign finetune`).
      attack: render a fine-tuning attack corpus (`attacks.KINDS`: 'benign' or
        'adversarial') instead of the training corpus; num_scenarios is then its number
        of documents (see `data/attacks.py`).
      runner: the Beam runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...).
      direct_num_workers: DirectRunner worker processes (more than 1: multi-processing).
      pipeline_options: further Beam pipeline options, e.g. ('--project=P',
        '--region=R', '--temp_location=gs://B/tmp') for Dataflow.
    """
    if data_dir is None:
        if workdir is None:
            raise UserError("prepare needs a data dir: pass --workdir (data goes to "
                            "<workdir>/data) or bind prepare.data_dir in gin")
        data_dir = os.path.join(workdir, "data")
    num_shards = dict(num_shards or {"train": 8, "validation": 1})
    if set(num_shards) != set(SPLITS) or min(num_shards.values()) < 1:
        raise UserError(f"prepare.num_shards={num_shards}: give a positive count for each "
                        f"of {SPLITS}")
    if tokenizer_file is None and (isinstance(vocab_documents, bool)
                                   or not isinstance(vocab_documents, int)
                                   or vocab_documents < 1):
        raise UserError(f"prepare.vocab_documents={vocab_documents!r}: the vocabulary is "
                        "trained on this many documents; give a positive count")
    if bad_records not in ("error", "skip"):
        raise UserError(f"--bad_records={bad_records}: use error or skip")
    data_dir = fileio.absolute(data_dir)
    try:
        fileio.gfile().exists(data_dir)
    except tf_cpu.import_tf().errors.OpError as e:  # an unknown scheme, no credentials
        raise UserError(f"data dir {data_dir}: {e.message.splitlines()[0]}; give a local "
                        "path or a URL TensorFlow's file systems reach (gs://...) with "
                        "credentials for it") from None
    imported = os.path.join(data_dir, vocab_lib.TOKENIZER_FILE)
    if tokenizer_file is None and fileio.gfile().exists(imported):
        raise UserError(f"{data_dir} holds an imported tokenizer; prepare with it: "
                        f"--tokenizer={imported}")
    if tokenizer_file is not None and not fileio.gfile().exists(tokenizer_file):
        raise UserError(f"--tokenizer={tokenizer_file}: no such file; `prealign import` "
                        "writes <data dir>/tokenizer.json")
    if tokenizer_file is not None and fileio.gfile().isdir(tokenizer_file):
        tokenizer_file = vocab_lib.find(tokenizer_file)  # a data dir: its vocabulary
    if attack is not None and attack not in attacks.KINDS:
        raise UserError(f"--attack={attack}: use one of {', '.join(attacks.KINDS)}")
    config = Config(num_scenarios, seed, vocab_size, vocab_documents, num_shards,
                    validation_fraction, mix or generator.Mix(),
                    tuple(fileio.absolute(p) if not p.startswith("tfds:") else p
                          for p in from_text),
                    mode, tagged, bad_records, tokenizer_file and fileio.absolute(tokenizer_file),
                    label_fn, tuple(fileio.absolute(p) for p in documents), attack)
    digest = config_hash(config)
    reason = _reuse_problem(data_dir, digest)
    if reason is None:
        console.say(f"prepare: reusing {data_dir} (same configuration {digest[:12]}, "
                    "shards intact)")
        return data_dir
    console.say(f"prepare: building {data_dir} ({reason})")
    from prealign_jax.data import beam_pipeline

    options = beam_pipeline.runner_options(runner, direct_num_workers, pipeline_options)
    _build(data_dir, config, digest, options)
    return data_dir


def config_hash(config: Config) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True,
                                  default=str).encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _CODE:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    if config.label_fn:  # its module's code, as the generator's
        h.update(inspect.getsource(inspect.getmodule(
            ingest.label_function(config.label_fn))).encode())
    for path in (config.from_text + config.documents
                 + ((config.tokenizer_file,) if config.tokenizer_file else ())):
        if path.startswith("tfds:"):
            continue  # a TFDS dataset is named by its version
        if not fileio.gfile().exists(path):
            flag = "--documents" if path in config.documents else "--from_text"
            raise ingest.IngestError(f"{flag} {path}: no such file")
        h.update(shards.file_facts(path)["sha256"].encode())
    return h.hexdigest()


def _reuse_problem(data_dir: str, digest: str) -> str | None:
    if not fileio.gfile().exists(os.path.join(data_dir, shards.MANIFEST)):
        return "no manifest yet"
    try:
        manifest = shards.read_manifest(data_dir)
    except shards.ShardError as e:
        return str(e)
    if manifest.get("config_hash") != digest:
        return "configuration, inputs or generator code changed"
    problems = shards.check_shards(data_dir, manifest, checksums=True)
    if problems:
        return problems[0]
    vocab = os.path.join(data_dir, manifest.get("vocab", {}).get("file", ""))
    if not manifest.get("vocab") or not fileio.gfile().exists(vocab):
        return "vocabulary missing"
    return None


def sample_documents(config: Config) -> Iterator[records.Document]:
    """The documents in input order, the bad-record policy applied (the vocabulary's
    sample, read by the driver before the pipeline runs)."""
    from prealign_jax.data import beam_pipeline

    sources = config.sources()
    for unit in beam_pipeline.work_units(sources):
        for item in beam_pipeline.read_unit(unit, sources):
            if isinstance(item, ingest.BadRecord):
                if config.bad_records == "error":
                    raise ingest.IngestError(item.message())
                continue
            yield item[0]


def _build(data_dir: str, config: Config, digest: str, options: list[str]) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from prealign_jax.data import beam_pipeline, report

    gfile = fileio.gfile()
    # Read before anything is written: a bad record in the sample leaves no trace.
    texts = None if config.tokenizer_file else _vocabulary_sample(config)
    build = f"build-{digest[:12]}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    build_dir = os.path.join(data_dir, build)
    created = not gfile.exists(data_dir)
    gfile.makedirs(build_dir)
    try:
        vocab_path = _vocabulary(config, texts, build_dir)
        sp = vocab_lib.load_dir(build_dir)
        console.say(f"prepare: running the Beam pipeline ({' '.join(options)})")
        start = time.perf_counter()
        try:
            with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
                beam_pipeline.build(pipeline, config.sources(), build_dir,
                                    config.num_shards, config.bad_records)
        except Exception as e:  # a runner wraps a worker's error in its own
            found = beam_pipeline.worker_error(e)
            if found:
                raise ingest.IngestError(found) from None
            if str(e).startswith("Pipeline has validations errors"):
                missing = "; ".join(line.strip() for line in str(e).splitlines()[1:]
                                    if line.strip())
                raise UserError(f"--runner={options[0].split('=', 1)[1]}: {missing}; pass "
                                "them after `--` (see the README's Data section)") from None
            raise
        seconds = time.perf_counter() - start
        parts = os.path.join(build_dir, beam_pipeline.PARTS)
        entries = _read_json(os.path.join(parts, "shards.json"))
        bad = _read_json(os.path.join(parts, "bad.json"))
        corpus = _read_json(os.path.join(parts, "report.json"))
        counts = {k: dict(sorted(v.items())) for k, v in sorted(
            _read_json(os.path.join(parts, "counts.json")).items())}
        gfile.rmtree(parts)
        entries = _complete_shard_sets(build_dir, entries, config.num_shards)
        if not counts:
            raise UserError("no documents to prepare: every record was bad (see the log); "
                            "fix the inputs or pass other --from_text files")
        _write_seqio_files(build_dir, entries, counts)
        documents = sum(c["documents"] for c in counts.values())
        manifest = {
            "config": dataclasses.asdict(config), "config_hash": digest, "build": build,
            "vocab": {"file": f"{build}/{os.path.basename(vocab_path)}",
                      "sha256": shards.file_facts(vocab_path)["sha256"],
                      "size": sp.vocab_size},
            "shards": entries,
            "counts": counts, "totals": _totals(counts), "bad_records": bad,
            "report": corpus,
            "pipeline": {"options": options, "seconds": round(seconds, 3),
                         "documents_per_s": round(documents / seconds, 1)}}
        shards.write_manifest(data_dir, manifest)
    except BaseException:
        gfile.rmtree(data_dir if created else build_dir)
        raise
    _remove_old_builds(data_dir, build)
    console.say(f"prepare: wrote {data_dir} in {seconds:.1f}s "
                f"({documents / seconds:.0f} documents/s): {json.dumps(manifest['totals'])}")
    for source, reasons in bad.items():
        for reason, entry in reasons.items():
            console.say(f"prepare: skipped {entry['count']} bad records of {source}: "
                        f"{reason} (first: {', '.join(entry['first'])})")
    console.say(report.format_report(corpus))


def _vocabulary_sample(config: Config) -> list[str]:
    """The first `vocab_documents` documents' texts. A list, not a generator: a bad input
    record raises here, as its one-line error, not from inside SentencePiece's trainer
    (which would wrap it)."""
    texts = [doc.text for doc in itertools.islice(sample_documents(config),
                                                  config.vocab_documents)]
    if not texts:
        files = " ".join(config.from_text + config.documents) or "(none)"
        raise UserError(f"no documents to prepare: prepare.num_scenarios="
                        f"{config.num_scenarios} and the inputs {files} hold no "
                        "usable records; give inputs with documents or num_scenarios > 0")
    return texts


def _vocabulary(config: Config, texts: list[str] | None, build_dir: str) -> str:
    """The build's vocabulary file: the imported tokenizer, or SentencePiece trained on the
    sample."""
    if config.tokenizer_file:
        path = os.path.join(build_dir, vocab_lib.TOKENIZER_FILE
                            if config.tokenizer_file.endswith(".json") else vocab_lib.VOCAB_FILE)
        fileio.gfile().copy(config.tokenizer_file, path)
        return path
    console.say(f"prepare: training a {config.vocab_size}-piece vocabulary on "
                f"{len(texts)} documents")
    return vocab_lib.train(texts, os.path.join(build_dir, vocab_lib.VOCAB_FILE),
                           config.vocab_size)


def _read_json(path: str):
    with fileio.gfile().GFile(path) as f:
        return json.load(f)


def _complete_shard_sets(build_dir: str, entries: list[dict],
                         num_shards: Mapping[str, int]) -> list[dict]:
    """Every shard of each (source, split) that has documents: a shard no document hashed
    to is written empty, so the set matches its `-of-N` names (seqio's layout)."""
    from prealign_jax.data import beam_pipeline

    present = {(e["source"], e["split"]) for e in entries}
    have = {e["file"] for e in entries}
    build = os.path.basename(build_dir)
    for source, split in sorted(present):
        n = num_shards[split]
        for i in range(n):
            name = beam_pipeline.shard_file(source, split, i, n)
            if f"{build}/{name}" not in have:
                path = os.path.join(build_dir, name)
                shards.write_records(path, [])
                entries.append({"file": f"{build}/{name}", "source": source, "split": split,
                                "records": 0, **shards.file_facts(path)})
    return sorted(entries, key=lambda e: e["file"])


def _write_seqio_files(build_dir: str, entries: list[dict], counts: dict) -> None:
    """seqio's cache files next to each source's shards: `info.<split>.json` (features and
    shard count), `stats.<split>.json` (examples and tokens) and `COMPLETED`."""
    from prealign_jax.data import beam_pipeline

    import seqio

    features = {"targets": {"shape": [None], "dtype": "int32"},
                **{k: {"shape": [], "dtype": "string"}
                   for k in ("text", "source", "doc_id", "situation", "provenance")},
                "pair_id": {"shape": [], "dtype": "int64"},
                "span_labels": {"shape": [None], "dtype": "int64"}}
    for key, c in counts.items():
        source, split = key.split("/")
        num = sum(1 for e in entries if e["source"] == source and e["split"] == split)
        beam_pipeline.write_json(os.path.join(build_dir, source, f"info.{split}.json"), {
            "num_shards": num, "features": features, "seqio_version": seqio.__version__})
        beam_pipeline.write_json(os.path.join(build_dir, source, f"stats.{split}.json"), {
            "examples": c["documents"], "targets_tokens": c.get("tokens", 0)})
    for source in {k.split("/")[0] for k in counts}:
        with fileio.gfile().GFile(os.path.join(build_dir, source, "COMPLETED"), "w") as f:
            f.write("")


def _remove_old_builds(data_dir: str, keep: str) -> None:
    """Earlier builds (and the flat layout of format 1), now that no manifest names them."""
    gfile = fileio.gfile()
    for name in gfile.listdir(data_dir):
        name = name.rstrip("/")
        path = os.path.join(data_dir, name)
        if (name.startswith("build-") and name != keep) or name in records.SOURCES:
            gfile.rmtree(path)
        elif name == vocab_lib.VOCAB_FILE:
            gfile.remove(path)


def _totals(counts: Mapping[str, Mapping[str, int]]) -> dict:
    """Counts summed over sources, per split."""
    totals: dict[str, dict[str, int]] = {}
    for key, c in counts.items():
        split = key.split("/")[1]
        for k, v in c.items():
            totals.setdefault(split, {}).setdefault(k, 0)
            totals[split][k] += v
    return totals
