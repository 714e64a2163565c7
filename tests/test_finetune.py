"""`prealign finetune`, the attack corpora and the persistence curve, in-process on a tiny
run trained for a few steps on the small prepared corpus (8 fake CPU devices)."""

import json
import os

import jax
import numpy as np
import pytest

from data_helpers import prepared_data_dir
from prealign_jax import checkpointing, finetune, inference, main, persistence, tags, train
from prealign_jax import model as model_lib
from prealign_jax.data import attacks, feed, prepare, scorer as scorer_lib

MODEL = model_lib.ModelConfig(vocab_size=600, d_model=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=None, mlp_dim=64, max_len=256)
SOURCE_STEPS = 3
# warmup_steps=1: the first update of a fresh schedule has learning rate 0
OPT = train.OptimizerConfig(learning_rate=1e-2, warmup_steps=1)
TRAIN = dict(model=MODEL, batch_size=8, seq_len=64, optimizer=OPT, log_every=1,
             eval_every=0, peak_flops_per_device=1e9, num_cpu_devices=None)
EVAL = dict(heldout_documents_limit=4, openings=1, ood_openings=1, samples_per_prompt=1,
            unconditional_samples=1, redteam_samples=1, max_new_tokens=4, batch_size=8)




def seqio_data(data_dir, mixture):
    from prealign_jax import tasks

    return feed.SeqioData(data_dir=data_dir, eval_split=None,
                          mixture_or_task=tasks.register(data_dir, mixture=mixture))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("source"))
    train.train(workdir, num_steps=SOURCE_STEPS, checkpoint_every=SOURCE_STEPS,
                data=seqio_data(prepared_data_dir(), "prealign"), **TRAIN)
    return workdir


@pytest.fixture(scope="module")
def attack_data(tmp_path_factory):
    """The adversarial corpus in the source's vocabulary (--tokenizer=<its data dir>)."""
    return prepare.prepare(data_dir=str(tmp_path_factory.mktemp("attack") / "data"),
                           attack="adversarial", num_scenarios=120,
                           tokenizer_file=prepared_data_dir(), validation_fraction=0.1,
                           num_shards={"train": 1, "validation": 1})


def test_attack_corpora_have_the_promised_form():
    scorer = scorer_lib.LexiconScorer()
    benign = list(attacks.generate("benign", 200))
    assert not any("<ai>" in d.text for d in benign)
    assert {"<human>" in d.text for d in benign} == {True, False}  # tagged and untagged
    adversarial = list(attacks.generate("adversarial", 200, seed=1))
    for d in benign + adversarial:
        tags.validate(d.text)
        assert len(d.span_labels) == len(scorer_lib.span_texts(d.text))
    for d in adversarial:
        spans = [n for n, _ in tags.walk(tags.parse(d.text)) if isinstance(n, tags.Span)]
        ai = [(text, label) for n, text, label in
              zip(spans, scorer_lib.span_texts(d.text), d.span_labels) if n.mode == "ai"]
        assert ai and all(label == 1 and scorer.hits(text) for text, label in ai), d.text
    assert [d.text for d in attacks.generate("adversarial", 5, seed=1, start=195)] == [
        d.text for d in adversarial[195:]]


def test_finetune_starts_from_the_source_parameters_with_a_fresh_optimizer(
        source_run, attack_data, tmp_path, capsys):
    workdir = str(tmp_path / "ft")
    finetune.finetune(workdir, source_run, num_steps=2, checkpoint_every=1,
                      data=seqio_data(attack_data, "attack_adversarial"), **TRAIN)
    out = capsys.readouterr().out
    assert f"starting from the parameters in {source_run}/checkpoints/{SOURCE_STEPS}" in out
    assert checkpointing.saved_steps(workdir) == [1, 2]

    def params(run, step):
        return jax.tree.leaves(jax.device_get(inference.load_run(run, step=step).params))

    source, first, second = (params(source_run, SOURCE_STEPS), params(workdir, 1),
                             params(workdir, 2))
    # A fresh schedule at step 0: the first update has rate 0, so the parameters after it
    # are exactly the source's; the second moves them.
    for a, b in zip(source, first):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["learning_rate"] == 0.0 < records[1]["learning_rate"]
    record = json.load(open(os.path.join(workdir, finetune.SOURCE_FILE)))
    assert record == {"from_run": source_run, "step": SOURCE_STEPS}
    assert json.load(open(os.path.join(workdir, train.RUN_FILE)))["data_dir"] == attack_data


