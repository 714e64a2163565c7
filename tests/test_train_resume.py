"""`prealign train` end to end, as a subprocess, on a small prepared corpus: the loss falls,
and a run killed (SIGKILL) or preempted (SIGTERM) mid-way resumes to the very same metrics
as an uninterrupted run (state *and* data position restored). The signal comes from a hook
at a fixed step (signal_after_step.py), so a loaded machine cannot make the run outrun
it."""

import json
import os
import signal
import subprocess
import sys

import pytest

from cli_helpers import tiny_model_flags

pytestmark = pytest.mark.slow

TIMING_KEYS = ("tokens/s", "mfu")
MODEL = tiny_model_flags(max_len=64)


@pytest.fixture(scope="module")
def env():
    """Subprocess environment: CPU, conftest's compilation cache."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from prealign_jax.data import prepare

    return prepare.prepare(workdir=str(tmp_path_factory.mktemp("prepared")),
                           num_scenarios=1500, vocab_size=512, vocab_documents=1500,
                           num_shards={"train": 2, "validation": 1})


def train_command(workdir, data_dir, num_steps, *, signal_after=None):
    """The CLI command; `signal_after=(signal, step, checkpoint step)`: that signal ("KILL",
    "TERM") after that step, once that checkpoint is complete."""
    program = ["-m", "prealign_jax.main"]
    if signal_after:
        name, step, saved = signal_after
        program = [os.path.join(os.path.dirname(__file__), "signal_after_step.py"), name,
                   str(step), str(workdir / "checkpoints" / str(saved))]
    return [sys.executable, *program, "train", "--gin_file=runs/cpu_demo.gin",
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


def test_loss_falls_and_interrupted_runs_resume_exactly(tmp_path, data_dir, env):
    steps = 60
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

    # SIGKILL after step 13: no warning at all; the next run resumes from step 10's save
    # and recomputes steps 11-13, whose records the killed run had written
    crashed = subprocess.run(train_command(resumed, data_dir, steps,
                                           signal_after=("KILL", 13, 10)),
                             env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    assert max(read_metrics(resumed)) == 13
    # then SIGTERM after step 23: the run saves the next step, says so and exits 143, so
    # a scheduler retries it; the retry resumes from step 24's save
    preempted = subprocess.run(train_command(resumed, data_dir, steps,
                                             signal_after=("TERM", 23, 20)),
                               env=env, capture_output=True, text=True, timeout=300)
    assert preempted.returncode == 143, preempted.stdout + preempted.stderr
    assert (f"prealign: preempted: saved step 24 to {resumed / 'checkpoints'}; rerun the "
            "same command to resume") in preempted.stderr
    assert max(read_metrics(resumed)) == 24 and (resumed / "checkpoints" / "24").is_dir()
    done = subprocess.run(train_command(resumed, data_dir, steps), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {resumed / 'checkpoints'}/24" in done.stdout
    assert read_metrics(resumed) == want  # every metric of every step, bit for bit
