"""The trainer in-process (8 fake CPU devices): sharding-independence of the step, gradient
accumulation, loss weights and per-mode metrics, the optimizer's decay mask, checkpoints
restored onto another mesh, and the loop's hooks (order, non-finite-loss guard, metrics
writers, preemption, profiler)."""

import dataclasses
import fcntl
import functools
import glob
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

import packed_batches
from prealign_jax import checkpointing, errors, fileio, hooks, modes, partitioning, writers
from prealign_jax.data import feed
from prealign_jax import model as model_lib
from prealign_jax import train

VOCAB = 300
SEQ = 32
CFG = model_lib.ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=None, mlp_dim=64, max_len=SEQ)
# decay_steps fixed: the same program whatever train.num_steps (one compile per mesh)
OPT = train.OptimizerConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=10)
NUM_STEPS = 3
MESHES = {"1 device": dict(data=1, devices=jax.devices()[:1]),
          "data=8": dict(data=8), "fsdp=8": dict(data=1, fsdp=8),
          "data=2 fsdp=2 tensor=2": dict(data=2, fsdp=2, tensor=2)}




@functools.cache
def steps_on(mesh: str, accum_steps: int = 1) -> train.Steps:
    """Jitted steps per mesh, shared by the tests (each compiles once)."""
    mesh = partitioning.make_mesh(**MESHES[mesh])
    return train.Steps(CFG, train.make_optimizer(OPT, NUM_STEPS),
                       train.learning_rate_schedule(OPT, NUM_STEPS), mesh,
                       packed_batches.token_class(VOCAB), accum_steps=accum_steps)


def run_steps(steps, batches, initial_state=None):
    """Train on `batches` from `initial_state` (placed on the steps' mesh) or a fresh init."""
    with partitioning.activate(steps.mesh):
        state = (steps.init(jax.random.key(0)) if initial_state is None
                 else jax.device_put(initial_state, steps.state_shardings))
        history = []
        for b in batches:
            state, m = steps.train(state, partitioning.shard_batch(b, steps.mesh))
            history.append(jax.device_get(m))
        return state, history


@pytest.fixture(scope="module")
def batches():
    return packed_batches.batches(3, 8, SEQ, VOCAB)


@pytest.fixture(scope="module")
def initial_state():
    steps = steps_on("1 device")
    with partitioning.activate(steps.mesh):
        return jax.device_get(steps.init(jax.random.key(0)))


@pytest.fixture(scope="module")
def reference(batches, initial_state):
    """Metrics of each step and the final state on one device."""
    return run_steps(steps_on("1 device"), batches, initial_state)


@pytest.mark.parametrize("mesh, accum_steps", [
    ("data=8", 1), ("fsdp=8", 1),
    # 2 micro-batches of 4 rows (one row per batch shard): equals one batch of 8
    ("data=2 fsdp=2 tensor=2", 2)])
def test_training_is_independent_of_mesh_and_accumulation(mesh, accum_steps, batches,
                                                          initial_state, reference):
    # (init in its shardings is covered by the train() tests below, which end on the
    # reference loss; starting all meshes from one init saves a compile per mesh)
    state, history = run_steps(steps_on(mesh, accum_steps), batches, initial_state)
    ref_state, ref_history = reference
    for got, want in zip(history, ref_history):
        np.testing.assert_allclose(got["loss_sum"], want["loss_sum"], rtol=2e-5)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert history[-1]["loss_sum"] < history[0]["loss_sum"]


