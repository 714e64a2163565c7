"""Hostile input: every case is refused with one line that names the binding (or file) at
fault and what to do — a `UserError` from the library, `prealign: error: ...` and exit
status 2 from the CLI — never a traceback, never work lost. One section per subject."""

import dataclasses
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import packed_batches
from prealign_jax import model as model_lib, train
from prealign_jax.errors import UserError


def cli_errors(stderr: str) -> list[str]:
    """The CLI's own lines on stderr, once no traceback is there (TF and XLA log start-up
    lines of their own to stderr, which the CLI does not control)."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("prealign:")]


# ---------------------------------------------------------------- model dimensions
CFG = model_lib.ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=None, mlp_dim=64, max_len=32)
DIMENSIONS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "max_len")
# (0 layers is a valid model: embedding and unembedding only)
BAD_DIMENSIONS = [(field, value) for field in DIMENSIONS for value in (0, -4, 32.0, "32", True)
                  if (field, value) != ("num_layers", 0)]


@pytest.mark.parametrize("field, value", BAD_DIMENSIONS)
def test_model_dimensions_must_be_positive_integers(field, value):
    kind = "non-negative" if field == "num_layers" else "positive"
    with pytest.raises(UserError) as e:
        dataclasses.replace(CFG, **{field: value})
    assert str(e.value) == f"ModelConfig.{field}={value!r} must be a {kind} integer"


def test_valid_dimensions_still_build():
    """The check refuses only what is wrong: None head_dim, 0 layers and ints pass."""
    assert dataclasses.replace(CFG, head_dim=16, num_layers=0).dims_per_head == 16


def test_cli_refuses_a_zero_dimension_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "prealign_jax.main", "plan",
                           "--gin_file=models/tiny.gin", "--gin.ModelConfig.d_model=0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert cli_errors(proc.stderr) == [
        "prealign: error: ModelConfig.d_model=0 must be a positive integer"]


# ---------------------------------------------------------------- the optimizer
@pytest.mark.parametrize("field, value, what", [
    ("learning_rate", 0.0, "a positive number"), ("learning_rate", float("nan"),
                                                  "a positive number"),
    ("learning_rate", -3e-4, "a positive number"), ("learning_rate", "3e-4",
                                                    "a positive number"),
    ("learning_rate", float("inf"), "a positive number"),
    ("warmup_steps", -1, "an integer >= 0"), ("warmup_steps", 2.5, "an integer >= 0"),
    ("decay_steps", 0, "None or an integer >= 1"),
    ("end_learning_rate_fraction", 1.5, "a number in [0, 1]"),
    ("b1", 1.0, "a number in [0, 1)"), ("b2", -0.1, "a number in [0, 1)"),
    ("eps", 0, "a positive number"), ("weight_decay", float("nan"), "a number >= 0"),
    ("clip_norm", None, "a positive number"), ("clip_norm", True, "a positive number")])
def test_optimizer_settings_are_checked(field, value, what):
    with pytest.raises(UserError) as e:
        train.OptimizerConfig(**{field: value})
    assert str(e.value) == f"OptimizerConfig.{field}={value!r} must be {what}"


def test_a_negative_fine_tuning_rate_is_one_line_before_any_work(tmp_path, capsys):
    """The experiment's fine-tuning optimizer (a scoped OptimizerConfig) is built, and
    refused, when the bindings are read: before hours of training."""
    from prealign_jax import main

    assert main.main(["experiment", f"--workdir={tmp_path / 'w'}",
                      "--gin_file=experiments/prealign_vs_mle.gin",
                      "--gin.finetune/OptimizerConfig.learning_rate=-3e-4"]) == 2
    err = capsys.readouterr().err
    assert err == "prealign: error: OptimizerConfig.learning_rate=-0.0003 must be a " \
        "positive number\n", err
    assert not (tmp_path / "w").exists()
    assert main.main(["experiment", f"--workdir={tmp_path / 'w'}",
                      "--gin_file=experiments/prealign_vs_mle.gin",
                      "--gin.experiment.persistence_optimizer=3"]) == 2
    assert "experiment.persistence_optimizer=3: bind @finetune/OptimizerConfig()" in \
        capsys.readouterr().err
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- resuming a run
def tiny_data(workdir, batch_size, seq_len, seed):
    """`train.data` without data files: 64 packed rows, repeated, in batches of the run's
    size (so a resume may ask for another size)."""
    from prealign_jax import tf_cpu, train
    from prealign_jax.data import feed

    tf = tf_cpu.import_tf()
    import seqio

    rows = packed_batches.packed_batch(np.random.default_rng(seed), 64, seq_len, CFG.vocab_size)
    ds = tf.data.Dataset.from_tensor_slices({k: rows[k] for k in train.FEATURES})
    ds = ds.repeat().batch(batch_size, drop_remainder=True)
    return feed.DataSources(train={seqio.ShardInfo(0, 1): ds}, eval=None,
                            token_class=packed_batches.token_class(CFG.vocab_size))


def train_tiny(workdir, num_steps, model=CFG, batch_size=8, seq_len=None, **kwargs):
    from prealign_jax import partitioning, train

    return train.train(str(workdir), model=model, num_steps=num_steps, batch_size=batch_size,
                       seq_len=seq_len, mesh=partitioning.MeshConfig(data=-1),
                       optimizer=train.OptimizerConfig(warmup_steps=1, decay_steps=10),
                       data=tiny_data, checkpoint_every=2, log_every=2,
                       peak_flops_per_device=1e9, num_cpu_devices=None, **kwargs)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run of CFG, batch 8 x 32 (one row per fake device), checkpointed at step 2."""
    workdir = tmp_path_factory.mktemp("saved")
    train_tiny(workdir, 2)
    return workdir


