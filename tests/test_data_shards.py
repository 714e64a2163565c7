"""`prealign prepare` (the Beam pipeline), its shards and manifest: seqio's cache layout,
counts, truncation, idempotency, determinism across workers, atomic commits."""

import json
import os

import numpy as np
import pytest

from data_helpers import SMALL, prepared_data_dir
from prealign_jax import modes, tags, tf_cpu
from prealign_jax import vocab as vocab_lib
from prealign_jax.data import beam_pipeline, ingest, prepare, records, shards

tf = tf_cpu.import_tf()


def _targets(path):
    """(document, targets) of every record of a shard."""
    for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
        ex = tf.train.Example.FromString(raw).features.feature
        yield records.from_example(raw), list(ex["targets"].int64_list.value)


def _vocab(data_dir, manifest):
    return vocab_lib.load(os.path.join(data_dir, manifest["vocab"]["file"]))


def test_prepare_writes_tokenized_shards_in_seqio_cache_layout():
    data_dir = prepared_data_dir()
    manifest = shards.read_manifest(data_dir)
    build = manifest["build"]
    assert sorted(os.listdir(data_dir)) == sorted([build, shards.MANIFEST])
    assert manifest["vocab"]["file"] == f"{build}/{vocab_lib.VOCAB_FILE}"
    vocab = _vocab(data_dir, manifest)
    for source in ("synthetic_human", "synthetic_ai", "synthetic_quote"):
        for split, n in SMALL["num_shards"].items():
            entries = [s for s in manifest["shards"]
                       if s["source"] == source and s["split"] == split]
            assert [s["file"] for s in entries] == [
                f"{build}/{source}/{split}.tfrecord-{i:05d}-of-{n:05d}" for i in range(n)]
            info = json.loads(open(os.path.join(data_dir, build, source,
                                                f"info.{split}.json")).read())
            assert info["num_shards"] == n and info["features"]["targets"] == {
                "shape": [None], "dtype": "int32"}
            stats = json.loads(open(os.path.join(data_dir, build, source,
                                                 f"stats.{split}.json")).read())
            assert stats["examples"] == sum(s["records"] for s in entries)
            tokens = 0
            for s in entries:
                got = list(_targets(os.path.join(data_dir, s["file"])))
                assert len(got) == s["records"]
                for doc, ids in got:
                    assert doc.source == source and ids[-1] == vocab.eos_id
                    assert vocab.decode(ids[:-1]) == doc.text  # the text, tokenized once
                    tokens += len(ids)
            assert stats["targets_tokens"] == tokens
        assert os.path.exists(os.path.join(data_dir, build, source, "COMPLETED"))


def test_counts_per_mode_agree_with_the_grammar():
    data_dir = prepared_data_dir()
    manifest = shards.read_manifest(data_dir)
    token_class = vocab_lib.token_classes(_vocab(data_dir, manifest))
    tables = modes.grammar_tables()
    counted = {}
    for s in manifest["shards"]:
        if s["split"] != "validation":
            continue
        for _, ids in _targets(os.path.join(data_dir, s["file"])):
            classes = token_class[np.asarray(ids)]
            mode_ids, _, _ = modes.run_numpy(tables, classes[None])
            for m in mode_ids[0][classes == modes.TEXT]:
                counted[f"tokens.{modes.MODES[m]}"] = counted.get(f"tokens.{modes.MODES[m]}",
                                                                  0) + 1
            counted["tokens.tags"] = counted.get("tokens.tags", 0) + int(
                ((classes != modes.TEXT) & (classes != modes.EOS_CLASS)).sum())
    totals = manifest["totals"]["validation"]
    assert {k: totals[k] for k in counted} == counted
    assert manifest["report"]["splits"]["validation"]["documents"] == totals["documents"]
    assert totals["tokens"] == totals["documents"] + sum(counted.values())  # + EOS each


def test_truncation_is_found_with_the_record_index(tmp_path):
    doc = records.Document(tags.serialize([tags.Span("human", ("text",))]),
                           "synthetic_human", "d")
    path = str(tmp_path / "s.tfrecord")
    shards.write_records(path, [records.to_example(doc, [5, 6, 1])] * 5)
    manifest = {"shards": [{"file": "s.tfrecord", "source": "synthetic_human",
                            "split": "train", "records": 5, **shards.file_facts(path)}]}
    data = open(path, "rb").read()
    assert shards.complete_records(path) == (5, False)
    open(path, "wb").write(data[:-7])
    assert shards.complete_records(path) == (4, True)
    (problem,) = shards.check_shards(str(tmp_path), manifest)
    assert path in problem and "record 4 is truncated" in problem