def test_loss_uses_the_float_weights_and_per_mode_metrics_count_modes(batches,
                                                                     initial_state):
    steps = steps_on("1 device")
    batch = batches[0]
    real = batch["decoder_segment_ids"] > 0
    # Expected groups, straight from the document layout (tags, EOS, text per mode).
    classes = packed_batches.token_class(VOCAB)[batch["decoder_target_tokens"]]
    modes_np, _, _ = modes.run_numpy(modes.GRAMMAR.compile(), classes,
                                     batch["decoder_segment_ids"])
    assert (modes_np[real] >= 0).all()  # the hand-built documents are well-formed
    expected = {g: real & (classes == modes.TEXT) & (modes_np == modes.MODES.index(g))
                for g in ("doc", "human", "ai", "quote")}
    expected["tag"] = real & (classes >= 1) & (classes <= len(modes.TAGS))
    expected["eos"] = real & (classes == modes.EOS_CLASS)
    assert sum(e.sum() for e in expected.values()) == real.sum()

    def evaluate(weights):
        with partitioning.activate(steps.mesh):
            return jax.device_get(steps.evaluate(
                initial_state.params, dict(batch, decoder_loss_weights=weights.astype(
                    np.float32))))

    m = evaluate(real)
    for g, mask in expected.items():
        # weighting exactly the expected tokens reproduces the group's CE sum and count
        only_g = evaluate(mask)
        assert m[f"count/{g}"] == only_g["weight_sum"] == mask.sum() > 0
        np.testing.assert_allclose(m[f"ce_sum/{g}"], only_g["loss_sum"], rtol=1e-5)
        assert only_g[f"ce_sum/{g}"] == m[f"ce_sum/{g}"]  # groups ignore the weights
    # the loss is linear in the float weights
    mixed = evaluate(2.0 * expected["human"] + 0.25 * expected["tag"])
    np.testing.assert_allclose(
        mixed["loss_sum"], 2.0 * m["ce_sum/human"] + 0.25 * m["ce_sum/tag"], rtol=1e-5)
    s = train.summarize([m])
    np.testing.assert_allclose(s["loss/human"], m["ce_sum/human"] / m["count/human"])
    np.testing.assert_allclose(s["loss"], m["loss_sum"] / real.sum(), rtol=1e-6)


def test_weight_decay_skips_vectors_and_the_embedding():
    steps = steps_on("1 device")
    mask = train.weight_decay_mask(steps.abstract_state.params)
    assert not mask["embedding"] and not mask["final_norm"]["scale"]
    assert not mask["layers_0"]["pre_mlp_norm"]["scale"]
    assert mask["logits"] and mask["layers_1"]["attention"]["query"] and mask["layers_0"]["mlp"]["wo"]
    assert train.weight_decay_mask(steps.abstract_state.params, decay_embeddings=True)["embedding"]


def test_learning_rate_warms_up_then_decays():
    schedule = train.learning_rate_schedule(
        train.OptimizerConfig(learning_rate=1.0, warmup_steps=10,
                              end_learning_rate_fraction=0.1), num_steps=100)
    assert schedule(0) == 0 and schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)
    assert 0.1 < schedule(50) < 1.0 and schedule(100) == pytest.approx(0.1)


# ---------------------------------------------------------------- the loop, in-process
def synthetic_data(batch_list):
    """`train.data` for tests: the batches, in order, repeated, as a real tf.data dataset."""
    from prealign_jax import tf_cpu

    tf = tf_cpu.import_tf()
    import seqio

    def data(workdir, batch_size, seq_len, seed):
        stacked = {k: np.stack([b[k] for b in batch_list]) for k in train.FEATURES}
        assert stacked["decoder_target_tokens"].shape[1:] == (batch_size, seq_len)
        ds = tf.data.Dataset.from_tensor_slices(stacked).repeat()
        shards = {seqio.ShardInfo(0, 1): ds}
        return feed.DataSources(train=shards, eval=shards,
                                 token_class=packed_batches.token_class(VOCAB))

    return data


def run_train(workdir, batch_list, mesh, num_steps, **kwargs):
    # num_cpu_devices explicitly: a gin binding left by another test must not apply.
    kwargs = dict(dict(log_every=2, checkpoint_every=2, eval_every=0, num_cpu_devices=None),
                  **kwargs)
    return train.train(str(workdir), model=CFG, num_steps=num_steps, batch_size=8,
                       mesh=partitioning.MeshConfig(**mesh), optimizer=OPT,
                       data=synthetic_data(batch_list), peak_flops_per_device=1e9, **kwargs)


