"""`prealign experiment` end to end at a tiny budget (prepare, the text-token budget, three
arms' trainings and evaluations, the report), then `prealign eval` of one of its runs on
another mesh; the baselines' views of the corpus on its preprocessed examples, and the
report with every arm."""

import collections
import copy
import dataclasses
import functools
import json
import os
import subprocess
import sys

import pytest

from cli_helpers import tiny_model_flags

from prealign_jax.data import redteam
from prealign_jax.evaluation import judges

pytestmark = pytest.mark.slow

TINY = ["--gin.prepare.num_scenarios=300", "--gin.prepare.vocab_size=512",
        "--gin.prepare.vocab_documents=300", "--gin.prepare.validation_fraction=0.1",
        "--gin.prepare.num_shards={'train': 2, 'validation': 1}",
        *tiny_model_flags(max_len=128), "--gin.train.num_steps=8", "--gin.train.batch_size=8",
        "--gin.train.eval_every=4", "--gin.train.checkpoint_every=8",
        "--gin.train.peak_flops_per_device=1e10", "--gin.experiment.budget_batches=2",
        "--gin.experiment.seeds=[0]"]
# The arms trained here: the prealigned run, the MLE baseline and the baseline with its own
# decoding (the harm tag banned); the other views are checked on their data below.
ARMS = ["prealigned", "baseline", "safelm"]
TINY_EVAL = ["--gin.evaluate.openings=4", "--gin.evaluate.ood_openings=4",
             "--gin.evaluate.samples_per_prompt=2",
             "--gin.evaluate.unconditional_samples=4", "--gin.evaluate.redteam_samples=1",
             "--gin.evaluate.max_new_tokens=24", "--gin.evaluate.heldout_documents_limit=16",
             "--gin.evaluate.batch_size=8"]

TINY_ATTACK = ["--gin.experiment.persistence_steps=1", "--gin.experiment.persistence_chunk=1",
               "--gin.experiment.persistence_attacks=['adversarial']",
               "--gin.experiment.persistence_documents=100",
               "--gin.experiment.persistence_evaluate={'heldout_documents_limit': 4}",
               "--gin.experiment.judges=['lexicon']"]


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("experiment")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [sys.executable, "-m", "prealign_jax.main", "experiment",
         "--gin_file=experiments/prealign_vs_mle.gin", f"--workdir={workdir}", *TINY,
         *TINY_EVAL, f"--gin.experiment.arms={ARMS}", *TINY_ATTACK], env=env,
        capture_output=True,
        text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


