"""`prealign sample` end to end on a briefly trained run: every shipped policy yields
samples that never break it, on the training mesh and on another one."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from cli_helpers import cpu_env, train_tiny_run

from prealign_jax import tags

pytestmark = pytest.mark.slow

POLICIES = [("grammar", None, []), ("assistant", "ai", []), ("human_only", "human", []),
            ("assistant_no_quotes", "ai", ["--gin_file=policies/assistant_no_quotes.gin"])]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run trained for 30 steps on a small prepared corpus (mesh: 1 device)."""
    workdir = tmp_path_factory.mktemp("run")
    train_tiny_run(workdir, max_len=128)
    return workdir


def sample(run_dir, tmp_path, policy, mode, extra, devices=8, *more):
    """`prealign sample` on the run: in this process (8 devices, the data axis) or, for
    another device count, in a subprocess; returns stdout and the samples written."""
    out = tmp_path / f"{policy}.jsonl"
    argv = ["sample", f"--workdir={run_dir}", f"--policy={policy}",
            "--prompt=Tell me about <human>your</human> day.", "--num_samples=8",
            "--max_new_tokens=40", f"--output={out}", *extra, *more,
            *([f"--mode={mode}"] if mode else [])]
    if devices == 8:
        from prealign_jax import main

        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main.main(argv) == 0
        stdout = stdout.getvalue()
    else:
        proc = subprocess.run([sys.executable, "-m", "prealign_jax.main", *argv],
                              env=cpu_env(devices), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stdout = proc.stdout
    return stdout, [json.loads(line) for line in open(out)]


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


def test_sampling_on_another_mesh(run_dir, tmp_path):
    _, sharded = sample(run_dir, tmp_path, "assistant", "ai", [], 8, "--temperature=0")
    _, single = sample(run_dir, tmp_path, "assistant", "ai", [], 1, "--temperature=0")
    assert [s["tokens"] for s in sharded] == [s["tokens"] for s in single]


def test_unmasked_samples_follow_the_masked_ones_until_a_forbidden_token(run_dir, tmp_path):
    """Same seed, no top-p (it would rank other candidates): both runs draw the same
    Gumbel noise, so a sample without the mask equals its masked twin token for token
    unless it draws a token the policy forbids; there it leaves the policy (its state
    becomes <invalid>) and only there may it differ. The briefly trained model does draw
    forbidden tags, so some unmasked samples break the policy that the masked ones keep."""
    flags = ("--seed=3", "--temperature=1", "--top_p=1")
    _, masked = sample(run_dir, tmp_path, "assistant", "ai", [], 8, *flags)
    stdout, unmasked = sample(run_dir, tmp_path, "assistant", "ai", [], 8, "--no_mask", *flags)
    assert "mask off" in stdout and not any(u["mask"] for u in unmasked)
    broken = 0
    for m, u in zip(masked, unmasked):
        assert m["final_state"] != "<invalid>"
        d = next((i for i, (a, b) in enumerate(zip(m["tokens"], u["tokens"])) if a != b), None)
        if d is None:
            assert u["final_state"] != "<invalid>" and u["tokens"] == m["tokens"]
            continue
        assert u["final_state"] == "<invalid>"
        assert u["modes"][:d + 1].count("<invalid>") == 0, (d, u["modes"])
        assert set(u["modes"][d + 1:]) <= {"<invalid>"}, (d, u["modes"])
        try:  # the text says so too (unless the forbidden token was an early EOS)
            tags.prefix_state((u["prompt"] + u["text"]).split("</human>\n", 1)[1],
                              "assistant")
        except tags.TagError:
            broken += 1
    assert broken >= 1, [u["text"] for u in unmasked]


@pytest.mark.parametrize("args, needle", [
    (["--policy=nope"], "unknown policy 'nope'; known policies"),
    (["--prompt=<ai>x</ai><human>", "--raw_prompt"], "breaks policy 'assistant'"),
    (["--temperature=inf"], "temperature=inf: must be a finite number"),
    (["--temperature=nan"], "temperature=nan: must be a finite number"),
    (["--top_p=nan"], "top_p=nan: must be a finite number"),
    (["--top_k=100000"], "top_k=100000 exceeds the vocabulary's 512"),
    # b"caf\xe9" on the command line: Python hands it over as a lone surrogate
    ([os.fsdecode(b"--prompt=caf\xe9")], "--prompt: not valid UTF-8"),
    (["--seed=18446744073709551616"], "seed=18446744073709551616"),
    (["--num_samples=-1"], "--num_samples=-1: must be >= 1"),
    (["--output=/no/such/dir/samples.jsonl"],
     "--output=/no/such/dir/samples.jsonl: the directory /no/such/dir"),
    (["--gin.ModelConfig.vocab_size=256"], "ModelConfig.vocab_size=256 (the run has 512)"),
], ids=["policy", "raw_prompt", "temperature_inf", "temperature_nan", "top_p_nan", "top_k",
        "utf8", "seed", "num_samples", "output_dir", "vocab_size"])
def test_bad_input_is_one_line_error_before_any_sampling(run_dir, capsys, args, needle):
    """In-process (the subprocess path is test_cli's): exit 2, one line, nothing written."""
    from prealign_jax import main

    assert main.main(["sample", f"--workdir={run_dir}", *args]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.err.count("\n") == 1, captured.err
    assert "--- sample" not in captured.out
