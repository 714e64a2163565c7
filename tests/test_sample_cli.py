"""`prealign sample` end to end on a briefly trained run: every shipped policy yields
samples that never break it, on the training mesh and on another one."""

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import tiny_model_flags

from prealign_jax import tags

pytestmark = pytest.mark.slow

MODEL = tiny_model_flags(max_len=128)
POLICIES = [("grammar", None, []), ("assistant", "ai", []), ("human_only", "human", []),
            ("assistant_no_quotes", "ai", ["--gin_file=policies/assistant_no_quotes.gin"])]


def env(devices=1):
    e = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return e


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run trained for 30 steps on a small prepared corpus (mesh: 1 device)."""
    from prealign_jax.data import prepare

    workdir = tmp_path_factory.mktemp("run")
    prepare.prepare(workdir=str(workdir), num_scenarios=1500, vocab_size=512,
                    vocab_documents=1500, num_shards={"train": 2, "validation": 1})
    subprocess.run([sys.executable, "-m", "prealign_jax.main", "train",
                    "--gin_file=runs/cpu_demo.gin", f"--workdir={workdir}",
                    "--gin.train.num_steps=30", "--gin.train.batch_size=8",
                    "--gin.train.checkpoint_every=30", "--gin.train.eval_every=0",
                    "--gin.train.peak_flops_per_device=1e10", *MODEL],
                   check=True, env=env(), capture_output=True, timeout=900)
    return workdir


def sample(run_dir, tmp_path, policy, mode, extra, devices=1, *more):
    out = tmp_path / f"{policy}.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "prealign_jax.main", "sample", f"--workdir={run_dir}",
         f"--policy={policy}", "--prompt=Tell me about <human>your</human> day.",
         "--num_samples=8", "--max_new_tokens=40", f"--output={out}", *extra, *more,
         *([f"--mode={mode}"] if mode else [])],
        env=env(devices), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [json.loads(line) for line in open(out)]


@pytest.mark.parametrize("policy, mode, extra", POLICIES)
def test_every_shipped_policy_holds(run_dir, tmp_path, policy, mode, extra):
    stdout, samples = sample(run_dir, tmp_path, policy, mode, extra)
    assert f"policy {policy} | mask on" in stdout and len(samples) == 8
    policy_obj = None
    if extra:
        from prealign_jax import modes

        policy_obj = modes.Policy("assistant_no_quotes", (
            "doc text -> doc", "doc <ai> -> ai", "ai text -> ai", "ai </ai> -> closed",
            "closed eos -> closed"), state_modes={"closed": "doc"})
    for s in samples:
        text = s["prompt"] + s["text"]
        if mode == "ai":  # the user's turn is context; the policy governs what follows it
            assert text.startswith("<human>Tell me about ")
            text = text.split("</human>\n", 1)[1]
        tags.prefix_state(text, policy_obj or policy)  # raises on any forbidden tag
        if s["ended"]:
            tags.validate(text, policy_obj or policy)
            assert s["well_formed"]
        assert "<human>your" not in s["prompt"]  # the typed tags were escaped


def test_sampling_on_another_mesh_and_unmasked(run_dir, tmp_path):
    _, sharded = sample(run_dir, tmp_path, "assistant", "ai", [], 8, "--gin.MeshConfig.data=8",
                        "--temperature=0")
    _, single = sample(run_dir, tmp_path, "assistant", "ai", [], 1, "--temperature=0")
    assert [s["tokens"] for s in sharded] == [s["tokens"] for s in single]
    stdout, _ = sample(run_dir, tmp_path, "assistant", "ai", [], 1, "--no_mask")
    assert "mask off" in stdout


def test_bad_policy_and_prompt_are_one_line_errors(run_dir):
    for args, needle in ((["--policy=nope"], "unknown; known policies"),
                         (["--prompt=<ai>x</ai><human>", "--raw_prompt"],
                          "breaks policy 'assistant'"),
                         (["--temperature=inf"], "temperature=inf: must be a finite number"),
                         (["--temperature=nan"], "temperature=nan: must be a finite number"),
                         (["--top_p=nan"], "top_p=nan: must be a finite number")):
        proc = subprocess.run([sys.executable, "-m", "prealign_jax.main", "sample",
                               f"--workdir={run_dir}", *args], env=env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