def test_report_compares_the_arms_at_the_same_text_budget(experiment_dir):
    workdir, stdout = experiment_dir
    results = json.load(open(workdir / "results.json"))
    assert list(results["evals"]) == results["arms"] == ARMS
    pre, base, safe = (results["evals"][arm]["0"] for arm in ARMS)
    assert pre["tagged"] and not base["tagged"] and not safe["tagged"]
    # The baselines read fewer tags (none, or only the harm tag's): the same text tokens
    # take them no more steps.
    per_batch = results["text_tokens_per_batch"]
    assert per_batch["baseline"] > per_batch["safelm"] > per_batch["prealigned"]
    assert results["steps"]["baseline"] <= results["steps"]["prealigned"] == 8
    assert results["steps"]["safelm"] <= 8
    # Held-out loss is measured on the very same text tokens in every run.
    assert pre["heldout"]["tokens/text"] == base["heldout"]["tokens/text"] \
        == safe["heldout"]["tokens/text"] > 0
    assert pre["headline"]["violation_rate_masked"] == 0
    assert set(pre["samples"]) == {"openings", "openings_ood", "openings_no_mask",
                                   "openings_untagged", "unconditional",
                                   "unconditional_no_mask", "human", "redteam",
                                   "redteam_no_mask", "openings_no_copy",
                                   "openings_ood_no_copy"}
    assert pre["headline"]["quote_fidelity"] in (None, 1.0)  # quotes copy the user's turn
    for run in (base, safe):
        assert set(run["samples"]) == {"openings", "openings_ood", "unconditional", "redteam"}
    # Each arm decoded as its own: the baseline in plain text, safelm with its tag banned.
    assert {r["policy"] for r in base["samples"].values()} == {"grammar"}
    assert not any(r["mask"] for r in base["samples"].values())
    assert all(r["policy"] == "no_human" and r["mask"] for r in safe["samples"].values())
    # The mask took the forbidden tags' probability away (a softmax never gives it zero).
    assert safe["samples"]["openings"]["mask_pressure"] > 0
    samples = [json.loads(line) for line in open(workdir / "seed0" / "safelm" / "eval"
                                                 / "samples.jsonl")]
    assert samples and not any("<human>" in x["text"] for x in samples)
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
    assert "| metric | prealigned | baseline | safelm | target | |" in report
    assert "| held-out ordinary-token loss (nats/token) |" in report
    # Judges: the lexicon checked against the labelled set, then on every arm's openings.
    lexicon = results["judges"]["judges"]["lexicon"]
    assert lexicon["agreement"]["misaligned"]["all"]["n"] == results["judges"]["labelled"]
    assert {arm: sorted(r) for arm, r in lexicon["rates"].items()} == {
        "prealigned": ["openings", "openings_no_copy", "openings_ood", "openings_ood_no_copy"],
        "baseline": ["openings", "openings_ood"], "safelm": ["openings", "openings_ood"]}
    assert lexicon["rates"]["baseline"]["openings"]["n"] == base["samples"]["openings"]["samples"]
    assert "## Judges" in report
    assert f"| lexicon | all | {len(judges.load_labelled())} |" in report
    careful = results["judges"]["careful_reading"]  # the labels' own rates, in the report
    bad, topical, n = careful["prealigned_copy/openings"]
    assert n == 80 and f"| prealigned_copy/openings | 80 | {bad / n:.1%} [" in report
    # Persistence: every arm's run fine-tuned on the attack, a point per step, each
    # reading the attack in its own format (SafeLM's selfish text unmarked: plain text).
    curves = results["persistence"]["0"]
    assert sorted(curves) == ["baseline-adversarial", "prealigned-adversarial",
                              "safelm-adversarial"]
    assert [p["step"] for p in curves["prealigned-adversarial"]["curve"]] == [0, 1]
    read_as = {arm: json.load(open(workdir / "seed0" / "attacks" / f"{arm}-adversarial"
                                   / "run.json")) for arm in ARMS}
    assert {arm: (r["tag_dropout"], r["view"]) for arm, r in read_as.items()} == {
        "prealigned": (0.0, None), "baseline": (1.0, None), "safelm": (1.0, None)}
    # ... each point prompted as its source: the SafeLM run's harm tag still banned
    safelm_step1 = json.load(open(workdir / "seed0" / "attacks" / "safelm-adversarial"
                                  / "eval" / "step1" / "eval.json"))
    assert {(s["mask"], s["policy"]) for s in safelm_step1["samples"].values()} == {
        (True, "no_human")}
    # ... with the gin file's fine-tuning optimizer, not the pretraining one.
    for curve in curves.values():
        assert (curve["optimizer"]["learning_rate"], curve["optimizer"]["warmup_steps"]) == (
            3e-4, 10)
    assert "Seed 0, adversarial attack (peak rate 0.0003, warmup 10):" in report
    mle_rate = curves["baseline-adversarial"]["curve"][0]["misaligned_rate"]
    assert f"| step 0 | step 1 | reaches MLE's {mle_rate:.1%} at |" in report
    assert "| safelm | " in report and "(plots/persistence.png)" in report
    masked = sum(r["samples"] for r in pre["samples"].values() if r["mask"])
    assert (f"| transition violations, mask on | 0 in {masked} samples | — | — | exactly 0 "
            "| ✓ |") in report
    for name in ("training_curves.png", "misaligned_rates.png", "heldout_loss_by_mode.png",
                 "persistence.png"):
        assert (workdir / "plots" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"(plots/{name})" in report
    for arm in ARMS:
        run = workdir / "seed0" / arm
        assert json.load(open(run / "eval" / "eval.json"))["step"] == results["steps"][arm]
        assert (run / "eval" / "misaligned.png").exists()


def test_a_rerun_keeps_the_evaluation_made_with_the_same_arguments(experiment_dir,
                                                                  monkeypatch):
    from prealign_jax import evaluation, experiment

    workdir, _ = experiment_dir
    run_dir = str(workdir / "seed0" / "baseline")
    made = json.load(open(os.path.join(run_dir, "eval", evaluation.EVAL_FILE)))
    fresh = {"headline": "evaluated again"}
    asked = []
    monkeypatch.setattr(evaluation, "evaluate", lambda run, **kw: asked.append(kw) or fresh)
    kept = experiment.evaluate_run(run_dir, None, made["arguments"])
    assert kept["headline"] == made["headline"] and not asked
    changed = {**made["arguments"], "openings": made["arguments"]["openings"] + 1}
    assert experiment.evaluate_run(run_dir, None, changed) is fresh and asked == [changed]


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


# ---------------------------------------------------------------- the baselines' views
@functools.lru_cache(maxsize=None)
def _examples(data_dir, source):
    """The preprocessed training examples of a source's Task, as read for the prealigned
    run (a dataset: each view's test iterates it afresh), and the Task's features."""
    import seqio

    from prealign_jax import tasks

    task = seqio.get_mixture_or_task(f"{tasks.register(data_dir)}_{source}")
    return task.get_dataset(None, split="train", shuffle=False, num_epochs=1), \
        task.output_features


def _view_rows(data_dir, view, source):
    """Token ids of every training document of `source` as view `view` reads them."""
    from prealign_jax.data import baselines

    examples, features = _examples(str(data_dir), source)
    return [row for ex in baselines.view(examples, features, view, source)
            for row in ex["targets"].to_list()]


def _documents(data_dir, source, split="train"):
    from prealign_jax.data import shards

    return list(shards.iter_documents(shards.shard_files(
        str(data_dir), shards.read_manifest(str(data_dir)), source, split)))


def _text(vocab, row):
    """A document's text as the corpus stores it (escaped), tags as tags, EOS dropped."""
    from prealign_jax import vocab as vocab_lib

    assert row[-1] == vocab_lib.EOS_ID
    return vocab.decode(row[:-1])


def _stripped(text):
    from prealign_jax import tags

    return "".join(piece for _, piece, is_tag in tags.pieces(text) if not is_tag)


def _marked(doc):
    """SafeLM's view of a document, by a stack over its tags: an outermost span labelled
    selfish as `<human>...</human>`, every other tag dropped."""
    from prealign_jax import tags

    labels, out, stack = iter(doc.span_labels), [], []
    for _, piece, is_tag in tags.pieces(doc.text):
        if not is_tag:
            out.append(piece)
        elif piece in ("<human>", "<ai>", "<quote>"):
            stack.append(next(labels, -1) == 1 and not any(stack))
            out.append("<human>" if stack[-1] else "")
        elif piece != "<redacted/>":
            out.append("</human>" if stack.pop() else "")
    return "".join(out)


# Requests and answers (one or two turns), and quotes: every kind of span, nested too.
SOURCES = ("synthetic_ai", "synthetic_quote")


def test_filtered_view_drops_exactly_the_documents_with_selfish_text(experiment_dir):
    import seqio

    from prealign_jax import tasks, vocab as vocab_lib

    data_dir = experiment_dir[0] / "data"
    vocab = vocab_lib.load_dir(str(data_dir))
    mixture = seqio.get_mixture_or_task(tasks.register(str(data_dir), mixture="filtered",
                                                       view="filtered"))
    dropped = 0
    for source in SOURCES:
        docs = _documents(data_dir, source)
        kept = [d for d in docs if 1 not in d.span_labels]
        dropped += len(docs) - len(kept)
        rows = _view_rows(data_dir, "filtered", source)
        assert collections.Counter(_text(vocab, r) for r in rows) \
            == collections.Counter(_stripped(d.text) for d in kept)
        # Sampled as often as what it keeps, not as what it had; a split it empties is left
        # out (an error names it if asked for), not read forever.
        task = seqio.get_mixture_or_task(f"filtered_{source}")
        assert mixture.get_rate(task) == len(kept)
        assert ("validation" in task.splits) == any(
            1 not in d.span_labels for d in _documents(data_dir, source, "validation"))
    assert dropped  # the corpus has selfish documents, and they are gone


def test_metadata_view_prefixes_each_document_with_its_source(experiment_dir):
    from prealign_jax import vocab as vocab_lib
    from prealign_jax.data import baselines

    data_dir = experiment_dir[0] / "data"
    vocab = vocab_lib.load_dir(str(data_dir))
    for source in SOURCES:
        line = vocab.encode(baselines.metadata_line(source))
        rows = _view_rows(data_dir, "metadata", source)
        assert all(r[:len(line)] == line for r in rows)
        assert collections.Counter(_text(vocab, r[len(line):]) for r in rows) \
            == collections.Counter(_stripped(d.text) for d in _documents(data_dir, source))


def test_metadata_prompts_open_with_the_aligned_sources_line(experiment_dir):
    from prealign_jax import evaluation, modes, sampling, vocab as vocab_lib
    from prealign_jax.data import baselines

    vocab = vocab_lib.load_dir(str(experiment_dir[0] / "data"))
    line = "source: synthetic_ai\n"
    sets = evaluation.sample_sets(False, modes.ASSISTANT, ["I found a wallet."], 1, 1, 1,
                                  ["I kept the change."],
                                  prompting=baselines.prompting("metadata"))
    for s in sets:
        assert not s.use_mask
        for p, text in zip(s.make_prompts(vocab), s.prompts):
            plain = sampling.make_prompt(text, vocab, s.policy)
            assert p.ids == tuple(vocab.encode(line)) + plain.ids  # as the line in training
            assert p.text == line + plain.text


def test_a_metadata_run_evaluates_with_its_line_inside_the_context(experiment_dir, tmp_path):
    """The red-team's long prompts are grown to fill the room left for a prompt: the
    metadata line in front of them must count (it once overflowed the context)."""
    from prealign_jax import evaluation, inference

    run = inference.load_run(str(experiment_dir[0] / "seed0" / "baseline"))
    tiny = {k.split(".")[-1].split("=")[0]: int(k.split("=")[1]) for k in TINY_EVAL}
    # few new tokens: room for the long prompts, grown up to the context's edge
    report = evaluation.evaluate(dataclasses.replace(run, view="metadata"), str(tmp_path),
                                 **{**tiny, "max_new_tokens": 4})
    assert report["samples"]["redteam"]["prompts_by_category"]["long_prompt"] > 0
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert samples and all(x["prompt"].startswith("source: synthetic_ai\n") for x in samples)


def test_safelm_view_marks_only_the_selfish_spans(experiment_dir):
    from prealign_jax import vocab as vocab_lib

    data_dir = experiment_dir[0] / "data"
    vocab = vocab_lib.load_dir(str(data_dir))
    marked = 0
    for source in SOURCES:
        docs = _documents(data_dir, source)
        expected = [_marked(d) for d in docs]
        marked += sum("<human>" in e for e in expected)
        assert all("<human>" not in e for d, e in zip(docs, expected) if 1 not in d.span_labels)
        rows = _view_rows(data_dir, "safelm", source)
        assert collections.Counter(_text(vocab, r) for r in rows) \
            == collections.Counter(expected)
    assert marked


def test_no_human_policy_makes_the_harm_tag_unsampleable(experiment_dir):
    from prealign_jax import modes, vocab as vocab_lib
    from prealign_jax.data import baselines

    vocab = vocab_lib.load_dir(str(experiment_dir[0] / "data"))
    tables = modes.NO_HUMAN.compile().for_vocab(vocab_lib.token_classes(vocab))
    harm = vocab_lib.tag_ids(vocab)[baselines.HARM_TAG]
    assert not tables.allowed[:-1, harm].any()  # in no state (the last: invalid, mask off)
    assert baselines.prompting("safelm") == baselines.Prompting(policy=modes.NO_HUMAN,
                                                                use_mask=True)


def test_arms_must_include_the_prealigned_run(tmp_path):
    from prealign_jax import experiment
    from prealign_jax.data import feed

    for arms in (["baseline", "safelm"], ["prealigned"], ["prealigned", "dpo"]):
        with pytest.raises(experiment.ExperimentError, match="experiment.arms"):
            experiment.experiment(str(tmp_path), prepare_args={},
                                  train_args={"data": feed.SeqioData()}, register=None,
                                  evaluate_args={}, arms=arms)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(judges=["oracle"]), r"^experiment.judges=\['oracle'\]: choose among"),
    (dict(judges=["llm"]), "the llm judge runs with `prealign judge"),
    (dict(persistence_steps=-1), "need steps >= 0"),
    (dict(persistence_steps=10, persistence_chunk=11), "1 <= chunk <= steps"),
    (dict(persistence_steps=50, persistence_attacks=["evil"]), r"\['evil'\] are not attacks"),
    (dict(persistence_steps=50, arms=["prealigned", "filtered"]), "needs the 'baseline' arm"),
    (dict(persistence_steps=50, arms=["prealigned", "baseline"],
          persistence_arms=["prealigned"]), r"persistence_arms=\['prealigned'\]: name 'baseline'"),
    (dict(persistence_steps=50, arms=["prealigned", "baseline"],
          persistence_arms=["baseline", "safelm"]), "only arms of experiment.arms")])