def test_prepare_is_idempotent_and_deterministic(tmp_path, caplog):
    caplog.set_level("INFO")
    config = dict(SMALL, num_scenarios=60, vocab_size=400)
    a = prepare.prepare(data_dir=str(tmp_path / "a"), **config)
    first = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "building" in caplog.text and "no manifest yet" in caplog.text
    caplog.clear()
    prepare.prepare(data_dir=a, **config)
    assert "reusing" in caplog.text
    # same config elsewhere, with two worker processes: byte-identical shards and vocabulary

    def content(m):
        return sorted((s["file"].split("/", 1)[1], s["records"], s["sha256"])
                      for s in m["shards"])

    prepare.prepare(data_dir=str(tmp_path / "b"), direct_num_workers=2, **config)
    second = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert content(first) == content(second)
    assert first["vocab"]["sha256"] == second["vocab"]["sha256"]
    assert first["report"] == second["report"]
    caplog.clear()
    prepare.prepare(data_dir=a, **dict(config, seed=1))
    assert "building" in caplog.text and "changed" in caplog.text
    rebuilt = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert rebuilt["config"]["seed"] == 1
    assert sorted(os.listdir(a)) == sorted([rebuilt["build"], shards.MANIFEST])
    # a damaged shard is rebuilt, not reused
    shard = os.path.join(a, rebuilt["shards"][0]["file"])
    with open(shard, "ab") as f:
        f.write(b"x")
    caplog.clear()
    prepare.prepare(data_dir=a, **dict(config, seed=1))
    assert "building" in caplog.text
    assert shards.check_shards(a, shards.read_manifest(a), checksums=True) == []


def test_a_failed_build_leaves_the_committed_data_dir_as_it_was(tmp_path):
    """The manifest is the commit point: a pipeline that stops (here at a bad record under
    bad_records=error, met by a worker after the vocabulary's sample) removes its build
    and the previous corpus stays readable."""
    config = dict(SMALL, num_scenarios=30, vocab_size=400, vocab_documents=5)
    data_dir = prepare.prepare(data_dir=str(tmp_path / "d"), **config)
    before = (tmp_path / "d" / "manifest.json").read_text()
    text = tmp_path / "in.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(9))
                    + '{"text": 3}\n')
    with pytest.raises(ingest.IngestError, match=rf"^{text}:10: no string field 'text' "
                       r"\(pass --bad_records=skip to drop such records\)$"):
        prepare.prepare(data_dir=data_dir, from_text=[str(text)], **config)
    assert (tmp_path / "d" / "manifest.json").read_text() == before
    manifest = shards.read_manifest(data_dir)
    assert sorted(os.listdir(data_dir)) == sorted([manifest["build"], shards.MANIFEST])
    assert shards.check_shards(data_dir, manifest, checksums=True) == []


def test_bad_records_are_counted_per_source_and_reason(tmp_path):
    text = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": f"line {i}"}) for i in range(20)]
    lines[3], lines[11], lines[12] = "not json", '{"text": ""}', '{"txt": "x"}'
    text.write_text("\n".join(lines) + "\n")
    data_dir = prepare.prepare(data_dir=str(tmp_path / "d"), num_scenarios=0,
                               vocab_size=300, from_text=[str(text)], bad_records="skip")
    manifest = shards.read_manifest(data_dir)
    assert manifest["bad_records"] == {str(text): {
        "empty text": {"count": 1, "first": [f"{text}:12"]},
        "no string field 'text'": {"count": 1, "first": [f"{text}:13"]},
        "not a JSON object (Expecting value: line 1 column 1 (char 0))": {
            "count": 1, "first": [f"{text}:4"]}}}
    assert sum(t["documents"] for t in manifest["totals"].values()) == 17


def test_validation_split_keeps_pairs_together():
    data_dir = prepared_data_dir()
    manifest = shards.read_manifest(data_dir)
    split_of = {}
    for s in manifest["shards"]:
        for d in shards.iter_documents([os.path.join(data_dir, s["file"])]):
            if d.pair_id >= 0:
                split_of.setdefault(d.pair_id, set()).add(s["split"])
    assert split_of and all(len(v) == 1 for v in split_of.values())


def test_the_grammar_check_names_a_document_the_tokenizer_breaks(tmp_path):
    """Tagged input is validated as text by ingest; the token-level check is the safety net
    for a vocabulary that would not keep every tag one token."""
    data_dir = prepared_data_dir()
    tokenizer = beam_pipeline.Tokenizer(os.path.dirname(os.path.join(
        data_dir, shards.read_manifest(data_dir)["vocab"]["file"])))
    good = records.Document("<human>hi</human>", "ingested", "a")
    ids, counts = tokenizer(good)
    assert counts["tokens.tags"] == 2 and counts["tokens"] == len(ids)
    assert tokenizer(records.Document("<ai>hi", "ingested", "b")) == (
        "unclosed span: the document ends in state ai")
    assert tokenizer(records.Document("</ai>", "ingested", "c")).startswith(
        "malformed tags: token 0 (</ai>) is not allowed in state doc")
