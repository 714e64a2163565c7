"""Reading shards, and seqio preprocessors of tagged documents: tokenize + validate, tag
dropout.

Validation runs on token ids in TF, batched, with the grammar's own tables (`fsm_tf`):
every tag is one token, so a document is well-formed exactly when the FSM over its token
classes never leaves the grammar and ends in a state where EOS is allowed. Bad records
(not a `tf.train.Example`, empty, invalid UTF-8, malformed tags) are handled by a policy:

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
from prealign_jax.data import fsm_tf

tf = tf_cpu.import_tf()
import seqio  # noqa: E402  (after tf_cpu)

BAD_RECORD_POLICIES = ("error", "skip")
# Marks our in-graph failures so `pipeline.DataIterator` can turn them into a UserError.
ERROR_MARKER = "prealign-data-error:"
_REASONS = ("ok", "not a tf.train.Example with a bytes feature `text`", "empty document",
            "invalid UTF-8", "malformed tags", "unclosed span")
BLOCK = 128  # records per source element
_TEXT = {"text": tf.io.FixedLenFeature([], tf.string, default_value="")}


def read_records(filename, bad_records: str, num_records: Mapping[str, int]):
    """A shard file as blocks of records {text[b], parsed[b], shard, record[b]} (`record` is
    the index in the file, `parsed` false where a record is not a `tf.train.Example`).

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
    end = tf.data.Dataset.from_tensors({"record": tf.zeros([0], tf.int64),
                                        "text": tf.zeros([0], tf.string),
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


def _parse_block(index, serialized):
    """The `text` of a block of records. One parse per block; only a block holding a record
    that cannot be parsed (which fails the whole parse) is parsed again record by record,
    to mark just that record. Each branch is a dataset so `ignore_errors` can catch a failed
    parse; `take(1)` never builds nor runs the record-by-record branch when the block parses.
    """
    def whole(i, s):
        return {"record": i, "parsed": tf.ones_like(i, tf.bool),
                "text": tf.io.parse_example(s, _TEXT)["text"]}

    def singly(i, s):
        none = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int64), tf.zeros([0], tf.string)))
        return (tf.data.Dataset.from_tensor_slices((i, s))
                .map(lambda i, s: (i, tf.io.parse_single_example(s, _TEXT)["text"]))
                .ignore_errors().batch(BLOCK).concatenate(none).take(1).map(fill))

    def fill(got, text):
        at = tf.cast(got - index[0], tf.int32)[:, None]
        return {"record": index, "parsed": tf.scatter_nd(at, tf.ones_like(got, tf.bool),
                                                         tf.shape(index)),
                "text": tf.tensor_scatter_nd_update(tf.fill(tf.shape(index), ""), at, text)}

    block = tf.data.Dataset.from_tensors((index, serialized))
    return block.map(whole).ignore_errors().concatenate(block.flat_map(singly)).take(1)