@pytest.mark.parametrize("change, message", [
    (dict(model=dataclasses.replace(CFG, d_model=64)),
     "ModelConfig.d_model=64 (the run has 32); resume with the run's own model or use a new "
     "--workdir"),
    (dict(model=dataclasses.replace(CFG, d_model=64), without_run_json=True),
     "params/embedding was saved with shape (300, 32), this run's model has shape (300, 64): "
     "the run was saved with another ModelConfig; resume with the run's own ModelConfig or "
     "use a new --workdir"),
    (dict(batch_size=16),
     "saved with train.batch_size=8 (8 rows per data shard), this run has 16; the saved data "
     "position counts batches of that size: resume with train.batch_size=8 or use a new "
     "--workdir"),
    (dict(seq_len=16),
     "saved with train.seq_len=32, this run has 16; resume with train.seq_len=32 or use a "
     "new --workdir"),
], ids=["d_model", "d_model_array_shapes", "batch_size", "seq_len"])
def test_resuming_with_another_shape_names_the_checkpoint_and_binding(
        saved_run, tmp_path, change, message):
    """Refused before any step, with the checkpoints, metrics and run.json left as they
    were. Without run.json (the model's record), the checkpoint's array shapes decide."""
    shutil.copytree(saved_run, tmp_path, dirs_exist_ok=True)
    change = dict(change)
    if change.pop("without_run_json", False):
        os.remove(tmp_path / "run.json")
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    run_json = (tmp_path / "run.json").read_bytes() if (tmp_path / "run.json").exists() else None
    with pytest.raises(UserError) as e:
        train_tiny(tmp_path, 4, **change)
    # (gin appends an "In call to configurable" line; the CLI prints the first)
    assert str(e.value).splitlines()[0] == f"{tmp_path}/checkpoints/2: {message}"
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    assert run_json is None or (tmp_path / "run.json").read_bytes() == run_json


# ---------------------------------------------------------------- training settings
@pytest.mark.parametrize("steps", [5, (2, 2), (0, 3), (1.5, 3), (1, 2, 3), (True, 3)])
def test_profile_steps_must_be_a_pair_of_steps(tmp_path, steps):
    with pytest.raises(UserError, match=r"train.profile_steps=.* must be \(start, stop\)"):
        train_tiny(tmp_path, 2, profile_steps=steps)
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("shards", [0, -1, 2.5, True])
def test_num_data_shards_must_be_a_positive_integer(shards):
    from prealign_jax.data import feed

    with pytest.raises(UserError, match=r"seqio_data.num_data_shards=.*: a positive integer"):
        feed.data_shards(shards)


