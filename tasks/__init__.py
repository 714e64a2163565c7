"""seqio Tasks and the Mixture over a prepared data dir (`prealign prepare`).

    from prealign_jax import tasks
    mixture = tasks.register("/path/to/data")   # idempotent; returns the mixture name

This directory is the task module users edit, as T5X's; it is installed as
`prealign_jax.tasks` (setup.py maps it there, so it cannot collide with another project's
top-level `tasks`) and imported only at the edge — the CLI, a gin file, a notebook — never by
the library, whose trainer takes the registered Mixture's name (`seqio_data.mixture_or_task`).

One Task per record source present in the manifest (`<mixture>_synthetic_human`,
`<mixture>_synthetic_ai`, `<mixture>_synthetic_quote`, `<mixture>_ingested`) and the Mixture
`<mixture>` over them (default `prealign`; the experiment's baseline registers
`prealign_untagged` with `tag_dropout=1` over the same data, and each published baseline
its own Mixture with `view`, `data/baselines.py`). Each Task reads its shards
from the manifest's file list (a file-based source, so `seqio.ShardInfo` gives each host its
own files): token ids that `prealign prepare` wrote in seqio's cache layout, EOS included,
read without tokenizing again as a cached seqio Task reads its cache (bad-record policy for
records that cannot be read), as examples of up to `preprocessors.DOCS_PER_EXAMPLE`
documents (`targets`: [documents, tokens], which the converter packs); then it optionally
drops tags, or takes a baseline's view.
"""

from __future__ import annotations

import functools
from typing import Mapping

from prealign_jax import console, fileio, tf_cpu, vocab as vocab_lib
from prealign_jax.data import baselines, preprocessors, records, shards

tf = tf_cpu.import_tf()
import seqio  # noqa: E402  (after tf_cpu)

MIXTURE = "prealign"

_registered: dict[str, tuple] = {}  # mixture name -> the config it was registered with


def task_name(mixture: str, source: str) -> str:
    return f"{mixture}_{source}"


def register(data_dir: str, rates: Mapping[str, float] | None = None,
             bad_records: str = "error", tag_dropout: float = 0.0,
             shuffle_buffer_size: int = 1000, mixture: str = MIXTURE,
             view: str | None = None) -> str:
    """Register the Tasks and Mixture `mixture` of `data_dir`; returns the mixture name.

    Args:
      data_dir: a directory written by `prealign prepare` (a local path or a URL).
      rates: mixture rate per source (relative); sources not named default to their
        number of training documents in the manifest (those the view keeps, for
        'filtered'). Rate 0 leaves a source out.
      bad_records: 'error' (stop, naming shard and record) or 'skip' (drop and log).
      tag_dropout: fraction of documents whose tags are stripped (default 0).
      shuffle_buffer_size: per-Task shuffle buffer, in documents (shuffled in examples of
        `preprocessors.DOCS_PER_EXAMPLE`).
      mixture: the Mixture's name (and its Tasks' prefix).
      view: a published baseline's view of the documents (`baselines.VIEWS`: 'filtered',
        'metadata', 'safelm'; they strip the tags themselves), or None (as prepared).

    Registering again with the same arguments does nothing; with different ones (or another
    data dir) the old registrations are replaced, and the log says so.
    """
    if bad_records not in preprocessors.BAD_RECORD_POLICIES:
        raise shards.ShardError(f"register.bad_records={bad_records!r}; use one of "
                                f"{preprocessors.BAD_RECORD_POLICIES}")
    if not 0.0 <= tag_dropout <= 1.0:
        raise shards.ShardError(f"register.tag_dropout={tag_dropout} must be in [0, 1]")
    if view is not None and view not in baselines.VIEWS:
        raise shards.ShardError(f"register.view={view!r}; use one of {baselines.VIEWS} or None")
    if view is not None and tag_dropout:
        raise shards.ShardError(f"register.view={view!r} strips the tags itself; leave "
                                "register.tag_dropout at 0")
    data_dir = fileio.absolute(data_dir)
    manifest = shards.read_manifest(data_dir)
    key = (data_dir, manifest.get("config_hash"), tuple(sorted((rates or {}).items())),
           bad_records, tag_dropout, shuffle_buffer_size, view)
    if _registered.get(mixture) == key:
        return mixture
    problems = shards.check_shards(data_dir, manifest)
    if problems and bad_records == "error":
        raise shards.ShardError(f"{problems[0]}; rerun `prealign prepare` (or set "
                                "register.bad_records='skip' to read what is intact)")
    for p in problems:
        console.LOG.warning("prealign data: %s; reading the intact records (bad_records=skip)", p)

    unknown = set(rates or {}) - set(records.SOURCES)
    if unknown:
        raise shards.ShardError(f"register.rates names unknown sources {sorted(unknown)}; "
                                f"sources are {records.SOURCES}")
    if mixture in _registered:
        console.LOG.debug("prealign data: re-registering tasks for %s (configuration changed)",
                     data_dir)
    _unregister(mixture)
    vocab = vocab_lib.load_dir(data_dir)
    # An example holds up to `preprocessors.DOCS_PER_EXAMPLE` documents: `targets` is
    # [documents, tokens] (the converter packs the documents).
    output_features = {"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32,
                                                rank=2)}
    members = []
    for source in records.SOURCES:
        splits = {split: shards.shard_files(data_dir, manifest, source, split)
                  for split in ("train", "validation")}
        splits = {k: v for k, v in splits.items() if v}
        counts = {split: sum(s["records"] for s in manifest["shards"]
                             if s["source"] == source and s["split"] == split)
                  for split in splits}
        # The documents read: the filtered view's default rates are what it keeps, and a
        # split it empties is left out (named if asked for) rather than read forever.
        kept = ({split: baselines.kept_documents(files) for split, files in splits.items()}
                if view == "filtered" else counts)
        splits = {k: v for k, v in splits.items() if kept[k]}
        rate = (rates or {}).get(source, kept.get("train", 0))
        if not splits or not rate:
            continue
        seqio.TaskRegistry.add(
            task_name(mixture, source),
            source=seqio.FileDataSource(
                read_file_fn=functools.partial(preprocessors.read_records,
                                               bad_records=bad_records,
                                               num_records=shards.record_counts(data_dir,
                                                                                manifest)),
                split_to_filepattern=splits, block_length=1,
                num_input_examples={k: -(-counts[k] // preprocessors.BLOCK) for k in splits}),
            preprocessors=[
                functools.partial(preprocessors.examples, bad_records=bad_records),
                functools.partial(preprocessors.tag_dropout, rate=tag_dropout),
                *([functools.partial(baselines.view, name=view, source=source)]
                  if view else []),
            ],
            output_features=output_features,
            shuffle_buffer_size=-(-shuffle_buffer_size // preprocessors.DOCS_PER_EXAMPLE))
        members.append((task_name(mixture, source), float(rate)))
    if not members:
        raise shards.ShardError(f"{data_dir}: no source has shards and a non-zero rate "
                                f"(rates={dict(rates or {})})")
    seqio.MixtureRegistry.add(mixture, members)
    _registered[mixture] = key
    return mixture


def _unregister(mixture: str) -> None:
    if mixture in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(mixture)
    for source in records.SOURCES:
        if task_name(mixture, source) in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(task_name(mixture, source))
    _registered.pop(mixture, None)