def read_records(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def tensorboard_scalars(workdir):
    """{tag: [steps]} of the scalars in the run's TensorBoard event files."""
    from prealign_jax import tf_cpu

    tf = tf_cpu.import_tf()
    steps = {}
    for path in sorted(glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_train_writes_metrics_config_and_checkpoints_then_resumes(tmp_path, batches,
                                                                   capsys):
    summary = run_train(tmp_path, batches, dict(data=8), num_steps=4, eval_every=2, eval_steps=1)
    assert np.isfinite(summary["loss"]) and summary["tokens/s"] > 0 and summary["mfu"] > 0
    out = capsys.readouterr().out
    assert "step 4/4 | loss" in out and "eval step 4 | loss" in out
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    run_info = json.loads((tmp_path / train.RUN_FILE).read_text())  # what load_run reads
    assert model_lib.ModelConfig(**run_info["model"]) == CFG
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [2, 2, 4, 4]  # the log line, then the eval
    assert records[2] == dict(summary, step=4)
    assert {"loss", "tokens/s", "mfu", "learning_rate", "grad_norm", "loss/human",
            "tokens/ai"} <= set(records[0]) and "eval/loss/human" in records[1]
    assert tensorboard_scalars(tmp_path)["loss"] == [2, 4]
    assert tensorboard_scalars(tmp_path)["eval/loss"] == [2, 4]

    run_train(tmp_path, batches, dict(data=8), num_steps=6)
    assert f"resumed from {tmp_path}/checkpoints/4" in capsys.readouterr().out
    records = read_records(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 4]


def test_a_complete_run_restores_nothing(tmp_path, batches, capsys):
    """A run at train.num_steps needs neither its state nor its data position, so a data
    pipeline changed since the save (whose position tf.data cannot restore) finds nothing
    to train instead of failing."""
    run_train(tmp_path, batches, dict(data=8), num_steps=2)
    same = synthetic_data(batches)

    def changed(*args):
        sources = same(*args)
        return dataclasses.replace(sources, train={k: ds.shuffle(4, seed=0)
                                                   for k, ds in sources.train.items()})

    assert train.train(str(tmp_path), model=CFG, num_steps=2, batch_size=8, data=changed,
                       optimizer=OPT, num_cpu_devices=None, checkpoint_every=2) == {}
    assert "nothing to train" in capsys.readouterr().out


def test_resume_drops_the_metrics_after_the_restored_step(tmp_path, batches):
    """Records the interrupted run wrote after its last checkpoint are recomputed, once, to
    the same values."""
    run_train(tmp_path, batches, dict(data=8), num_steps=4)
    first = read_records(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if killed before step 4 was saved
    run_train(tmp_path, batches, dict(data=8), num_steps=4)
    again = read_records(tmp_path)
    assert [r["step"] for r in again] == [2, 4]
    timing = ("tokens/s", "mfu")
    assert ({k: v for k, v in again[1].items() if k not in timing}
            == {k: v for k, v in first[1].items() if k not in timing})
    # TensorBoard cannot drop them (see prealign_jax/writers.py): step 4 is there twice
    assert tensorboard_scalars(tmp_path)["loss"] == [2, 4, 4]


def test_jsonl_writer_keeps_the_steps_up_to_the_restored_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
                    + '{"step": 4, "lo')  # torn by a kill mid-write
    writer = writers.JsonlWriter(str(path), start_step=2)
    writer.write_scalars(3, {"loss": np.float32(0.5)})
    assert read_records(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0},
                                      {"step": 3, "loss": 0.5}]


def test_every_hook_is_asked_before_any_runs_and_they_run_in_order():
    calls = []

    class Probe(hooks.Hook):
        def __init__(self, name, ends=False, reads=False):
            self.name, self.ends, self.reads = name, ends, reads

        def ends_run(self, run):
            calls.append((self.name, "ends_run"))
            return self.ends

        def plan(self, run):
            calls.append((self.name, "plan", run.last))
            return self.reads

        def after_step(self, run):
            calls.append((self.name, "after_step", run.sync))

    run = hooks.Run(num_steps=10, start_step=0, state=None)
    run.record(1, None, {})
    assert hooks.after_step([Probe("a", reads=True), Probe("b", ends=True)], run)
    assert calls == [("a", "ends_run"), ("b", "ends_run"), ("a", "plan", True),
                     ("b", "plan", True), ("a", "after_step", True), ("b", "after_step", True)]


def test_tokens_per_second_counts_training_time_only(monkeypatch):
    """On a fake clock: each step takes 1 s, the first (compilation) 50 s, an evaluation
    at step 3 takes 100 s. Log line at step 4: steps 2-4 in 3 s of training, whatever the
    evaluation in between (it used to restart the window and keep the steps before it)."""
    clock = [0.0]
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: clock[0])

    class Writer:
        def write_scalars(self, step, scalars):
            written[step] = scalars

        def flush(self):
            pass

    def evaluate(state):
        clock[0] += 100.0
        return {"loss": 1.0}

    written = {}
    writer = Writer()
    log = hooks.Log(writer, 4, lambda metrics: {"loss": 1.0}, tokens_per_step=10,
                    flops_per_token=1.0, peak_flops=100.0)
    run = hooks.Run(num_steps=8, start_step=0, state=None)
    all_hooks = [log, hooks.Eval(writer, 3, evaluate)]
    for step in range(1, 5):
        clock[0] += 50.0 if step == 1 else 1.0
        run.record(step, None, {"loss_sum": 1.0})
        hooks.after_step(all_hooks, run)
    assert written[4]["tokens/s"] == pytest.approx(3 * 10 / 3.0)
    assert written[4]["mfu"] == pytest.approx(0.1)


