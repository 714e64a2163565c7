"""The seqio pipeline end to end: packing, atomic tags, per-mode loss weights, determinism,
resume, mixture rates, bad records and per-process shards."""

import collections
import os

import numpy as np
import pytest

from data_helpers import prepared_data_dir, write_data_dir
from prealign_jax import modes, tags, tf_cpu
from prealign_jax import vocab as vocab_lib
from prealign_jax.data import converter, pipeline, records, shards

tf = tf_cpu.import_tf()
import seqio  # noqa: E402
from prealign_jax import tasks  # noqa: E402

# Toy ids for the hand-made example: 0 pad, 1 eos, 2 unk, 3..9 tags, text from 10.
TAG = {t: 3 + i for i, t in enumerate(modes.TAGS)}
TOY_CLASSES = np.array([modes.PAD_CLASS, modes.EOS_CLASS, modes.TEXT]
                       + [modes.TAG_CLASS[t] for t in modes.TAGS] + [modes.TEXT] * 40, np.int32)


def _convert(docs, length, **weights):
    """The converter over the documents, given as one task example (a block of them)."""
    ds = tf.data.Dataset.from_tensors({"targets": tf.ragged.constant(docs, tf.int32)})
    conv = converter.ConditionalLMFeatureConverter(TOY_CLASSES, **weights)
    return [{k: v.numpy() for k, v in ex.items()}
            for ex in conv(ds, task_feature_lengths={"targets": length})]


def test_loss_weights_per_mode_hand_made():
    t = TAG
    doc1 = [t["<human>"], 10, 11, t["</human>"], 12, t["<ai>"], 13, t["<quote>"], 14,
            t["<redacted/>"], t["</quote>"], 15, t["</ai>"], 1]
    doc2 = [16, 1]
    (ex,) = _convert([doc1, doc2], 20, tag_weight=3.0,
                     mode_weights={"doc": 0.5, "human": 0.1, "ai": 2.0, "quote": 0.0})
    expected = [3, .1, .1, 3, .5, 3, 2, 3, 0, 3, 3, 2, 3, 3] + [.5, 3] + [0] * 4
    np.testing.assert_allclose(ex["decoder_loss_weights"], expected, rtol=1e-6)
    assert ex["decoder_loss_weights"].dtype == np.float32
    np.testing.assert_array_equal(ex["decoder_segment_ids"], [1] * 14 + [2] * 2 + [0] * 4)
    np.testing.assert_array_equal(ex["decoder_positions"], list(range(14)) + [0, 1] + [0] * 4)
    np.testing.assert_array_equal(ex["decoder_target_tokens"], doc1 + doc2 + [0] * 4)
    np.testing.assert_array_equal(ex["decoder_input_tokens"],
                                  [0] + doc1[:-1] + [0, 16] + [0] * 4)
    for k in ("decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids",
              "decoder_positions"):
        assert ex[k].dtype == np.int32


def test_tokens_after_a_grammar_violation_get_no_weight():
    (ex,) = _convert([[10, TAG["</ai>"], 11, 12, 1]], 8)
    np.testing.assert_allclose(ex["decoder_loss_weights"], [1, 1, 0, 0, 0, 0, 0, 0])


def _vocab(data_dir):
    return vocab_lib.load_dir(data_dir)


