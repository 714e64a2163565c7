"""Reading pre-tokenized shards into seqio examples (token ids and span labels), and tag
dropout.

`prealign prepare` tokenized and validated every document (the grammar's FSM on token
classes); the Tasks read `targets` as a cached seqio Task does, without tokenizing again.
A record that cannot be read (not a `tf.train.Example` with int64 `targets`, or empty)
follows the bad-record policy:

- `error`: the pipeline stops with a `DataError` naming the shard file and record index;
- `skip`: the record is dropped and a line naming it (with the running count of skipped
  records) is logged to stderr.

A corrupt record ends its shard for TFRecordDataset; the records lost that way are counted
against the manifest and follow the same policy (see `read_records`).
"""

from __future__ import annotations

import sys
from typing import Mapping

import numpy as np

from prealign_jax import modes, tf_cpu, vocab as vocab_lib

tf = tf_cpu.import_tf()
import seqio  # noqa: E402  (after tf_cpu)

BAD_RECORD_POLICIES = ("error", "skip")
# Marks our in-graph failures so `pipeline.DataIterator` can turn them into a UserError.
ERROR_MARKER = "prealign-data-error:"
_REASONS = ("ok", "not a tf.train.Example with an int64 feature `targets`",
            "no tokens (`targets` is empty)")
BLOCK = 128  # records read and parsed per op
# Documents per seqio example. A tf.data element costs tens of microseconds at every stage
# (Task shuffle and trim, the Mixture's sampling), which capped a document-per-example
# pipeline near 1M tokens/s here; 16 documents per example amortise that, and stay fine
# enough for the Mixture's rates and for mixing sources within a batch.
DOCS_PER_EXAMPLE = 16
# What the Tasks read of a record: its token ids, and its spans' labels (`records.Document`),
# which the baselines' views (`baselines.view`) read.
_FEATURES = {name: tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64)
             for name in ("targets", "span_labels")}


def read_records(filename, bad_records: str, num_records: Mapping[str, int]):
    """A shard file as blocks of records {targets[b, None], span_labels[b, None], parsed[b],
    shard, record[b]}
    (`record` is the index in the file, `parsed` false where a record cannot be parsed).

    Blocks, not single records, keep tf.data's per-element overhead off the hot path.
    TFRecordDataset cannot read past a corrupt record, so the records read are counted
    against the manifest's `num_records` (path -> count) at the end of the file: a shortfall
    stops the pipeline (`error`) or is logged with the counts (`skip`).
    """
    expected = tf.reduce_sum(tf.where(tf.equal(tf.constant(list(num_records)), filename),
                                      tf.constant(list(num_records.values()), tf.int64), 0))
    blocks = (tf.data.TFRecordDataset(filename).ignore_errors()  # ends at a corrupt record
              .enumerate().batch(BLOCK).flat_map(_parse_block)
              .map(lambda block: {**block, "end": False}))
    end = tf.data.Dataset.from_tensors({
        "record": tf.zeros([0], tf.int64), **_no_rows(),
        "parsed": tf.zeros([0], tf.bool), "end": True})

    def count(read, block):
        read += tf.size(block["record"], out_type=tf.int64)
        short = block["end"] & (read < expected)
        what = tf.strings.join([
            "shard ", filename, ": read ", tf.strings.as_string(read), " of its ",
            tf.strings.as_string(expected), " records (manifest.json): record ",
            tf.strings.as_string(read), " is missing or corrupt and the reader cannot go "
            "past it; "])
        if bad_records == "error":
            with tf.control_dependencies([tf.debugging.Assert(~short, [
                    ERROR_MARKER, tf.strings.join([
                        what, "rerun `prealign prepare` (or bind tasks.register.bad_records="
                        "'skip' to train on the records before it)"])])]):
                read = tf.identity(read)
        else:
            def log():
                tf.print("prealign data:", tf.strings.join([
                    what, "skipped ", tf.strings.as_string(expected - read), " records; "
                    "rerun `prealign prepare` to read them"]), output_stream=sys.stderr)
                return read

            read = tf.cond(short, log, lambda: read)
        return read, {**block, "shard": filename}

    return (blocks.concatenate(end).scan(tf.constant(0, tf.int64), count)
            .filter(lambda block: ~block["end"]))


def _no_rows() -> dict:
    """Every feature of `_FEATURES` with no rows."""
    return {name: tf.RaggedTensor.from_row_lengths(tf.zeros([0], tf.int64),
                                                   tf.zeros([0], tf.int64))
            for name in _FEATURES}