class SignalAfter(hooks.Hook):
    """A caller's hook: send this process `sig` after `step`."""

    def __init__(self, step, sig):
        self.step, self.sig = step, sig

    def after_step(self, run):
        if run.step == self.step:
            os.kill(os.getpid(), self.sig)


def test_checkpoint_restores_onto_another_mesh(tmp_path, batches, reference):
    run_train(tmp_path, batches, dict(data=1, fsdp=4, tensor=2), num_steps=NUM_STEPS)
    ckpt = checkpointing.Checkpoints(str(tmp_path), every=2, keep=3)
    try:
        for mesh in ("1 device", "data=8"):
            steps = steps_on(mesh)
            iterator = feed.ShardedIterator(synthetic_data(batches)(None, 8, SEQ, 0).train)
            with partitioning.activate(steps.mesh):
                state = ckpt.restore(2, steps.abstract_state, iterator)
                assert int(state.step) == 2
                for leaf, sharding in zip(jax.tree.leaves(state),
                                          jax.tree.leaves(steps.state_shardings)):
                    assert leaf.sharding == sharding
                # the data position came back too: the next batch is the third one
                batch = next(iterator)
                np.testing.assert_array_equal(batch["decoder_target_tokens"],
                                              batches[2]["decoder_target_tokens"])
                _, got = steps.train(state, partitioning.shard_batch(batch, steps.mesh))
            np.testing.assert_allclose(jax.device_get(got)["loss_sum"],
                                       reference[1][2]["loss_sum"], rtol=2e-5)
    finally:
        ckpt.close()


def test_sigterm_saves_the_next_step_and_stops(tmp_path, batches):
    """Preemption: the loop sees the signal at the next step, saves it, waits, then raises
    `Preempted`, so that no caller takes the partial run for a finished one."""
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(errors.Preempted, match="preempted: saved step 3 to .*checkpoints; "
                                               "rerun the same command to resume"):
        run_train(tmp_path, batches, dict(data=8), num_steps=1000, log_every=1,
                  checkpoint_every=1000, hooks=[SignalAfter(2, signal.SIGTERM)])
    assert signal.getsignal(signal.SIGTERM) == previous  # the run's handler is gone
    # a preemption at the last step leaves a finished run: nothing is raised
    run_train(tmp_path / "last", batches, dict(data=8), num_steps=3, log_every=1,
              checkpoint_every=1000, hooks=[SignalAfter(2, signal.SIGTERM)])
    assert os.listdir(tmp_path / "last" / "checkpoints") == ["3"]
    assert [r["step"] for r in read_records(tmp_path)] == [1, 2, 3]
    assert os.listdir(tmp_path / "checkpoints") == ["3"]


