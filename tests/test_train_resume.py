"""`prealign train` end to end, as a subprocess, on a small prepared corpus: the loss falls,
and a run killed (SIGKILL) mid-way resumes to the very same metrics as an uninterrupted run
(state *and* data position restored). SIGTERM is tested in-process in test_train.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import tiny_model_flags

pytestmark = pytest.mark.slow

TIMING_KEYS = ("tokens/s", "mfu")
MODEL = tiny_model_flags(max_len=64)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: CPU, a compilation cache shared by the runs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from prealign_jax.data import prepare

    return prepare.prepare(workdir=str(tmp_path_factory.mktemp("prepared")),
                           num_scenarios=1500, vocab_size=512, vocab_documents=1500,
                           num_shards={"train": 2, "validation": 1})


def train_command(workdir, data_dir, num_steps):
    return [sys.executable, "-m", "prealign_jax.main", "train", "--gin_file=runs/cpu_demo.gin",
            f"--workdir={workdir}", f"--gin.seqio_data.data_dir='{data_dir}'",
            f"--gin.train.num_steps={num_steps}", "--gin.train.batch_size=8",
            "--gin.train.log_every=1", "--gin.train.checkpoint_every=10",
            "--gin.train.eval_every=0", "--gin.train.peak_flops_per_device=1e10",
            "--gin.OptimizerConfig.warmup_steps=5", "--gin.OptimizerConfig.decay_steps=100",
            "--gin.seqio_data.eval_split=None", "--gin.tasks.register.shuffle_buffer_size=500",
            *MODEL]


def read_metrics(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records}


def interrupt(cmd, env, ready, sig):
    """Start a run, send `sig` once `ready()` holds; return (exit code, output)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the run did not get there in time"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_loss_falls_and_interrupted_runs_resume_exactly(tmp_path, data_dir, env):
    steps = 60  # tiny steps take ~20 ms: leave room for the signals' latency
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = subprocess.run(train_command(straight, data_dir, steps), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    want = read_metrics(straight)
    assert sorted(want) == list(range(1, steps + 1))
    # the loss falls on the real corpus, and every mode's tokens are measured
    assert want[steps]["loss"] < want[1]["loss"] - 1.0
    for group in ("human", "ai", "quote", "tag"):  # (documents outrun 64 tokens: no EOS)
        assert sum(m[f"tokens/{group}"] for m in want.values()) > 0
    assert f"train.num_steps = {steps}" in (straight / "config.gin").read_text()

    cmd = train_command(resumed, data_dir, steps)
    # SIGKILL: no warning at all; the next run resumes from the latest finished save
    code, out = interrupt(cmd, env, lambda: (resumed / "checkpoints" / "10").is_dir()
                          and max(read_metrics(resumed), default=0) >= 13, signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    assert max(read_metrics(resumed)) < steps
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout
    assert read_metrics(resumed) == want  # every metric of every step, bit for bit