def _segments(batch):
    for row in range(batch["decoder_target_tokens"].shape[0]):
        seg = batch["decoder_segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            yield row, np.flatnonzero(seg == s)


def test_packed_batches_from_shards():
    data_dir = prepared_data_dir()
    vocab = _vocab(data_dir)
    manifest = shards.read_manifest(data_dir)
    corpus = {d.text for d in shards.iter_documents(
        os.path.join(data_dir, s["file"]) for s in manifest["shards"] if s["split"] == "train")}
    tag_ids = {i: t for t, i in vocab_lib.tag_ids(vocab).items()}
    tasks.register(data_dir)
    it = pipeline.DataIterator(pipeline.get_dataset("prealign", "train", 4, 512, seed=0))
    seen = 0
    for _ in range(3):
        batch = next(it)
        assert set(batch) == {"decoder_target_tokens", "decoder_input_tokens",
                              "decoder_segment_ids", "decoder_positions",
                              "decoder_loss_weights"}
        assert all(v.shape == (4, 512) for v in batch.values())
        for row, idx in _segments(batch):
            assert idx[-1] - idx[0] + 1 == len(idx)  # one contiguous run per document
            np.testing.assert_array_equal(batch["decoder_positions"][row, idx],
                                          np.arange(len(idx)))
            ids = batch["decoder_target_tokens"][row, idx]
            inputs = batch["decoder_input_tokens"][row, idx]
            assert inputs[0] == 0 and (inputs[1:] == ids[:-1]).all()
            if ids[-1] != vocab_lib.EOS_ID:
                assert len(idx) == 512  # only a trimmed document lacks its EOS
                continue
            assert (ids[:-1] != vocab_lib.EOS_ID).all()
            text = vocab.decode(ids[:-1].tolist())
            assert text in corpus  # exactly one whole document: nothing of another
            n_tags = sum(is_tag for _, _, is_tag in tags.pieces(text))
            assert sum(int(i) in tag_ids for i in ids) == n_tags  # every tag one token
            seen += 1
        pad = batch["decoder_segment_ids"] == 0
        assert (batch["decoder_target_tokens"][pad] == 0).all()
        assert (batch["decoder_loss_weights"][pad] == 0).all()
    assert seen > 8


def test_loss_weights_agree_with_modes_run_numpy():
    data_dir = prepared_data_dir()
    classes_of = vocab_lib.token_classes(_vocab(data_dir))
    weights = {"doc": 0.25, "human": 0.5, "ai": 2.0, "quote": 4.0}
    tasks.register(data_dir)
    ds = pipeline.get_dataset("prealign", "train", 16, 128, seed=3, mode_weights=weights,
                              tag_weight=8.0)
    batch = next(pipeline.DataIterator(ds))
    classes = classes_of[batch["decoder_target_tokens"]]
    mode_ids, _, _ = modes.run_numpy(modes.GRAMMAR.compile(), classes,
                                     batch["decoder_segment_ids"])
    by_mode = np.array([weights[m] for m in modes.MODES])
    text_weight = by_mode[np.maximum(mode_ids, 0)]
    expected = np.where(classes == modes.TEXT, text_weight, 8.0)
    expected = np.where(batch["decoder_segment_ids"] == 0, 0.0, expected)
    assert (mode_ids[batch["decoder_segment_ids"] > 0] >= 0).all()
    np.testing.assert_allclose(batch["decoder_loss_weights"], expected)
    assert {0.25, 0.5, 2.0, 8.0} <= set(np.unique(batch["decoder_loss_weights"]))


def test_deterministic_and_resumable(tmp_path):
    data_dir = prepared_data_dir()

    tasks.register(data_dir)

    def batches(seed, n, it=None):
        it = it or pipeline.DataIterator(pipeline.get_dataset("prealign", "train", 2, 64,
                                                              seed=seed))
        return it, [next(it)["decoder_target_tokens"] for _ in range(n)]

    _, a = batches(0, 4)
    it, b = batches(0, 2)
    np.testing.assert_array_equal(np.stack(a[:2]), np.stack(b))
    _, c = batches(1, 2)
    assert not np.array_equal(np.stack(a[:2]), np.stack(c))
    prefix = it.save(str(tmp_path / "iterator"))
    _, after = batches(0, 2, it)
    fresh, _ = batches(0, 0)
    fresh.restore(prefix)
    _, resumed = batches(0, 2, fresh)
    np.testing.assert_array_equal(np.stack(after), np.stack(resumed))
    np.testing.assert_array_equal(np.stack(a[2:]), np.stack(after))


@pytest.fixture()
def toy_dir(tmp_path, spm_vocab):
    def make(docs_by_source, num_shards=1):
        data_dir = str(tmp_path / f"toy{len(os.listdir(tmp_path))}")
        write_data_dir(data_dir, docs_by_source, spm_vocab.sentencepiece_model_file,
                       num_shards)
        return data_dir
    return make


def _first_tags(it, n_batches, vocab):
    ids = {i: t for t, i in vocab_lib.tag_ids(vocab).items()}
    counts = collections.Counter()
    for _ in range(n_batches):
        batch = next(it)
        for row, idx in _segments(batch):
            counts[ids.get(int(batch["decoder_target_tokens"][row, idx[0]]))] += 1
    return counts


def test_mixture_rates(toy_dir, spm_vocab):
    data_dir = toy_dir({"synthetic_human": [f"<human>h {i}</human>" for i in range(50)],
                        "synthetic_ai": [f"<ai>a {i}</ai>" for i in range(50)],
                        "synthetic_quote": [f"<ai><quote>q {i}</quote></ai>" for i in range(5)]})
    tasks.register(data_dir, rates={"synthetic_human": 1, "synthetic_ai": 3,
                                    "synthetic_quote": 0})
    it = pipeline.DataIterator(pipeline.get_dataset("prealign", "train", 8, 64, seed=0))
    counts = _first_tags(it, 40, spm_vocab)
    total = sum(counts.values())
    assert set(counts) == {"<human>", "<ai>"} and total > 1000
    assert abs(counts["<ai>"] / total - 0.75) < 0.04
    # registering again with the same arguments is harmless; other rates replace it
    assert tasks.register(data_dir, rates={"synthetic_human": 1, "synthetic_ai": 3,
                                           "synthetic_quote": 0}) == tasks.MIXTURE
    tasks.register(data_dir, rates={"synthetic_human": 1, "synthetic_ai": 0})
    assert seqio.get_mixture_or_task("prealign").total_rate == pytest.approx(6.0)


def test_tag_dropout_strips_tags_of_a_fraction(toy_dir, spm_vocab):
    data_dir = toy_dir({"synthetic_human": [f"<human>h {i}</human>" for i in range(200)]})
    tasks.register(data_dir, tag_dropout=0.5)
    assert pipeline.tag_dropout_rate(pipeline.registered("prealign")) == 0.5  # for run.json
    it = pipeline.DataIterator(pipeline.get_dataset("prealign", "train", 8, 64, seed=0))
    counts = _first_tags(it, 10, spm_vocab)
    untagged = counts[None] / sum(counts.values())
    assert 0.35 < untagged < 0.65
    tasks.register(data_dir, tag_dropout=0.0)


def _corrupt(data_dir, records_bytes):
    """Replace the one train shard of synthetic_human by raw records; fix the manifest."""
    manifest = shards.read_manifest(data_dir)
    entry = next(s for s in manifest["shards"]
                 if s["source"] == "synthetic_human" and s["split"] == "train")
    path = os.path.join(data_dir, entry["file"])
    shards.write_records(path, records_bytes)
    entry.update(records=len(records_bytes), **shards.file_facts(path))
    manifest["config_hash"] += "-corrupted"
    shards.write_manifest(data_dir, {k: v for k, v in manifest.items() if k != "format"})
    return path


def test_bad_records_error_and_skip(toy_dir, spm_vocab, capfd):
    data_dir = toy_dir({"synthetic_human": ["<human>x</human>"]})

    def example(text, targets):
        return records.to_example(records.Document(text, "synthetic_human", "d"), targets)

    good = [example(t, spm_vocab.encode(t) + [1])
            for t in ("<human>good one</human>", "<human>good two</human>")]
    text_only = tf.train.Example(features=tf.train.Features(feature={"text": tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[b"<human>x</human>"]))})).SerializeToString()
    path = _corrupt(data_dir, [good[0], b"\xff\xfe not an Example", text_only,
                               example("<human>empty</human>", []), good[1]])
    tasks.register(data_dir, bad_records="error")
    it = pipeline.DataIterator(pipeline.get_dataset("prealign_synthetic_human", "train", 1,
                                                    32, seed=0, num_epochs=1, shuffle=False))
    with pytest.raises(pipeline.DataError) as e:
        next(it)
    assert str(e.value) == (
        f"shard {path} record 1: not a tf.train.Example with an int64 feature `targets`; "
        "rerun `prealign prepare` (or bind tasks.register.bad_records='skip' to drop and log "
        "such records)")

    tasks.register(data_dir, bad_records="skip")
    ds = pipeline.get_dataset("prealign_synthetic_human", "train", 1, 32, seed=0,
                              num_epochs=1, shuffle=False)
    it = pipeline.DataIterator(ds)
    segments = [row for batch in it for row in [batch["decoder_target_tokens"][0]]]
    assert len(segments) == 1  # both good documents packed into one row
    err = capfd.readouterr().err
    for i, why in [(1, "not a tf.train.Example with an int64 feature `targets`"),
                   (2, "no tokens (`targets` is empty)"),
                   (3, "no tokens (`targets` is empty)")]:
        assert f"shard {path} record {i}: {why}" in err
    assert "skipped so far: 3" in err
    tasks.register(data_dir)


