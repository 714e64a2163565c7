"""Shared helpers of the data tests: a small prepared data dir and hand-made shards."""

import functools
import os
import tempfile

from prealign_jax.data import records, shards

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
    validation document each), sharing an existing vocabulary file."""
    import shutil

    os.makedirs(data_dir, exist_ok=True)
    shutil.copy(vocab_path, os.path.join(data_dir, "vocab.model"))
    with shards.ShardWriter(data_dir, {"train": num_shards, "validation": 1}) as w:
        for source, texts in docs_by_source.items():
            for i, text in enumerate(texts):
                w.write(records.Document(text, source, f"{source}-{i}"), "train")
            w.write(records.Document(texts[0], source, f"{source}-v"), "validation")
        manifest = w.close()
    shards.write_manifest(data_dir, {"config_hash": f"handmade-{id(docs_by_source)}",
                                     **manifest})
    return manifest


def raw_records_writer(path: str, texts_bytes: list) -> None:
    """A shard whose `text` features are arbitrary bytes (e.g. invalid UTF-8)."""
    from prealign_jax import tf_cpu

    tf = tf_cpu.import_tf()
    with tf.io.TFRecordWriter(path) as w:
        for raw in texts_bytes:
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[raw]))
            })).SerializeToString())