def test_a_run_in_training_is_refused_to_a_second_job(tmp_path, batches):
    """Two jobs on one workdir would interleave metrics.jsonl and race their saves: the
    second is refused in one line naming the holder; the lock goes with its holder."""
    with fileio.exclusive(str(tmp_path), "another job"):
        with pytest.raises(fileio.Busy, match=rf"^{tmp_path} is in use by another process "
                                              rf"\(another job, pid {os.getpid()}, lock "):
            run_train(tmp_path, batches, dict(data=8), num_steps=2)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    run_train(tmp_path, batches, dict(data=8), num_steps=2)  # free again
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    (tmp_path / "bad").mkdir()  # a holder's note that is not text, a lock that is a directory
    (tmp_path / "bad" / ".lock").write_bytes(b"\xff\xfe")
    with open(tmp_path / "bad" / ".lock", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(fileio.Busy, match=r"in use by another process \(\ufffd"):
            with fileio.exclusive(str(tmp_path / "bad"), "x"):
                pass
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / ".lock").mkdir()
    with pytest.raises(fileio.Busy, match=r"\.lock is a directory, not a lock file"):
        with fileio.exclusive(str(tmp_path / "dir"), "x"):
            pass


def test_non_finite_loss_stops_the_run_and_is_never_checkpointed(tmp_path, batches):
    poisoned = [dict(b) for b in batches]
    poisoned[2]["decoder_loss_weights"] = np.full_like(batches[2]["decoder_loss_weights"],
                                                       np.nan)
    with pytest.raises(train.TrainError, match=r"step 3: the loss is nan.*last checkpoint: "
                                                r"step 2"):
        run_train(tmp_path, poisoned, dict(data=8), num_steps=8, log_every=100)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_profile_steps_write_a_trace_for_tensorboard_and_perfetto(tmp_path, batches):
    run_train(tmp_path, batches, dict(data=8), num_steps=3, profile_steps=(2, 3))
    profile = tmp_path / "tensorboard" / "plugins" / "profile"
    assert glob.glob(str(profile / "*" / "*.xplane.pb"))
    assert glob.glob(str(profile / "*" / "perfetto_trace.json.gz"))


def test_profile_steps_must_be_a_range_of_steps(tmp_path, batches):
    with pytest.raises(train.TrainError, match=r"train.profile_steps=\(3, 3\) must be"):
        run_train(tmp_path, batches, dict(data=8), num_steps=4, profile_steps=(3, 3))


def test_batch_size_must_fit_the_mesh(tmp_path, batches):
    with pytest.raises(train.TrainError, match=r"train.batch_size=8 must be a multiple of 16"):
        run_train(tmp_path, batches, dict(data=8), num_steps=2, accum_steps=2)


# ---------------------------------------------------------------- gin files
@pytest.fixture
def clean_gin():
    import gin

    yield
    gin.clear_config()


def _gin_model_config():
    from prealign_jax import configurables

    return configurables.bindings("train")["model"]


@pytest.mark.parametrize("model, params", [
    ("tiny", 1.57e6), ("small", 20.5e6), ("125m", 162e6), ("1b", 0.886e9), ("8b", 8.03e9)])
def test_every_model_file_composes_with_the_pretrain_run(model, params, clean_gin):
    from prealign_jax import main

    main.parse_gin(["runs/pretrain.gin", f"models/{model}.gin", "meshes/fsdp.gin"],
                   ["seqio_data.data_dir='/data'", "train.peak_flops_per_device=989e12"])
    assert model_lib.num_params(_gin_model_config()) == pytest.approx(params, rel=0.01)


@pytest.mark.parametrize("mesh", ["cpu_1", "cpu_data8", "cpu_fsdp8", "cpu_2x2x2"])
def test_cpu_demo_run_composes_with_every_cpu_mesh(mesh, clean_gin):
    import gin

    from prealign_jax import main

    main.parse_gin(["runs/cpu_demo.gin", f"meshes/{mesh}.gin"], [])
    assert _gin_model_config().d_model == 128
    sizes = [gin.query_parameter(f"MeshConfig.{a}") for a in partitioning.MESH_AXES]
    assert np.prod(sizes) == gin.query_parameter("train.num_cpu_devices")