def test_truncated_shard(toy_dir):
    data_dir = toy_dir({"synthetic_human": [f"<human>doc {i}</human>" for i in range(6)]})
    manifest = shards.read_manifest(data_dir)
    path = os.path.join(data_dir, next(s["file"] for s in manifest["shards"]
                                       if s["split"] == "train"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)
    with pytest.raises(shards.ShardError, match=f"shard {path} .*record 5 is truncated"):
        tasks.register(data_dir)
    tasks.register(data_dir, bad_records="skip")
    it = pipeline.DataIterator(pipeline.get_dataset("prealign_synthetic_human", "train", 1,
                                                    256, seed=0, num_epochs=1, shuffle=False))
    (batch,) = list(it)
    assert batch["decoder_segment_ids"].max() == 5  # the five intact records


def test_each_process_reads_its_own_files(toy_dir, spm_vocab):
    docs = [f"<human>doc {i}</human>" for i in range(12)]
    data_dir = toy_dir({"synthetic_human": docs}, num_shards=2)
    tasks.register(data_dir)
    seen = []
    for index in range(2):
        ds = pipeline.get_dataset("prealign_synthetic_human", "train", 1, 256, seed=0,
                                  num_epochs=1, shuffle=False,
                                  shard_info=seqio.ShardInfo(index, 2))
        texts = set()
        for batch in pipeline.DataIterator(ds):
            for row, idx in _segments(batch):
                texts.add(spm_vocab.decode(batch["decoder_target_tokens"][row, idx[:-1]]
                                           .tolist()))
        seen.append(texts)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(docs)


def test_split_without_documents_is_a_user_error(tmp_path, spm_vocab):
    from prealign_jax.errors import UserError

    data_dir = str(tmp_path / "train_only")
    write_data_dir(data_dir, {"ingested": ["<human>a</human>"],
                              "synthetic_human": ["<human>c</human>"]},
                   spm_vocab.sentencepiece_model_file)
    manifest = shards.read_manifest(data_dir)
    manifest["shards"] = [s for s in manifest["shards"]
                          if (s["source"], s["split"]) != ("ingested", "validation")]
    shards.write_manifest(data_dir, {k: v for k, v in manifest.items() if k != "format"})
    with pytest.raises(UserError, match="split 'validation' has no documents of "
                                        "prealign_ingested"):
        tasks.register(data_dir)
        pipeline.get_dataset("prealign", "validation", 1, 32, seed=0)


def test_packing_matches_seqio_trim_and_pack():
    """The vectorised packer gives seqio's rows: next-fit over windows of `length` examples,
    each trimmed to `length`; an empty example takes no segment id."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, size=rng.integers(0, 90)).astype(np.int32)
            for _ in range(300)] + [np.arange(1, 150, dtype=np.int32)] * 3
    rng.shuffle(docs)

    def ds():
        return tf.data.Dataset.from_generator(
            lambda: ({"targets": d} for d in docs),
            output_signature={"targets": tf.TensorSpec([None], tf.int32)})

    ours = list(ds().ragged_batch(64).map(lambda w: converter.pack_window(w, 64)).unbatch()
                .as_numpy_iterator())
    theirs = list(seqio.utils.trim_and_pack_dataset(ds(), {"targets": 64})
                  .as_numpy_iterator())
    assert len(ours) == len(theirs) > 100
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for k in b:
            np.testing.assert_array_equal(a[k], b[k])


def test_interleave_takes_one_document_of_every_block_in_turn():
    blocks = tf.ragged.constant([[[1], [2], [3]], [[10]], [[20], [21]]], tf.int32)
    got = converter.interleave(blocks).to_list()
    assert got == [[1], [10], [20], [2], [21], [3]]
