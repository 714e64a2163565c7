"""Shards, manifest and `prealign prepare`: atomic writes, counts, truncation, idempotency,
determinism."""

import json
import os

import pytest

from data_helpers import SMALL, prepared_data_dir
from prealign_jax import tags
from prealign_jax.data import prepare, records, shards


def _doc(i, source="synthetic_human"):
    return records.Document(tags.serialize([tags.Span("human", (f"text {i}",))]), source,
                            f"d{i}", span_labels=(0,))


def test_writer_round_robin_counts_and_manifest(tmp_path):
    with shards.ShardWriter(str(tmp_path), {"train": 3, "validation": 1}) as w:
        for i in range(10):
            w.write(_doc(i), "validation" if i == 0 else "train")
        written = w.close()
    shards.write_manifest(str(tmp_path), written)
    manifest = shards.read_manifest(str(tmp_path))
    counts = {s["file"]: s["records"] for s in manifest["shards"]}
    assert counts == {"synthetic_human/train-00000-of-00003.tfrecord": 3,
                      "synthetic_human/train-00001-of-00003.tfrecord": 3,
                      "synthetic_human/train-00002-of-00003.tfrecord": 3,
                      "synthetic_human/validation-00000-of-00001.tfrecord": 1}
    c = manifest["counts"]["synthetic_human/train"]
    assert c["documents"] == 9 and c["tokens.tags"] == 18
    assert c["chars.human"] == sum(len(f"text {i}") for i in range(1, 10))
    files = shards.shard_files(str(tmp_path), manifest, "synthetic_human", "train")
    assert [d.doc_id for d in shards.iter_documents(files)] == [
        "d1", "d4", "d7", "d2", "d5", "d8", "d3", "d6", "d9"]
    assert shards.check_shards(str(tmp_path), manifest, checksums=True) == []


def test_crash_leaves_no_complete_looking_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(str(tmp_path), {"train": 2, "validation": 1}) as w:
            w.write(_doc(0), "train")
            raise RuntimeError("crash while writing")
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs]
    assert leftovers == []
    # before close(), shards exist only under temporary names
    w = shards.ShardWriter(str(tmp_path), {"train": 1, "validation": 1})
    w.write(_doc(0), "train")
    names = os.listdir(tmp_path / "synthetic_human")
    assert names and all(".tmp-" in n for n in names)
    w.abort()


def test_truncation_is_found_with_the_record_index(tmp_path):
    with shards.ShardWriter(str(tmp_path), {"train": 1, "validation": 1}) as w:
        for i in range(5):
            w.write(_doc(i), "train")
        manifest = w.close()
    path = tmp_path / "synthetic_human/train-00000-of-00001.tfrecord"
    data = path.read_bytes()
    assert shards.complete_records(str(path)) == (5, False)
    path.write_bytes(data[:-7])
    assert shards.complete_records(str(path)) == (4, True)
    (problem,) = shards.check_shards(str(tmp_path), manifest)
    assert str(path) in problem and "record 4 is truncated" in problem


def test_prepare_corpus_counts_vocab_and_tags(tmp_path):
    data_dir = prepared_data_dir()
    manifest = shards.read_manifest(data_dir)
    totals = manifest["totals"]
    assert totals["train"]["documents"] > 400 and totals["validation"]["documents"] > 10
    for mode in ("doc", "human", "ai", "quote"):
        assert totals["train"][f"tokens.{mode}"] > 0
    # per-run token counts add up to whole-document tokenization (tags split the input)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(data_dir, "vocab.model"))
    files = [os.path.join(data_dir, s["file"]) for s in manifest["shards"]
             if s["split"] == "validation"]
    docs = list(shards.iter_documents(files))
    counted = sum(sum(v for k, v in shards.mode_counts(d.text, sp).items()
                      if k.startswith("tokens.")) for d in docs)
    assert counted == sum(len(sp.encode(d.text)) for d in docs)
    assert manifest["counts"].keys() >= {"synthetic_human/train", "synthetic_ai/train",
                                         "synthetic_quote/train"}


def test_prepare_is_idempotent_and_deterministic(tmp_path, caplog):
    caplog.set_level("INFO")
    config = dict(SMALL, num_scenarios=60, vocab_size=400)
    a = prepare.prepare(data_dir=str(tmp_path / "a"), **config)
    first = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "building" in caplog.text and "no manifest yet" in caplog.text
    caplog.clear()
    prepare.prepare(data_dir=a, **config)
    assert "reusing" in caplog.text
    # same config elsewhere: byte-identical shards and vocabulary
    prepare.prepare(data_dir=str(tmp_path / "b"), **config)
    second = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert first["shards"] == second["shards"] and first["vocab"] == second["vocab"]
    caplog.clear()
    prepare.prepare(data_dir=a, **dict(config, seed=1))
    assert "building" in caplog.text and "changed" in caplog.text
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]["seed"] == 1
    # a damaged shard is rebuilt, not reused
    shard = os.path.join(a, first["shards"][0]["file"])
    with open(shard, "ab") as f:
        f.write(b"x")
    caplog.clear()
    prepare.prepare(data_dir=a, **dict(config, seed=1))
    assert "building" in caplog.text
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]


def test_validation_split_keeps_pairs_together():
    data_dir = prepared_data_dir()
    manifest = shards.read_manifest(data_dir)
    split_of = {}
    for s in manifest["shards"]:
        for d in shards.iter_documents([os.path.join(data_dir, s["file"])]):
            if d.pair_id >= 0:
                split_of.setdefault(d.pair_id, set()).add(s["split"])
    assert split_of and all(len(v) == 1 for v in split_of.values())
