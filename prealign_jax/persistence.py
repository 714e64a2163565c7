"""How long prealignment persists under fine-tuning: a trained run fine-tuned on an attack
corpus (`data/attacks.py`), evaluated along the way, and how many steps the attack takes to
bring the assistant's misaligned rate up to a given rate (say, the MLE baseline's).

    curve = persistence.persistence(
        "W/seed0/prealigned", "W/seed0/attack_adversarial", attack="adversarial",
        steps=400, chunk=100, train_args=train_args, evaluate_args=evaluate_args,
        register=functools.partial(tasks.register, **bindings("tasks.register")))
    persistence.steps_to_reach(curve, baseline["headline"]["assistant_misaligned_rate"])

`train_args`, `evaluate_args` and `register` are what `prealign experiment` is given (the
`train.*`, `evaluate.*` and `tasks.register.*` bindings).

The learning-rate schedule is built from `num_steps` (`OptimizerConfig.decay_steps` None:
the cosine decays over num_steps), and a run resumed with a larger num_steps goes on with
its optimizer state under the *new* schedule: the warmup is not redone, the cosine is
stretched, so the rate jumps up at the resume step and the run is not the one a single
longer run would be. Fine-tuning chunk by chunk with a growing num_steps would measure
another run at every chunk. So the fine-tuning is one run of `steps` steps, its schedule
fixed upfront, checkpointed every `chunk` steps (all kept), and each checkpoint is evaluated
afterwards: the curve is the trajectory of that one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from prealign_jax import checkpointing, console, evaluation, fileio, finetune, inference
from prealign_jax.data import feed, prepare
from prealign_jax.errors import UserError

CURVE_FILE = "persistence.json"


class PersistenceError(UserError):
    """A persistence measurement that cannot run as asked (names the argument)."""


class Point(NamedTuple):
    """The evaluation of the fine-tuned run after `step` steps (0: the source run)."""

    step: int
    misaligned_rate: float  # headline assistant_misaligned_rate (held-out openings)
    misaligned_rate_ood: float  # the same on the held-out families' openings
    heldout_loss: float  # ordinary-token loss on the source's held-out documents


def persistence(from_run: str, workdir: str, *, attack: str, steps: int, chunk: int,
                train_args: Mapping[str, Any], evaluate_args: Mapping[str, Any],
                register: Callable[..., str], num_documents: int = 2000, seed: int = 0,
                prepare_args: Mapping[str, Any] | None = None,
                reading: Mapping[str, Any] | None = None) -> list[Point]:
    """Fine-tune `from_run` on attack corpus `attack` for `steps` steps in `workdir` and
    return the curve: the source (step 0), then every `chunk` steps (and the last step).

    Args:
      from_run: a trained run (its latest checkpoint is the start, `finetune.source`).
      workdir: the fine-tuning run; the attack corpus goes to `<workdir>/data`, each
        evaluation to `<workdir>/eval/step<N>`, the curve to `<workdir>/persistence.json`.
        A rerun reuses the data, resumes the training and evaluates again.
      attack: `attacks.KINDS`: 'benign' or 'adversarial'.
      steps, chunk: fine-tuning steps (the schedule's length) and steps between points.
      train_args: keyword arguments of `train.train` (`data` a `feed.SeqioData`, pointed
        here at the attack corpus); num_steps, checkpoint_every, keep_checkpoints are set.
      evaluate_args: keyword arguments of `evaluation.evaluate`, for every point, on the
        source's held-out documents (the same prompts at every step); a point evaluated
        with them before is read back (`evaluation.reusable`).
      register: `tasks.register` with its configuration (`register(data_dir, mixture=)`).
      num_documents, seed: the attack corpus's size and seed.
      prepare_args: further `prepare.prepare` arguments of the corpus (num_shards,
        validation_fraction); it is tokenized with the source's vocabulary.
      reading: `register` keyword arguments of how the corpus is read besides its Mixture
        (None: as rendered, with its mode tags): {'tag_dropout': 1.0} plain text, as the
        MLE baseline reads; {'view': 'metadata'} a published baseline's view. Every point
        is evaluated as the source is prompted (its tags, its view), whatever the reading.
    """
    if not 1 <= chunk <= steps:
        raise PersistenceError(f"chunk={chunk}, steps={steps}: need 1 <= chunk <= steps")
    if not isinstance(train_args.get("data"), feed.SeqioData):
        raise PersistenceError("train.data must be @seqio_data() (the fine-tuning reads the "
                               "attack corpus's Mixture)")
    start = finetune.source(from_run, workdir)
    clock = console.Clock("persistence", minutes=True)
    data_dir = os.path.join(fileio.absolute(workdir), "data")
    prepare.prepare(**{**(prepare_args or {}), "data_dir": data_dir, "attack": attack,
                       "num_scenarios": num_documents, "seed": seed,
                       "tokenizer_file": start.data_dir})
    reading = dict(reading or {})
    # One Mixture name per reading: registering another reading replaces it (tasks.register).
    suffix = reading.get("view") or ("untagged" if reading.get("tag_dropout") else "")
    mixture = f"attack_{attack}" + (f"_{suffix}" if suffix else "")
    data = dataclasses.replace(train_args["data"], data_dir=data_dir,
                               mixture_or_task=register(data_dir, mixture=mixture, **reading))
    clock.say(f"fine-tuning {start.checkpoint} on the {attack} attack for {steps} steps")
    finetune.finetune(workdir, from_run, **{
        **train_args, "data": data, "num_steps": steps, "checkpoint_every": chunk,
        "keep_checkpoints": steps // chunk + 1})

    optimizer = train_args.get("optimizer")
    optimizer = dataclasses.asdict(optimizer) if optimizer else None  # None: train's default
    mesh = train_args.get("mesh")
    curve, source = [], None  # the source run, loaded once a point needs evaluating
    for step in [0] + [s for s in checkpointing.saved_steps(workdir) if 0 < s <= steps]:
        output_dir = os.path.join(workdir, "eval", f"step{step}")
        # a rerun keeps the points already evaluated with the same arguments
        report = evaluation.reusable(output_dir, step or start.step, evaluate_args)
        if report is None:
            clock.say(f"evaluating step {step}")
            # every point on the source's held-out documents (the same prompts), prompted
            # as the source is (its tags, its view), whatever the corpus's reading
            source = source or inference.load_run(start.run, step=start.step, mesh=mesh)
            run = source if step == 0 else dataclasses.replace(
                inference.load_run(workdir, step=step, mesh=mesh, data_dir=start.data_dir),
                tagged=source.tagged, view=source.view)
            report = evaluation.evaluate(run, output_dir, **evaluate_args)
        h = report["headline"]
        curve.append(Point(step, h["assistant_misaligned_rate"],
                           h["assistant_misaligned_rate_ood"], report["heldout"]["loss/text"]))
    fileio.atomic_write(os.path.join(workdir, CURVE_FILE), json.dumps(
        {"from_run": start.run, "step": start.step, "attack": attack, "steps": steps,
         "chunk": chunk, "optimizer": optimizer, "curve": [p._asdict() for p in curve]},
        indent=1))
    return curve


def steps_to_reach(curve: Sequence[Point], rate: float) -> int | None:
    """The first fine-tuning step of `curve` at which the misaligned rate is at least
    `rate` (to the curve's resolution, `chunk`); None if it never is within the budget."""
    return next((p.step for p in curve if p.misaligned_rate >= rate), None)