@pytest.mark.parametrize("binding, needle", [
    ("train.data=None", "train.data=None: bind @seqio_data()"),
    ("train.workdir='/x'", "train.workdir"),  # the command passes it: not a binding
    ("evaluate.output_dir='/x'", "evaluate.output_dir"),
    ("tasks.register.data_dir='/x'", "register.data_dir"),
    # a referenced configurable's refusal, not "train.model is not bound"
    ("ModelConfig.d_model=0", "ModelConfig.d_model=0 must be a positive integer"),
])
def test_bindings_the_command_owns_or_cannot_use_are_one_line_errors(tmp_path, capsys,
                                                                     binding, needle):
    from prealign_jax import main

    assert main.main(["train", f"--workdir={tmp_path}", "--gin_file=runs/cpu_demo.gin",
                      f"--gin.{binding}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- a run directory
@pytest.mark.parametrize("content", ["", "{not json", '{"model": {"d_model": 0}}', "[]"])
def test_a_corrupt_run_json_is_named(saved_run, tmp_path, content):
    from prealign_jax import inference

    shutil.copytree(saved_run, tmp_path, dirs_exist_ok=True)
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(UserError, match=r"run.json: not a run record prealign train wrote"):
        inference.load_run(str(tmp_path))


# ---------------------------------------------------------------- plans
@pytest.mark.parametrize("binding, needle", [
    ("Accelerator.num_devices=-3", "Accelerator.num_devices=-3: a positive integer"),
    ("Accelerator.hbm_bytes=-1.0", "Accelerator.hbm_bytes=-1.0: a positive number"),
    ("Accelerator.platform='npu'", "Accelerator.platform='npu'"),
])
def test_a_bad_accelerator_is_named(capsys, binding, needle):
    from prealign_jax import main

    assert main.main(["plan", "--gin_file=models/tiny.gin", f"--gin.{binding}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- shards read for training
def _shard_dir(tmp_path, spm_vocab, num_docs=89):
    """A data dir whose one train shard holds `num_docs` documents; (data dir, shard)."""
    from data_helpers import write_data_dir

    data_dir = str(tmp_path / "data")
    manifest = write_data_dir(data_dir, {"synthetic_human": [
        f"<human>doc {i}</human>" for i in range(num_docs)]}, spm_vocab.sentencepiece_model_file)
    return data_dir, os.path.join(data_dir, next(s["file"] for s in manifest["shards"]
                                                 if s["split"] == "train"))


def _read_documents(data_dir, bad_records) -> int:
    """Documents the training pipeline yields in one ordered pass over the train shard."""
    from prealign_jax import tasks
    from prealign_jax.data import pipeline

    tasks.register(data_dir, bad_records=bad_records)
    ds = pipeline.get_dataset("prealign_synthetic_human", "train", 1, 2048, seed=0,
                              num_epochs=1, shuffle=False)
    return sum(int(b["decoder_segment_ids"].max()) for b in pipeline.DataIterator(ds))


def _record_spans(path) -> list[tuple[int, int]]:
    """(offset, length) of each record's data in a TFRecord file (12-byte header before,
    4-byte CRC after)."""
    data, spans, pos = open(path, "rb").read(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        spans.append((pos + 12, length))
        pos += 12 + length + 4
    return spans


def _flip_a_byte(path, index) -> None:
    """Corrupt record `index` in place: one byte in the middle of its data inverted."""
    offset, length = _record_spans(path)[index]
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def _replace_record(data_dir, path, index, raw: bytes) -> None:
    """Rewrite the shard with record `index` replaced by `raw`; the manifest follows."""
    from prealign_jax import tf_cpu
    from prealign_jax.data import shards

    tf = tf_cpu.import_tf()
    rows = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    rows[index] = raw
    with tf.io.TFRecordWriter(path) as w:
        for r in rows:
            w.write(r)
    manifest = shards.read_manifest(data_dir)
    entry = next(s for s in manifest["shards"] if os.path.join(data_dir, s["file"]) == path)
    entry.update(bytes=os.path.getsize(path), sha256=shards.sha256(path))
    shards.write_manifest(data_dir, {k: v for k, v in manifest.items() if k != "format"})


def _int_text_example() -> bytes:
    from prealign_jax import tf_cpu

    tf = tf_cpu.import_tf()
    return tf.train.Example(features=tf.train.Features(feature={"text": tf.train.Feature(
        int64_list=tf.train.Int64List(value=[7]))})).SerializeToString()


@pytest.mark.parametrize("raw, why", [
    (b"<human>not an Example</human>", "not a tf.train.Example with an int64 feature "
     "`targets`"),
    (_int_text_example(), "no tokens (`targets` is empty)"),
], ids=["bytes", "int_text"])
def test_a_record_that_is_not_an_example_is_named(tmp_path, spm_vocab, capfd, raw, why):
    """`error` stops naming shard and record; `skip` logs it and trains on the other 88."""
    from prealign_jax.data import pipeline

    data_dir, path = _shard_dir(tmp_path, spm_vocab)
    _replace_record(data_dir, path, 7, raw)
    with pytest.raises(pipeline.DataError) as e:
        _read_documents(data_dir, "error")
    assert str(e.value) == (
        f"shard {path} record 7: {why}; rerun `prealign prepare` (or bind "
        "tasks.register.bad_records='skip' to drop and log such records)")
    assert _read_documents(data_dir, "skip") == 88
    err = capfd.readouterr().err
    assert (f'prealign data: skipped "shard {path} record 7: {why}" | skipped so far: 1'
            ) in err


def test_a_corrupt_record_is_counted_against_the_manifest(tmp_path, spm_vocab, capfd):
    """One flipped byte: TFRecordDataset cannot read past it, so every record after it is
    lost too; `error` stops naming the shard, `skip` says loudly how many were lost."""
    from prealign_jax.data import pipeline

    data_dir, path = _shard_dir(tmp_path, spm_vocab)
    _flip_a_byte(path, 5)
    with pytest.raises(pipeline.DataError) as e:
        _read_documents(data_dir, "error")
    assert str(e.value) == (
        f"shard {path}: read 5 of its 89 records (manifest.json): record 5 is missing or "
        "corrupt and the reader cannot go past it; rerun `prealign prepare` (or bind "
        "tasks.register.bad_records='skip' to train on the records before it)")
    assert _read_documents(data_dir, "skip") == 5
    err = capfd.readouterr().err
    assert (f'prealign data: "shard {path}: read 5 of its 89 records (manifest.json): '
            "record 5 is missing or corrupt and the reader cannot go past it; skipped 84 "
            'records; rerun `prealign prepare` to read them"') in err


@pytest.mark.parametrize("damage", ["flip", "not_an_example"])
def test_tools_reading_a_damaged_shard_name_it(tmp_path, spm_vocab, damage):
    """`shards.iter_documents` (evaluation, tools): the shard and record, not a traceback."""
    from prealign_jax.data import shards

    data_dir, path = _shard_dir(tmp_path, spm_vocab, num_docs=9)
    if damage == "flip":
        _flip_a_byte(path, 5)
    else:
        _replace_record(data_dir, path, 5, b"not an Example")
    with pytest.raises(shards.ShardError, match=rf"^shard {re.escape(path)} record 5: "
                       r"unreadable \(.+\); rerun `prealign prepare`$"):
        list(shards.iter_documents([path]))


@pytest.mark.parametrize("bad_records", ["error", "skip"])
@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("shards"), "has no shard list ('shards')"),
    (lambda m: m["shards"][0].pop("records"),
     "shard entry 0 (synthetic_human/train.tfrecord-00000-of-00001) has no valid 'records'"),
], ids=["no_shards", "no_records"])
def test_a_manifest_without_its_shard_list_is_named(tmp_path, spm_vocab, bad_records, damage,
                                                    message):
    from prealign_jax import tasks
    from prealign_jax.data import shards

    data_dir, _ = _shard_dir(tmp_path, spm_vocab, num_docs=3)
    manifest = shards.read_manifest(data_dir)
    damage(manifest)
    shards.write_manifest(data_dir, {k: v for k, v in manifest.items() if k != "format"})
    with pytest.raises(shards.ShardError) as e:
        tasks.register(data_dir, bad_records=bad_records)
    assert str(e.value) == (f"{data_dir}/manifest.json {message}; rerun `prealign prepare` "
                            f"for {data_dir}")


# ---------------------------------------------------------------- prepare from raw text
GOOD_LINES = [f'{{"text": "Person {i} kept the change and said nothing."}}\n'
              for i in range(40)]


def _prepare(tmp_path, text_file, bad_records="error"):
    from prealign_jax.data import prepare

    return prepare.prepare(data_dir=str(tmp_path / "data"), num_scenarios=0, vocab_size=300,
                           vocab_documents=1000, num_shards={"train": 1, "validation": 1},
                           from_text=[str(text_file)], bad_records=bad_records)


def test_a_bad_record_in_the_vocabulary_sample_is_one_line(tmp_path):
    """Met while the vocabulary trains (before any shard is written): the same error as
    later, not a SentencePiece RuntimeError."""
    from prealign_jax.data import ingest

    path = tmp_path / "raw.jsonl"
    path.write_text("".join(GOOD_LINES[:3]) + "{not json\n" + "".join(GOOD_LINES))
    with pytest.raises(ingest.IngestError) as e:
        _prepare(tmp_path, path)
    assert str(e.value).startswith(f"{path}:4: not a JSON object (")
    assert str(e.value).endswith("(pass --bad_records=skip to drop such records)")
    assert not os.path.exists(tmp_path / "data")


def test_a_lone_surrogate_is_a_bad_record(tmp_path, caplog):
    from prealign_jax.data import ingest, shards

    path = tmp_path / "raw.jsonl"
    path.write_text("".join(GOOD_LINES) + '{"text": "a \\ud800 b"}\n')
    with pytest.raises(ingest.IngestError) as e:
        list(ingest.read_documents([str(path)]))
    assert str(e.value) == (f"{path}:41: 'text' holds a lone surrogate (U+D800 at character "
                            "2), which is not Unicode text (pass --bad_records=skip to drop "
                            "such records)")
    caplog.set_level("INFO")
    data_dir = _prepare(tmp_path, path, bad_records="skip")
    assert (f"prepare: skipped 1 bad records of {path}: 'text' holds a lone surrogate "
            f"(U+D800 at character 2), which is not Unicode text (first: {path}:41)"
            ) in caplog.text
    manifest = shards.read_manifest(data_dir)
    assert sum(t["documents"] for t in manifest["totals"].values()) == 40


@pytest.mark.parametrize("count", [0, -5, 2.5, True])
def test_vocab_documents_must_be_a_positive_count(tmp_path, count):
    from prealign_jax.data import prepare

    with pytest.raises(UserError, match=rf"^prepare.vocab_documents={count!r}: the vocabulary "
                       "is trained on this many documents; give a positive count$"):
        prepare.prepare(data_dir=str(tmp_path / "data"), num_scenarios=10, vocab_size=300,
                        vocab_documents=count)
    assert not os.path.exists(tmp_path / "data")


def test_an_empty_input_without_scenarios_is_one_line(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(UserError) as e:
        _prepare(tmp_path, path)
    assert str(e.value) == (
        f"no documents to prepare: prepare.num_scenarios=0 and the inputs "
        f"{path} hold no usable records; give inputs with documents or num_scenarios > 0")


def test_a_data_dir_no_file_system_reaches_is_one_line(tmp_path):
    from prealign_jax.data import prepare

    with pytest.raises(UserError, match=r"^data dir nosuchfs://b/data: File system scheme "
                       r"'nosuchfs' not implemented .*; give a local path or a URL "):
        prepare.prepare(data_dir="nosuchfs://b/data", num_scenarios=10, vocab_size=300)


@pytest.mark.parametrize("runner, message", [
    ("NoSuchRunner", r"^--runner=NoSuchRunner: Unexpected pipeline runner: NoSuchRunner\. "),
    ("DataflowRunner", r"^--runner=DataflowRunner: Missing .*; pass them after `--` "),
])
def test_a_runner_without_what_it_needs_is_one_line(tmp_path, runner, message):
    from prealign_jax.data import prepare

    with pytest.raises(UserError, match=message):
        prepare.prepare(data_dir=str(tmp_path / "data"), num_scenarios=5, vocab_size=600,
                        runner=runner)
    assert not os.path.exists(tmp_path / "data")


def test_a_vocabulary_sentencepiece_cannot_train_is_one_line(tmp_path):
    from prealign_jax.data import prepare

    with pytest.raises(UserError, match=r"^vocab_size=300: SentencePiece cannot train it \("
                       r"Vocabulary size is smaller than required_chars.*choose a larger "
                       r"vocab_size$"):
        prepare.prepare(data_dir=str(tmp_path / "data"), num_scenarios=5, vocab_size=300)
    assert not os.path.exists(tmp_path / "data")
