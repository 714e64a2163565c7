"""Shared flags and runs of the tests that run the `prealign` CLI in subprocesses."""

import os
import subprocess
import sys


def tiny_model_flags(max_len: int, vocab_size: int = 512) -> list[str]:
    """gin overrides for a decoder small enough that a CLI test trains it in seconds."""
    return [f"--gin.ModelConfig.vocab_size={vocab_size}", "--gin.ModelConfig.d_model=32",
            "--gin.ModelConfig.num_layers=2", "--gin.ModelConfig.num_heads=4",
            "--gin.ModelConfig.num_kv_heads=2", "--gin.ModelConfig.mlp_dim=64",
            f"--gin.ModelConfig.max_len={max_len}"]


def cpu_env(devices: int = 1) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def train_tiny_run(workdir, max_len: int = 128, steps: int = 30) -> None:
    """A run of the tiny model trained for `steps` on a small prepared corpus (1 device)."""
    from prealign_jax.data import prepare

    prepare.prepare(workdir=str(workdir), num_scenarios=1500, vocab_size=512,
                    vocab_documents=1500, num_shards={"train": 2, "validation": 1})
    subprocess.run([sys.executable, "-m", "prealign_jax.main", "train",
                    "--gin_file=runs/cpu_demo.gin", f"--workdir={workdir}",
                    f"--gin.train.num_steps={steps}", "--gin.train.batch_size=8",
                    f"--gin.train.checkpoint_every={steps}", "--gin.train.eval_every=0",
                    "--gin.train.peak_flops_per_device=1e10", *tiny_model_flags(max_len)],
                   check=True, env=cpu_env(), capture_output=True, timeout=900)