def _parse_block(index, serialized):
    """The features of a block of records. One parse per block; only a block holding a
    record that cannot be parsed (which fails the whole parse) is parsed again record by
    record, to mark just that record. Each branch is a dataset so `ignore_errors` can catch
    a failed parse; `take(1)` never builds nor runs the record-by-record branch when the
    block parses.
    """
    def whole(i, s):
        return {"record": i, "parsed": tf.ones_like(i, tf.bool),
                **tf.io.parse_example(s, _FEATURES)}

    def singly(i, s):
        none = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int64), _no_rows()))
        return (tf.data.Dataset.from_tensor_slices((i, s))
                .map(lambda i, s: (i, tf.io.parse_single_example(s, _FEATURES)))
                .ignore_errors().ragged_batch(BLOCK).concatenate(none).take(1).map(fill))

    def fill(got, features):
        # Rows of the records that parsed, in order; the others are empty and unparsed.
        at = tf.cast(got - index[0], tf.int32)[:, None]

        def rows(ragged):
            lengths = tf.scatter_nd(at, ragged.row_lengths(), tf.shape(index))
            return tf.RaggedTensor.from_row_lengths(ragged.flat_values, lengths)

        return {"record": index, "parsed": tf.scatter_nd(at, tf.ones_like(got, tf.bool),
                                                         tf.shape(index)),
                **{name: rows(ragged) for name, ragged in features.items()}}

    block = tf.data.Dataset.from_tensors((index, serialized))
    return block.map(whole).ignore_errors().concatenate(block.flat_map(singly)).take(1)


def examples(dataset, output_features, bad_records: str = "error"):
    """Examples `{targets: int32[docs, None], span_labels: int64[docs, None]}` of up to
    `DOCS_PER_EXAMPLE` documents (EOS included) from `read_records`' blocks, with the
    bad-record policy applied to records that could not be read."""
    del output_features  # the shards hold the Task's vocabulary's ids (the manifest's)
    if bad_records not in BAD_RECORD_POLICIES:
        raise ValueError(f"bad_records={bad_records!r}; use one of {BAD_RECORD_POLICIES}")
    reasons = tf.constant(_REASONS)

    def check(block):
        reason = tf.where(~block["parsed"], 1,
                          tf.where(block["targets"].row_lengths() == 0, 2, 0))
        message = tf.strings.join(["shard ", block["shard"], " record ",
                                   tf.strings.as_string(block["record"]), ": ",
                                   tf.gather(reasons, reason)])
        targets = tf.cast(block["targets"], tf.int32)
        labels = block["span_labels"]
        if bad_records == "error":
            bad = reason != 0
            first = tf.gather(message, tf.argmax(tf.cast(bad, tf.int32)))
            with tf.control_dependencies([tf.debugging.Assert(~tf.reduce_any(bad), [
                    ERROR_MARKER, tf.strings.join([
                        first, "; rerun `prealign prepare` (or bind tasks.register."
                        "bad_records='skip' to drop and log such records)"])])]):
                return {"targets": tf.identity(targets), "span_labels": labels}
        return {"targets": targets, "span_labels": labels, "reason": reason,
                "message": message}

    ds = dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE)
    if bad_records == "error":
        return _split_blocks(ds)

    def count_and_log(skipped, batch):
        bad = batch["reason"] != 0
        skipped += tf.reduce_sum(tf.cast(bad, tf.int64))

        def log():
            tf.print("prealign data: skipped",
                     tf.strings.reduce_join(tf.boolean_mask(batch["message"], bad),
                                            separator="; skipped "),
                     "| skipped so far:", skipped, output_stream=sys.stderr)
            return skipped

        logged = tf.cond(tf.reduce_any(bad), log, lambda: skipped)
        return logged, {k: tf.ragged.boolean_mask(batch[k], ~bad) for k in _FEATURES}

    return _split_blocks(ds.scan(tf.constant(0, tf.int64), count_and_log))


def _split_blocks(ds):
    """Blocks of documents cut into examples of `DOCS_PER_EXAMPLE`, in order."""
    def split(block):
        starts = tf.range(0, block["targets"].nrows(), DOCS_PER_EXAMPLE)
        return tf.data.Dataset.from_tensor_slices(starts).map(
            lambda i: {k: block[k][i:i + DOCS_PER_EXAMPLE] for k in _FEATURES})

    return ds.flat_map(split)


def tag_dropout(dataset, output_features, rate: float):
    """Strip every tag from a `rate` fraction of documents (Korbak's drop_token_fraction),
    drawn per document.

    Untagged documents teach the model the unconditional distribution, so text can also be
    generated without a mode. Deterministic for a fixed seqio seed.
    """
    if rate <= 0:
        return dataset
    token_class = vocab_lib.token_classes(output_features["targets"].vocabulary)

    @seqio.map_over_dataset(num_seeds=1)
    def drop(ex, seed):
        tokens = ex["targets"]  # [docs, None]
        dropped = tf.random.stateless_uniform([tokens.nrows()], seed=seed) < rate
        return {**ex, "targets": tf.ragged.boolean_mask(
            tokens, ~(is_tag(tokens, token_class) & dropped[:, None]))}

    return drop(dataset)


def is_tag(tokens, token_class: np.ndarray):
    """bool, shaped as `tokens` (ragged or not): which ids are tags (`token_class`: the
    vocabulary's `vocab.token_classes`)."""
    tag = tf.constant(np.isin(token_class, list(modes.TAG_CLASS.values())))
    return tf.ragged.map_flat_values(lambda t: tf.gather(tag, t), tokens)
