"""`prealign prepare`: generate and/or ingest the corpus, train the vocabulary, write shards.

Idempotent: the manifest records a hash of everything that determines the output (this
configuration, the input files' contents, the generator's code). Same hash and intact
shards: the data dir is reused. Otherwise it is rebuilt in a staging directory and swapped
in when complete; the log says which and why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import zlib
from typing import Iterator, Mapping, Sequence

from prealign_jax import console, vocab as vocab_lib
from prealign_jax.data import generator, ingest, records, shards
from prealign_jax.errors import UserError

SPLITS = ("train", "validation")
_CODE = ("generator.py", "scenarios.py", "ingest.py", "records.py", "shards.py")

@dataclasses.dataclass(frozen=True)
class Config:
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


def prepare(workdir: str | None = None, data_dir: str | None = None,
            num_scenarios: int = 20_000, seed: int = 0, vocab_size: int = 2048,
            vocab_documents: int = 20_000, num_shards: Mapping[str, int] | None = None,
            validation_fraction: float = 0.02, mix: generator.Mix | None = None,
            from_text: Sequence[str] = (), mode: str = "human", tagged: bool = False,
            bad_records: str = "error", tokenizer_file: str | None = None) -> str:
    """Build (or reuse) the data dir; returns its path.

    Args:
      workdir: run directory; the data dir defaults to `<workdir>/data`.
      data_dir: explicit data dir (overrides workdir).
      num_scenarios: synthetic scenarios to render (a counterfactual pair gives two docs).
      seed: generator seed.
      vocab_size: SentencePiece vocabulary size.
      vocab_documents: documents (the first ones) the vocabulary is trained on.
      num_shards: shards per split and source, default {'train': 8, 'validation': 1}.
      validation_fraction: fraction of scenarios (and ingested documents) held out.
      mix: `generator.Mix` of renderings.
      from_text, mode, tagged, bad_records: raw-text ingest (see `ingest.py`).
      tokenizer_file: an imported tokenizer (`prealign import` writes <data dir>/
        tokenizer.json) used instead of training SentencePiece (vocab_size is then unused).
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
    data_dir = os.path.abspath(data_dir)
    imported = os.path.join(data_dir, vocab_lib.TOKENIZER_FILE)
    if tokenizer_file is None and os.path.exists(imported):
        raise UserError(f"{data_dir} holds an imported tokenizer; prepare with it: "
                        f"--tokenizer={imported}")
    if tokenizer_file is not None and not os.path.isfile(tokenizer_file):
        raise UserError(f"--tokenizer={tokenizer_file}: no such file; `prealign import` "
                        "writes <data dir>/tokenizer.json")
    config = Config(num_scenarios, seed, vocab_size, vocab_documents, num_shards,
                    validation_fraction, mix or generator.Mix(), tuple(from_text), mode,
                    tagged, bad_records, tokenizer_file and os.path.abspath(tokenizer_file))
    digest = config_hash(config)
    reason = _reuse_problem(data_dir, digest)
    if reason is None:
        console.say(f"prepare: reusing {data_dir} (same configuration {digest[:12]}, "
                    "shards intact)")
        return data_dir
    console.say(f"prepare: building {data_dir} ({reason})")
    _build(data_dir, config, digest)
    return data_dir


def config_hash(config: Config) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True,
                                  default=str).encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _CODE:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    for path in config.from_text + ((config.tokenizer_file,) if config.tokenizer_file else ()):
        if not os.path.isfile(path):
            raise ingest.IngestError(f"--from_text {path}: no such file")
        h.update(shards.sha256(path).encode())
    return h.hexdigest()


def _reuse_problem(data_dir: str, digest: str) -> str | None:
    if not os.path.exists(os.path.join(data_dir, shards.MANIFEST)):
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
    if not any(os.path.exists(os.path.join(data_dir, name))
               for name in (vocab_lib.VOCAB_FILE, vocab_lib.TOKENIZER_FILE)):
        return "vocabulary missing"
    return None


def documents(config: Config) -> Iterator[tuple[records.Document, str]]:
    """Every (document, split) of the corpus, in a fixed order."""
    for doc in generator.generate(config.num_scenarios, config.seed, config.mix):
        # both documents of a counterfactual pair land in the same split
        yield doc, _split(doc.doc_id.rsplit("-", 1)[0], config.validation_fraction)
    if config.from_text:
        for doc in ingest.read_documents(config.from_text, config.mode, config.tagged,
                                         config.bad_records):
            yield doc, _split(doc.doc_id, config.validation_fraction)


def _split(key: str, fraction: float) -> str:
    return "validation" if zlib.crc32(key.encode()) % 10_000 < fraction * 10_000 else "train"


def _build(data_dir: str, config: Config, digest: str) -> None:
    import sentencepiece as spm
    from tqdm import tqdm

    parent = os.path.dirname(data_dir)
    os.makedirs(parent, exist_ok=True)
    staging = f"{data_dir}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        if config.tokenizer_file:  # an imported tokenizer: checked by loading it
            vocab_path = os.path.join(staging, vocab_lib.TOKENIZER_FILE)
            shutil.copyfile(config.tokenizer_file, vocab_path)
            sp = vocab_lib.load_dir(staging)
        else:
            # A list, not a generator: a bad input record raises here, as its one-line
            # error, not from inside SentencePiece's trainer (which would wrap it).
            texts = [doc.text for doc, _ in itertools.islice(documents(config),
                                                             config.vocab_documents)]
            if not texts:
                files = " ".join(config.from_text) or "(none)"
                raise UserError(f"no documents to prepare: prepare.num_scenarios="
                                f"{config.num_scenarios} and --from_text {files} holds no "
                                "usable records; give text with documents or num_scenarios > 0")
            console.say(f"prepare: training a {config.vocab_size}-piece vocabulary")
            vocab_path = vocab_lib.train(texts, os.path.join(staging, vocab_lib.VOCAB_FILE),
                                         config.vocab_size)
            sp = spm.SentencePieceProcessor(model_file=vocab_path)
        with shards.ShardWriter(staging, config.num_shards, sp) as writer:
            for doc, split in tqdm(documents(config), desc="prepare: writing shards",
                                   unit=" docs", mininterval=2.0):
                writer.write(doc, split)
            written = writer.close()
        shards.write_manifest(staging, {
            "config": dataclasses.asdict(config), "config_hash": digest,
            "vocab": {"file": os.path.basename(vocab_path),
                      "sha256": shards.sha256(vocab_path),
                      "size": sp.vocab_size if config.tokenizer_file else config.vocab_size},
            "totals": _totals(written["counts"]), **written})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = f"{data_dir}.old-{os.getpid()}"
    if os.path.exists(data_dir):
        os.replace(data_dir, old)
    os.replace(staging, data_dir)
    shutil.rmtree(old, ignore_errors=True)
    manifest = shards.read_manifest(data_dir)
    console.say(f"prepare: wrote {data_dir}: {json.dumps(manifest['totals'])}")


def _totals(counts: Mapping[str, Mapping[str, int]]) -> dict:
    """Counts summed over sources, per split."""
    totals: dict[str, dict[str, int]] = {}
    for key, c in counts.items():
        split = key.split("/")[1]
        for k, v in c.items():
            totals.setdefault(split, {}).setdefault(k, 0)
            totals[split][k] += v
    return totals