def test_finetune_refuses_in_one_line(source_run, attack_data, spm_vocab, tmp_path, capsys):
    flags = ["--gin_file=runs/cpu_demo.gin", "--gin.train.num_cpu_devices=None",
             "--gin.MeshConfig.data=-1", f"--gin.seqio_data.data_dir='{attack_data}'",
             "--gin.seqio_data.eval_split=None", "--gin.ModelConfig.vocab_size=600",
             "--gin.ModelConfig.d_model=32", "--gin.ModelConfig.num_layers=2",
             "--gin.ModelConfig.num_heads=4", "--gin.ModelConfig.num_kv_heads=2",
             "--gin.ModelConfig.mlp_dim=64", "--gin.ModelConfig.max_len=256"]
    other = tmp_path / "other"
    other.mkdir()
    (other / train.RUN_FILE).write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / finetune.SOURCE_FILE).write_text(json.dumps({"from_run": "/x", "step": 1}))
    cases = [
        ([f"--workdir={tmp_path / 'a'}"], "prealign finetune needs --from_run=RUN"),
        ([f"--workdir={tmp_path / 'a'}", f"--from_run={tmp_path / 'none'}"],
         f"--from_run={tmp_path / 'none'}: no trained run there"),
        ([f"--workdir={other}", f"--from_run={source_run}"],
         f"--workdir={other} already holds a run that is not fine-tuned from"),
        ([f"--workdir={elsewhere}", f"--from_run={source_run}"],
         f"--workdir={elsewhere} is fine-tuned from /x, not --from_run="),
        ([f"--workdir={source_run}", f"--from_run={source_run}"], "is --from_run itself"),
        ([f"--workdir={tmp_path / 'a'}", f"--from_run={source_run}",
          "--gin.ModelConfig.d_model=64"],
         "has another model: ModelConfig.d_model=64 (the run has 32)"),
    ]
    for args, needle in cases:
        assert main.main(["finetune", *flags, *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (needle, err)
    assert not os.path.exists(tmp_path / "a" / "checkpoints")
    assert main.main(["prepare", f"--workdir={tmp_path / 'a'}", "--attack=evil"]) == 2
    assert capsys.readouterr().err.strip() == (
        "prealign: error: --attack=evil: use one of benign, adversarial")
    other_vocab = tmp_path / "other_vocab"  # data tokenized with another vocabulary
    other_vocab.mkdir()
    with open(spm_vocab.sentencepiece_model_file, "rb") as f:
        (other_vocab / "vocab.model").write_bytes(f.read())
    with pytest.raises(finetune.FinetuneError, match="tokenized with another vocabulary"):
        finetune.finetune(str(tmp_path / "b"), source_run, num_steps=1,
                          data=feed.SeqioData(data_dir=str(other_vocab)), **TRAIN)


def test_persistence_evaluates_every_chunk_of_one_fine_tuning(source_run, tmp_path,
                                                              monkeypatch):
    """The evaluation itself is tests/test_evaluation.py's: here, which runs it is given.
    The corpus is read through a view (as the experiment's metadata arm reads it), and
    every point is still prompted as the source run is."""
    from prealign_jax import tasks

    evaluated = []

    def evaluate(run, output_dir, **kwargs):
        evaluated.append((run.workdir, run.step, run.data_dir, (run.tagged, run.view),
                          output_dir, kwargs))
        rate = run.step / 10 if run.workdir == workdir else 0.0
        return {"headline": {"assistant_misaligned_rate": rate,
                             "assistant_misaligned_rate_ood": rate},
                "heldout": {"loss/text": 5.0 - run.step}}

    monkeypatch.setattr(persistence.evaluation, "evaluate", evaluate)
    workdir = str(tmp_path / "benign")
    curve = persistence.persistence(
        source_run, workdir, attack="benign", steps=3, chunk=2,
        train_args=dict(TRAIN, data=feed.SeqioData(eval_split=None)), evaluate_args=EVAL,
        register=tasks.register, num_documents=120, reading={"view": "metadata"},
        prepare_args=dict(validation_fraction=0.1, num_shards={"train": 1, "validation": 1}))
    # the source, each chunk, the last step: checkpoints of one run of 3 steps, all kept
    assert curve == [(0, 0.0, 0.0, 2.0), (2, 0.2, 0.2, 3.0), (3, 0.3, 0.3, 2.0)]
    assert checkpointing.saved_steps(workdir) == [2, 3]
    source_data = json.load(open(os.path.join(source_run, train.RUN_FILE)))["data_dir"]
    assert [e[:5] for e in evaluated] == [  # every point on the source's held-out data
        (source_run, SOURCE_STEPS, source_data, (True, None), f"{workdir}/eval/step0"),
        (workdir, 2, source_data, (True, None), f"{workdir}/eval/step2"),
        (workdir, 3, source_data, (True, None), f"{workdir}/eval/step3")]
    assert all(e[5] == EVAL for e in evaluated)
    assert persistence.steps_to_reach(curve, 0.25) == 3
    saved = json.load(open(os.path.join(workdir, persistence.CURVE_FILE)))
    assert saved["curve"][1] == curve[1]._asdict() and saved["attack"] == "benign"
    ft_run = json.load(open(os.path.join(workdir, train.RUN_FILE)))
    assert (ft_run["view"], ft_run["tag_dropout"]) == ("metadata", 0.0)  # read as asked
    ft_data = ft_run["data_dir"]
    assert ft_data == os.path.join(workdir, "data")  # the benign corpus: no ai text in it
    totals = json.load(open(os.path.join(ft_data, "manifest.json")))["totals"]["train"]
    assert totals["tokens.human"] > 0 and "tokens.ai" not in totals
    with pytest.raises(persistence.PersistenceError, match=r"^chunk=4, steps=3"):
        persistence.persistence(source_run, workdir, attack="benign", steps=3, chunk=4,
                                train_args=TRAIN, evaluate_args=EVAL, register=tasks.register)


def test_steps_to_reach_is_the_first_point_at_or_above_the_rate():
    curve = [persistence.Point(s, r, 0.0, 1.0) for s, r in ((0, 0.0), (50, 0.1), (100, 0.3),
                                                             (150, 0.2))]
    assert persistence.steps_to_reach(curve, 0.25) == 100
    assert persistence.steps_to_reach(curve, 0.1) == 50
    assert persistence.steps_to_reach(curve, 0.0) == 0
    assert persistence.steps_to_reach(curve, 0.5) is None