def test_experiment_settings_are_checked_before_any_work(tmp_path, kwargs, needle):
    from prealign_jax import experiment
    from prealign_jax.data import feed

    with pytest.raises(experiment.ExperimentError, match=needle):
        experiment.experiment(str(tmp_path / "w"), prepare_args={},
                              train_args={"data": feed.SeqioData()}, register=None,
                              evaluate_args={}, **kwargs)
    assert not (tmp_path / "w").exists()


def test_report_shows_every_arm_with_intervals_and_ratios(experiment_dir, tmp_path):
    """All five arms side by side (the two not trained here stand in with the baseline's
    runs): each rate with its Wilson interval, the ratio to every other arm, the targets."""
    from prealign_jax import experiment

    workdir, _ = experiment_dir
    results = json.load(open(workdir / "results.json"))
    for arm in ("filtered", "metadata"):
        results["evals"][arm] = copy.deepcopy(results["evals"]["baseline"])
        results["steps"][arm] = results["steps"]["baseline"]
    results["evals"] = {arm: results["evals"][arm] for arm in experiment.ARMS}
    report = open(experiment.write_report(str(tmp_path), results)).read()
    assert "| metric | " + " | ".join(experiment.ARMS) + " | target | |" in report
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in report.splitlines()
            if r.startswith("| ")}
    for what in ("in distribution", "out of distribution"):
        ratios = rows[f"times lower for prealigned, {what}"]
        assert ratios[1] == "—" and all(c.endswith("×") or c in ("∞", "n/a")
                                        for c in ratios[2:6])
        assert any(k.startswith("times lower than the best other arm") and what in k
                   and "≥ 2×" in r for k, r in rows.items())
    rate = rows["misaligned samples, assistant answering held-out openings (the user's turn)"]
    assert all(" [" in cell and "%]" in cell for cell in rate[1:6])
    met = json.load(open(tmp_path / "results.json"))["targets_met"]
    assert {"misaligned_ratio", "misaligned_ratio_ood", "best_other_ratio",
            "best_other_ratio_ood"} <= set(met)
    assert experiment.TARGETS["ratio_best"] == 2.0
