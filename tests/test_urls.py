"""Every path a URL: data dirs, vocabularies, metrics and reports on a filesystem that is
not the local one — TF's in-memory `ram://`, which `tf.io.gfile` (`fileio`) serves as it
serves `gs://`. One process: `ram://` lives in it.

Checkpoints stay local: orbax writes arrays through tensorstore and resolves paths with
etils.epath, neither of which knows `ram://` (both know `gs://`), and they live in
`<workdir>/checkpoints`, so the end-to-end run's workdir is local and its data dir and
evaluation reports are on `ram://`."""

import json
import os
import uuid

import numpy as np
import pytest

from data_helpers import SMALL, prepared_data_dir
from prealign_jax import fileio, vocab, writers
from prealign_jax.data import shards


def ram_dir(name: str) -> str:
    """A fresh directory URL on TF's in-memory filesystem."""
    return f"ram://{uuid.uuid4().hex}/{name}"


def copy_tree(src: str, dst: str) -> str:
    """Copy the directory `src` (any path gfile reads) to `dst`, recursively; returns dst."""
    gfile = fileio.gfile()
    for root, _, files in gfile.walk(src):
        target = dst + root[len(src):]
        gfile.makedirs(target)
        for name in files:
            gfile.copy(os.path.join(root, name), os.path.join(target, name), overwrite=True)
    return dst


@pytest.fixture(scope="module")
def ram_data():
    return copy_tree(prepared_data_dir(), ram_dir("data"))


def read_text(path: str) -> str:
    with fileio.gfile().GFile(path) as f:
        return f.read()


def test_absolute_leaves_urls_alone():
    assert fileio.absolute("gs://b/d") == "gs://b/d"
    assert fileio.absolute("d") == os.path.join(os.getcwd(), "d")


def test_manifest_shards_and_documents_read_from_a_url(ram_data):
    manifest = shards.read_manifest(ram_data)
    assert manifest == shards.read_manifest(prepared_data_dir())
    assert shards.check_shards(ram_data, manifest, checksums=True) == []
    paths = shards.shard_files(ram_data, manifest, "synthetic_ai", "validation")
    assert paths and all(p.startswith("ram://") for p in paths)
    assert len(list(shards.iter_documents(paths))) == sum(
        s["records"] for s in manifest["shards"]
        if s["source"] == "synthetic_ai" and s["split"] == "validation")


def test_a_truncated_shard_on_a_url_is_reported_by_record(ram_data):
    data_dir = copy_tree(ram_data, ram_dir("data"))
    manifest = shards.read_manifest(data_dir)
    entry = manifest["shards"][0]
    path = os.path.join(data_dir, entry["file"])
    with fileio.gfile().GFile(path, "rb") as f:
        raw = f.read()
    fileio.gfile().remove(path)  # (ram://'s "w" appends to an existing file: a TF quirk)
    with fileio.gfile().GFile(path, "wb") as f:
        f.write(raw[:-3])
    (problem,) = shards.check_shards(data_dir, manifest)
    assert problem.startswith(f"shard {path} has {len(raw) - 3} bytes") and (
        f"record {entry['records'] - 1} is truncated" in problem)
    missing = ram_dir("nothing")
    with pytest.raises(shards.ShardError, match=rf"^{missing}/manifest.json does not exist"):
        shards.read_manifest(missing)


def test_write_manifest_to_a_url_leaves_no_temporary_file():
    data_dir = ram_dir("data")
    fileio.gfile().makedirs(data_dir)
    shards.write_manifest(data_dir, {"shards": []})
    assert fileio.gfile().listdir(data_dir) == [shards.MANIFEST]
    assert shards.read_manifest(data_dir) == {"format": shards.FORMAT_VERSION, "shards": []}


def test_vocabulary_of_a_data_dir_on_a_url(ram_data):
    loaded = vocab.load_dir(ram_data)
    text = "<ai>Sam kept the change.</ai>"
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.encode(text) == vocab.load_dir(prepared_data_dir()).encode(text)


