"""Multi-process training on one machine: `prealign train` as 2 processes x 4 CPU devices
(gloo collectives, jax.distributed over 127.0.0.1) against 1 process x 8 devices, on the
same mesh (fsdp=8: parameters split across the processes) and the same 2 data shards.

- the two layouts produce the same losses, step by step;
- a run saved by one layout resumes on the other with the same state *and* data position
  (each data shard's iterator is saved in its own file: the shard count is what a resume
  keeps, not the process count), so the resumed metrics equal the uninterrupted run's;
- a process that fails (a corrupt shard only it reads) ends itself with the data error
  and its peer is stopped by JAX's heartbeat check ("another task died"), instead of both
  hanging (subprocess timeouts are only a safety net: nothing here races the clock);
- a process whose peers never come is stopped after the initialization timeout, having
  said what it waited for.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import tiny_model_flags
from prealign_jax.data import shards

HEARTBEAT_S = 10
COMPARED = ("loss", "z_loss", "grad_norm", "learning_rate", "eval/loss")
COUNTED = ("tokens", "tokens/human", "tokens/ai", "tokens/quote", "tokens/tag")
MODEL = tiny_model_flags(max_len=64)


@pytest.fixture(scope="module")
def env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # conftest's 8 devices: each run sets its own count
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from prealign_jax.data import prepare

    return prepare.prepare(workdir=str(tmp_path_factory.mktemp("prepared")),
                           num_scenarios=1500, vocab_size=512, vocab_documents=1500,
                           validation_fraction=0.1, num_shards={"train": 2, "validation": 2})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(workdir, data_dir, num_steps, process=None, extra=(), init_timeout=300,
                  evaluate=False):
    """`prealign train` on the cpu_fsdp8 mesh with 2 data shards; `process` = (id, port)
    makes it process `id` of a 2-process job with 4 devices each; `evaluate`: one
    validation batch at the last step."""
    cmd = [sys.executable, "-m", "prealign_jax.main", "train",
           "--gin_file=runs/cpu_demo.gin", "--gin_file=meshes/cpu_fsdp8.gin",
           f"--workdir={workdir}", f"--gin.seqio_data.data_dir='{data_dir}'",
           "--gin.seqio_data.num_data_shards=2", f"--gin.train.num_steps={num_steps}",
           "--gin.train.batch_size=8", "--gin.train.log_every=1",
           "--gin.train.checkpoint_every=3", f"--gin.train.eval_every={num_steps}",
           "--gin.train.eval_steps=1", "--gin.train.peak_flops_per_device=1e10",
           "--gin.OptimizerConfig.warmup_steps=2", "--gin.OptimizerConfig.decay_steps=100",
           "--gin.tasks.register.shuffle_buffer_size=200", *MODEL, *extra]
    if not evaluate:
        cmd.append("--gin.seqio_data.eval_split=None")
    if process is not None:
        pid, port = process
        cmd += ["--gin.train.num_cpu_devices=4",
                f"--gin.train.distributed={{'coordinator_address': '127.0.0.1:{port}', "
                f"'num_processes': 2, 'process_id': {pid}, "
                f"'heartbeat_timeout_seconds': {HEARTBEAT_S}, "
                f"'initialization_timeout': {init_timeout}}}"]
    return cmd


def run_one(cmd, env):
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def start_two(make_cmd, env):
    port = free_port()
    return [subprocess.Popen(make_cmd((i, port)), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def run_two(make_cmd, env):
    """Both processes of a 2-process job; returns process 0's stdout and process 1's."""
    procs = start_two(make_cmd, env)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    return outs[0][0], outs[1][0]


def metrics(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().split("\n")
               if line]
    by_step = {}
    for r in records:
        by_step.setdefault(r["step"], {}).update(r)
    return by_step


def assert_same(got, want, steps):
    """Equal losses (float sums over 8 devices, reduced in another order across processes:
    equal to float32 rounding) and identical token counts (the same batches)."""
    for step in steps:
        for key in COMPARED:
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)
        for key in COUNTED:
            assert got[step][key] == want[step][key], (step, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, env):
    """1 process x 8 devices, 6 steps (checkpoints at 3 and 6, evaluation at 6)."""
    workdir = tmp_path_factory.mktemp("one_process")
    out = run_one(train_command(workdir, data_dir, 6, evaluate=True), env)
    assert "job: 1 process(es) | 8 cpu devices | devices per process: 8" in out
    return workdir, metrics(workdir)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_on_it(tmp_path, data_dir, env, reference):
    _, want = reference
    out0, out1 = run_two(lambda p: train_command(tmp_path, data_dir, 3, p), env)
    assert "job: 2 process(es) | 8 cpu devices | devices per process: 4, 4" in out0
    assert "step 3/3" in out0 and "step " not in out1  # console lines: process 0 only
    got = metrics(tmp_path)
    assert sorted(got) == [1, 2, 3]
    assert_same(got, want, [1, 2, 3])
    saved = sorted(os.listdir(tmp_path / "checkpoints" / "3" / "data"))
    assert [n for n in saved if n.endswith(".index")] == [
        "shard_0_of_2.index", "shard_1_of_2.index"]  # one per data shard, by its reader

    # 2 processes -> 1 process: same state, same data position
    out = run_one(train_command(tmp_path, data_dir, 6, evaluate=True), env)
    assert f"resumed from {tmp_path}/checkpoints/3" in out
    assert_same(metrics(tmp_path), want, [4, 5, 6])


@pytest.mark.slow
def test_one_process_run_resumes_on_two(tmp_path, data_dir, env, reference):
    workdir, want = reference
    shutil.copytree(workdir / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    out0, _ = run_two(lambda p: train_command(tmp_path, data_dir, 6, p, evaluate=True), env)
    assert f"resumed from {tmp_path}/checkpoints/3" in out0
    assert_same(metrics(tmp_path), want, [4, 5, 6])


def shard_datasets(shards):
    """Shard j of n yields rows j, j + n, j + 2n, ... (two rows per batch)."""
    from prealign_jax import tf_cpu

    tf = tf_cpu.import_tf()
    import seqio

    return {seqio.ShardInfo(j, n): tf.data.Dataset.range(j, 1000, n).batch(2).map(
        lambda x: {"x": x}) for j, n in shards}


def test_sharded_iterator_stacks_shards_in_order_and_resumes_per_shard(tmp_path):
    from prealign_jax.data import feed

    both = feed.ShardedIterator(shard_datasets([(1, 2), (0, 2)]))
    np.testing.assert_array_equal(next(both)["x"], [0, 2, 1, 3])
    both.save(str(tmp_path))
    want = next(both)["x"]
    # the same shards read by two processes, one each: their rows, in the same order
    halves = [feed.ShardedIterator(shard_datasets([(j, 2)])) for j in (0, 1)]
    for half in halves:
        half.restore(str(tmp_path))
    np.testing.assert_array_equal(np.concatenate([next(h)["x"] for h in halves]), want)


def test_resume_with_another_shard_count_names_the_binding(tmp_path):
    from prealign_jax.data import feed

    feed.ShardedIterator(shard_datasets([(0, 2), (1, 2)])).save(str(tmp_path))
    with pytest.raises(feed.FeedError, match=r"no data position for data shard 0 "
                       r"of 1; the run was saved with 2 data shards: set "
                       r"seqio_data.num_data_shards"):
        feed.ShardedIterator(shard_datasets([(0, 1)])).restore(str(tmp_path))


@pytest.mark.slow
def test_a_failed_process_stops_its_peer(tmp_path, data_dir, env):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    for entry in shards.read_manifest(str(data))["shards"]:
        if not entry["file"].endswith("/train.tfrecord-00001-of-00002"):
            continue
        shard = data / entry["file"]  # read by process 1 only
        blob = shard.read_bytes()
        shard.write_bytes(blob[:100] + bytes(200) + blob[300:])
    lone = subprocess.Popen(  # and a job whose second process never comes
        train_command(tmp_path / "lone", data_dir, 3, (0, free_port()), init_timeout=5),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = start_two(lambda p: train_command(tmp_path / "run", data, 3, p), env)
    (out0, err0), (out1, err1) = [p.communicate(timeout=240) for p in procs]
    assert procs[1].returncode == 2, out1 + err1
    assert "is missing or corrupt and the reader cannot go past it" in err1
    assert "ending it now" in err1
    assert procs[0].returncode != 0, out0 + err0
    assert "another task died" in err0  # the heartbeat stopped it, not the timeout

    _, err = lone.communicate(timeout=120)
    assert lone.returncode != 0
    assert "process 0 of 2" in err and "joining the job at 127.0.0.1" in err


def test_a_shard_without_batches_is_a_data_error():
    from prealign_jax.data import feed
    from prealign_jax.data import pipeline

    datasets = shard_datasets([(0, 2)])
    empty = {shard: ds.take(0) for shard, ds in shard_datasets([(1, 2)]).items()}
    with pytest.raises(pipeline.DataError, match=r"data shard 1 of 2 yields no batches"):
        next(feed.ShardedIterator({**datasets, **empty}))