def tokenize_and_validate(dataset, output_features, bad_records: str = "error",
                          policy: modes.Policy | str = modes.GRAMMAR):
    """Parse, tokenize into `targets` + EOS, and apply the bad-record policy.

    Takes the record blocks of `read_records` (one op per block, not per record) and yields
    single examples holding only `targets` (int32 token ids ending in EOS).
    """
    if bad_records not in BAD_RECORD_POLICIES:
        raise ValueError(f"bad_records={bad_records!r}; use one of {BAD_RECORD_POLICIES}")
    vocab = output_features["targets"].vocabulary
    tables = modes.get_policy(policy).compile()
    table = modes.transition_table(tables)
    invalid = tables.num_states
    token_class = tf.constant(vocab_lib.token_classes(vocab))
    can_end = tf.constant(table[:, modes.EOS_CLASS] != invalid)
    class_names = tf.constant(modes.CLASSES)
    state_names = tf.constant(list(tables.states) + ["<invalid>"])
    reasons = tf.constant(_REASONS)

    eos = tf.constant([[vocab.eos_id]], tf.int32)

    def check(ex):
        text = ex["text"]
        tokens = tf.cast(vocab.encode_tf(text), tf.int32)
        classes = tf.gather(token_class, tokens)
        lengths = tf.cast(classes.row_lengths(), tf.int32)
        dense = classes.to_tensor(default_value=modes.PAD_CLASS)
        seg = tf.sequence_mask(lengths, tf.shape(dense)[1], tf.int32)
        read_in, final = fsm_tf.read_in_states(tables, dense, seg)
        after = tf.concat([read_in[:, 1:], final[:, None]], axis=1)
        bad_token = (after == invalid) & (seg == 1)
        first_bad = tf.cast(tf.argmax(tf.cast(bad_token, tf.int32), axis=1), tf.int32)
        reason = tf.where(
            ~ex["parsed"], 1,
            tf.where(tf.strings.length(text) == 0, 2,
                     tf.where(tf.strings.unicode_transcode(text, "UTF-8", "UTF-8",
                                                           errors="ignore") != text, 3,
                              tf.where(tf.reduce_any(bad_token, axis=1), 4,
                                       tf.where(tf.gather(can_end, final), 0, 5)))))
        rows = tf.range(tf.shape(dense)[0])
        bad_class = tf.gather_nd(dense, tf.stack([rows, first_bad], 1))
        bad_state = tf.gather_nd(read_in, tf.stack([rows, first_bad], 1))
        detail = tf.where(
            reason == 4,
            tf.strings.join(["token ", tf.strings.as_string(first_bad), " (",
                             tf.gather(class_names, bad_class), ") is not allowed in state ",
                             tf.gather(state_names, bad_state)]),
            tf.where(reason == 5, tf.strings.join(["the document ends in state ",
                                                   tf.gather(state_names, final)]), ""))
        message = tf.strings.join([
            "shard ", ex["shard"], " record ", tf.strings.as_string(ex["record"]), ": ",
            tf.gather(reasons, reason), tf.where(detail == "", "", ": "), detail])
        with_eos = tf.concat([tokens, tf.RaggedTensor.from_tensor(
            tf.tile(eos, [tf.shape(text)[0], 1]))], axis=1)
        if bad_records == "error":
            bad = reason != 0
            first = tf.gather(message, tf.argmax(tf.cast(bad, tf.int32)))
            with tf.control_dependencies([tf.debugging.Assert(
                    ~tf.reduce_any(bad), [ERROR_MARKER, first, "(bind tasks.register."
                                          "bad_records='skip' to drop and log such records)"])]):
                return {"targets": tf.identity(with_eos)}
        return {"targets": with_eos, "reason": reason, "message": message}

    ds = dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE)
    if bad_records == "error":
        return ds.unbatch()

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
        return logged, {"targets": tf.ragged.boolean_mask(batch["targets"], ~bad)}

    return ds.scan(tf.constant(0, tf.int64), count_and_log).unbatch()


def tag_dropout(dataset, output_features, rate: float):
    """Strip every tag from a `rate` fraction of documents (Korbak's drop_token_fraction).

    Untagged documents teach the model the unconditional distribution, so text can also be
    generated without a mode. Deterministic for a fixed seqio seed.
    """
    if rate <= 0:
        return dataset
    token_class = tf.constant(vocab_lib.token_classes(output_features["targets"].vocabulary))
    is_tag = tf.constant(np.isin(np.arange(modes.NUM_CLASSES),
                                 list(modes.TAG_CLASS.values())))

    @seqio.map_over_dataset(num_seeds=1)
    def drop(ex, seed):
        tokens = ex["targets"]
        keep = ~tf.gather(is_tag, tf.gather(token_class, tokens))
        dropped = tf.random.stateless_uniform([], seed=seed) < rate
        return {**ex, "targets": tf.cond(dropped, lambda: tf.boolean_mask(tokens, keep),
                                         lambda: tokens)}

    return drop(dataset)