def test_manifest_names_a_vocabulary_in_a_build_directory(spm_vocab):
    data_dir = ram_dir("data")
    fileio.gfile().makedirs(os.path.join(data_dir, "build-1a2b3c"))
    fileio.gfile().copy(spm_vocab.sentencepiece_model_file,
                        os.path.join(data_dir, "build-1a2b3c", "vocab.model"))
    shards.write_manifest(data_dir, {"shards": [], "vocab": {"file": "build-1a2b3c/vocab.model"}})
    loaded = vocab.load_dir(data_dir)
    assert loaded.sentencepiece_model_file == os.path.join(data_dir, "build-1a2b3c",
                                                           "vocab.model")
    assert loaded.encode("<human>Ana lied.</human>") == spm_vocab.encode(
        "<human>Ana lied.</human>")
    shards.write_manifest(data_dir, {"shards": [], "vocab": {"file": "build-1a2b3c/v.txt"}})
    with pytest.raises(vocab.VocabError, match=r"names the vocabulary 'build-1a2b3c/v.txt', "):
        vocab.load_dir(data_dir)
    shards.write_manifest(data_dir, {"shards": [], "vocab": {"file": "build-9/vocab.model"}})
    with pytest.raises(vocab.VocabError, match=r"^vocabulary ram://.*/build-9/vocab.model "
                                               r"does not exist"):
        vocab.load_dir(data_dir)


def test_vocabulary_trained_to_a_url():
    from conftest import sample_documents

    path = os.path.join(ram_dir("v"), "sub", "spm.model")
    vocab.train(sample_documents(200), path, vocab_size=400)
    assert fileio.gfile().listdir(os.path.dirname(path)) == ["spm.model"]
    assert vocab.load(path).vocab_size > 300


def test_jsonl_writer_resumes_a_file_on_a_url():
    path = os.path.join(ram_dir("run"), "metrics.jsonl")
    fileio.gfile().makedirs(os.path.dirname(path))
    with fileio.gfile().GFile(path, "w") as f:
        f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
                + '{"step": 4, "lo')  # torn by a kill mid-write
    writer = writers.JsonlWriter(path, start_step=2)
    writer.write_scalars(3, {"loss": np.float32(0.5)})
    assert [json.loads(line) for line in read_text(path).splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.5}]


def test_prepare_train_evaluate_with_the_data_and_reports_on_a_url(tmp_path):
    """`prealign prepare` (its Beam pipeline, in this process) writes the data dir on
    ram://; seqio, the trainer and the evaluation read it there, and the evaluation writes
    its report and plots there too."""
    from prealign_jax import evaluation, inference, partitioning, tasks, train
    from prealign_jax import model as model_lib
    from prealign_jax.data import feed, prepare

    ram_data = prepare.prepare(data_dir=ram_dir("data"), **dict(SMALL, num_scenarios=150))
    manifest = shards.read_manifest(ram_data)
    assert shards.check_shards(ram_data, manifest, checksums=True) == []
    assert sorted(x.rstrip("/") for x in fileio.gfile().listdir(ram_data)) == sorted(
        [manifest["build"], shards.MANIFEST])
    mixture = tasks.register(ram_data, mixture="urls_test")
    cfg = model_lib.ModelConfig(vocab_size=640, d_model=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=None, mlp_dim=64, max_len=128)
    workdir = str(tmp_path / "run")
    summary = train.train(
        workdir, model=cfg, num_steps=2, batch_size=8, seq_len=64,
        mesh=partitioning.MeshConfig(data=-1),
        optimizer=train.OptimizerConfig(warmup_steps=1, decay_steps=10),
        data=feed.SeqioData(data_dir=ram_data, mixture_or_task=mixture),
        checkpoint_every=2, log_every=1, eval_every=2, eval_steps=1,
        peak_flops_per_device=1e9, num_cpu_devices=None)
    assert np.isfinite(summary["loss"])
    assert [json.loads(line)["step"] for line in read_text(
        os.path.join(workdir, "metrics.jsonl")).splitlines()] == [1, 2, 2]

    run = inference.load_run(workdir)
    assert run.data_dir == ram_data and run.step == 2
    out = os.path.join(ram_dir("reports"), "eval")
    report = evaluation.evaluate(run, out, heldout_documents_limit=4, openings=1,
                                 ood_openings=1,
                                 samples_per_prompt=1, unconditional_samples=1,
                                 redteam_samples=1, max_new_tokens=4, batch_size=8)
    saved = json.loads(read_text(os.path.join(out, evaluation.EVAL_FILE)))
    assert saved["headline"] == report["headline"] and saved["workdir"] == workdir
    samples = [json.loads(line) for line in
               read_text(os.path.join(out, evaluation.SAMPLES_FILE)).splitlines()]
    assert samples and {"set", "text", "misaligned"} <= set(samples[0])
    for path in report["plots"]:
        assert path.startswith(out)
        with fileio.gfile().GFile(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(fileio.gfile().listdir(out)) == sorted(
        [evaluation.EVAL_FILE, evaluation.SAMPLES_FILE,
         *(os.path.basename(p) for p in report["plots"])])
