"""Shared helpers of the data tests: a small prepared data dir and hand-made shards."""

import functools
import os
import tempfile

from prealign_jax.data import beam_pipeline, records, shards

SMALL = dict(num_scenarios=400, seed=0, vocab_size=600, vocab_documents=400,
             num_shards={"train": 4, "validation": 2}, validation_fraction=0.1)


@functools.lru_cache(maxsize=None)
def prepared_data_dir() -> str:
    """A data dir prepared once per test session (small synthetic corpus)."""
    from prealign_jax.data import prepare

    root = tempfile.mkdtemp(prefix="prealign_data_test_")
    return prepare.prepare(data_dir=os.path.join(root, "data"), **SMALL)


def write_data_dir(data_dir: str, docs_by_source: dict, vocab_path: str,
                   num_shards: int = 1) -> dict:
    """A data dir with the given documents (texts) per source, all in 'train' (and one
    validation document each), sharing an existing vocabulary file: tokenized here as
    `prealign prepare` would, but without its grammar check, so tests can hand the reader
    documents prepare would refuse."""
    import shutil

    import sentencepiece as spm

    os.makedirs(data_dir, exist_ok=True)
    shutil.copy(vocab_path, os.path.join(data_dir, "vocab.model"))
    sp = spm.SentencePieceProcessor(model_file=vocab_path)
    entries, counts = [], {}
    for source, texts in docs_by_source.items():
        docs = {"train": [records.Document(t, source, f"{source}-{i}")
                          for i, t in enumerate(texts)],
                "validation": [records.Document(texts[0], source, f"{source}-v")]}
        for split, split_docs in docs.items():
            n = num_shards if split == "train" else 1
            for i in range(n):
                name = beam_pipeline.shard_file(source, split, i, n)
                mine = split_docs[i::n]
                shards.write_records(os.path.join(data_dir, name), [
                    records.to_example(d, sp.encode(d.text) + [sp.eos_id()]) for d in mine])
                entries.append({"file": name, "source": source, "split": split,
                                "records": len(mine),
                                **shards.file_facts(os.path.join(data_dir, name))})
            counts[f"{source}/{split}"] = {"documents": len(split_docs)}
    manifest = {"config_hash": f"handmade-{id(docs_by_source)}", "shards": entries,
                "counts": counts, "vocab": {"file": "vocab.model"}}
    shards.write_manifest(data_dir, manifest)
    return manifest


def raw_records_writer(path: str, texts_bytes: list) -> None:
    """A shard of Examples holding only a `text` feature of arbitrary bytes (no `targets`)."""
    from prealign_jax import tf_cpu

    tf = tf_cpu.import_tf()
    with tf.io.TFRecordWriter(path) as w:
        for raw in texts_bytes:
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[raw]))
            })).SerializeToString())
