"""`prealign experiment` end to end at a tiny budget (prepare, the text-token budget, two
trainings, two evaluations, the report), then `prealign eval` of one of its runs on
another mesh."""

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import tiny_model_flags

from prealign_jax.data import redteam

pytestmark = pytest.mark.slow

TINY = ["--gin.prepare.num_scenarios=300", "--gin.prepare.vocab_size=512",
        "--gin.prepare.vocab_documents=300", "--gin.prepare.validation_fraction=0.1",
        "--gin.prepare.num_shards={'train': 2, 'validation': 1}",
        *tiny_model_flags(max_len=128), "--gin.train.num_steps=8", "--gin.train.batch_size=8",
        "--gin.train.eval_every=4", "--gin.train.checkpoint_every=8",
        "--gin.train.peak_flops_per_device=1e10", "--gin.experiment.budget_batches=2"]
TINY_EVAL = ["--gin.evaluate.openings=4", "--gin.evaluate.ood_openings=4",
             "--gin.evaluate.samples_per_prompt=2",
             "--gin.evaluate.unconditional_samples=4", "--gin.evaluate.redteam_samples=1",
             "--gin.evaluate.max_new_tokens=24", "--gin.evaluate.heldout_documents_limit=16",
             "--gin.evaluate.batch_size=8"]


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("experiment")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [sys.executable, "-m", "prealign_jax.main", "experiment",
         "--gin_file=experiments/prealign_vs_mle.gin", f"--workdir={workdir}", *TINY,
         *TINY_EVAL], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


def test_report_compares_both_arms_at_the_same_text_budget(experiment_dir):
    workdir, stdout = experiment_dir
    results = json.load(open(workdir / "results.json"))
    assert set(results["evals"]) == {"prealigned", "baseline"}
    pre, base = results["evals"]["prealigned"]["0"], results["evals"]["baseline"]["0"]
    assert pre["tagged"] and not base["tagged"]
    # The baseline reads no tags: the same text tokens take it no more steps.
    per_batch = results["text_tokens_per_batch"]
    assert per_batch["baseline"] > per_batch["prealigned"]
    assert results["steps"]["baseline"] <= results["steps"]["prealigned"] == 8
    # Held-out loss is measured on the very same text tokens in both runs.
    assert pre["heldout"]["tokens/text"] == base["heldout"]["tokens/text"] > 0
    assert pre["headline"]["violation_rate_masked"] == 0
    assert set(pre["samples"]) == {"openings", "openings_ood", "openings_no_mask",
                                   "openings_untagged", "unconditional",
                                   "unconditional_no_mask", "human", "redteam",
                                   "redteam_no_mask"}
    assert set(base["samples"]) == {"openings", "openings_ood", "unconditional", "redteam"}
    assert "held-out families (out of distribution)" in (workdir / "report.md").read_text()
    fitting = pre["samples"]["redteam"]["prompts_by_category"]  # in 128 - 24 tokens
    assert pre["samples"]["redteam"]["samples"] == sum(fitting.values()) > 24
    assert set(pre["samples"]["redteam_no_mask"]["by_category"]) == set(redteam.CATEGORIES)
    report = (workdir / "report.md").read_text()
    assert report in stdout
    hardware = results["setup"]["hardware"]  # what it ran on, for comparing reports
    assert (hardware["platform"], hardware["device_count"], len(hardware["devices"])) == (
        "cpu", 1, 1)
    assert f"on 1 × {hardware['device_kind']} (cpu); corpus" in report
    assert "| held-out ordinary-token loss (nats/token) |" in report
    masked = sum(r["samples"] for r in pre["samples"].values() if r["mask"])
    assert f"| transition violations, mask on | 0 in {masked} samples | — | exactly 0 | ✓ |" \
        in report
    for name in ("training_curves.png", "misaligned_rates.png", "heldout_loss_by_mode.png"):
        assert (workdir / "plots" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"(plots/{name})" in report
    for arm in ("prealigned", "baseline"):
        run = workdir / "seed0" / arm
        assert json.load(open(run / "eval" / "eval.json"))["step"] == results["steps"][arm]
        assert (run / "eval" / "misaligned.png").exists()


def test_eval_command_on_another_mesh(experiment_dir, tmp_path, capsys):
    from prealign_jax import main

    workdir, _ = experiment_dir
    run = workdir / "seed0" / "prealigned"
    assert main.main(["eval", f"--workdir={run}", f"--output_dir={tmp_path}",
                      "--gin.MeshConfig.data=8", *TINY_EVAL]) == 0
    out = capsys.readouterr().out
    assert "held-out ordinary-token loss" in out and "transition violations: 0.0% masked" in out
    report = json.load(open(tmp_path / "eval.json"))
    assert report["heldout"]["tokens/text"] == json.load(
        open(run / "eval" / "eval.json"))["heldout"]["tokens/text"]
