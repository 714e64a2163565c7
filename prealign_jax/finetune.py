"""`prealign finetune`: a new run that starts from a trained run's parameters, with its own
data and a fresh optimizer (T5X's initialize_from).

    prealign prepare --workdir=NEW --tokenizer=RUN/data --attack=adversarial \
        --gin_file=data/cpu_demo.gin --gin.prepare.num_scenarios=2000
    prealign finetune --from_run=RUN --workdir=NEW --gin_file=runs/cpu_demo.gin \
        --gin.train.num_steps=200 [more gin files and overrides]

The new run is an ordinary training run (`train.train`, with every `train.*` binding:
num_steps, the optimizer and its learning-rate schedule, the data; checkpoints, metrics
and resume exactly as in training) whose starting point is the parameters of the source's
latest checkpoint; the source's optimizer state, step and data position are not read, so
it starts at step 0 with a warmup of its own. `finetune.json` beside run.json records the
source (run, step): a rerun resumes the new run (or, before its first checkpoint, starts
again from that same step, even if the source has trained on since).

Refused in one line: a source without checkpoints or run.json, a model whose shape differs
from the source's (run.json), fine-tuning data in another vocabulary than the source's,
and a NEW workdir holding another run (trained from scratch, or fine-tuned from another
source).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from prealign_jax import checkpointing, fileio, model as model_lib, train, vocab as vocab_lib
from prealign_jax.data import feed
from prealign_jax.errors import UserError

SOURCE_FILE = "finetune.json"  # the source (run, step) of a fine-tuned run, beside run.json


class FinetuneError(UserError):
    """A fine-tuning that cannot start as asked (names the flag or binding)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a fine-tuned run starts: `run`'s checkpoint of `step`."""

    run: str  # absolute path
    step: int
    model: model_lib.ModelConfig  # the source's (run.json)
    data_dir: str  # the source's data (its vocabulary)

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.run, "checkpoints", str(self.step))


def source(from_run: str, workdir: str) -> Source:
    """The starting point of fine-tuning `workdir` from `from_run`: the step `workdir`'s
    finetune.json records (a rerun), else the source's latest checkpoint. Raises
    `FinetuneError` for a missing source or a `workdir` holding another run."""
    gfile = fileio.gfile()
    run, workdir = fileio.absolute(from_run), fileio.absolute(workdir)
    if run.rstrip("/") == workdir.rstrip("/"):
        raise FinetuneError(f"--workdir={workdir} is --from_run itself; fine-tune into a new "
                            "--workdir")
    steps = checkpointing.saved_steps(run)
    info_path = os.path.join(run, train.RUN_FILE)
    if not steps or not gfile.exists(info_path):
        raise FinetuneError(f"--from_run={from_run}: no trained run there (no checkpoint or "
                            f"no {train.RUN_FILE}); give the --workdir of a prealign train run")
    try:
        with gfile.GFile(info_path) as f:
            info = json.loads(f.read())
        model = model_lib.ModelConfig(**info["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"--from_run={from_run}: {info_path} is not a run record prealign "
                            f"train wrote ({e})") from None
    data_dir = info.get("data_dir") or os.path.join(run, "data")
    record_path = os.path.join(workdir, SOURCE_FILE)
    if gfile.exists(record_path):
        with gfile.GFile(record_path) as f:
            record = json.loads(f.read())
        if record["from_run"] != run:
            raise FinetuneError(f"--workdir={workdir} is fine-tuned from {record['from_run']}, "
                                f"not --from_run={from_run}; use a new --workdir")
        if record["step"] not in steps and not checkpointing.saved_steps(workdir):
            raise FinetuneError(f"--workdir={workdir} starts from {run}/checkpoints/"
                                f"{record['step']}, which is gone; use a new --workdir")
        return Source(run, record["step"], model, data_dir)
    if checkpointing.saved_steps(workdir) or gfile.exists(os.path.join(workdir, train.RUN_FILE)):
        raise FinetuneError(f"--workdir={workdir} already holds a run that is not fine-tuned "
                            f"from --from_run={from_run}; use a new --workdir")
    return Source(run, steps[-1], model, data_dir)


def finetune(workdir: str, from_run: str, *, model: model_lib.ModelConfig, data,
             run_files: Mapping[str, str] | None = None, **train_args: Any) -> dict[str, float]:
    """Train the run `workdir` from `from_run`'s parameters (`source`): `train.train`'s
    arguments (`model` must have the source's shape; `data` in the source's vocabulary,
    checked for a `feed.SeqioData`). Returns the metrics of the last log window."""
    start = source(from_run, workdir)
    changed = model_lib.weight_changes(start.model, model)
    if changed:
        raise FinetuneError(f"--from_run={from_run} has another model: {', '.join(changed)}; "
                            "fine-tune with the source run's model (its run.json)")
    if isinstance(data, feed.SeqioData):
        _check_vocabulary(start, data.resolved_data_dir(workdir))
    record = json.dumps({"from_run": start.run, "step": start.step}, indent=1)
    return train.train(workdir, model=model, data=data, initialize_from=start.checkpoint,
                       run_files={SOURCE_FILE: record, **(run_files or {})}, **train_args)


def _check_vocabulary(start: Source, data_dir: str) -> None:
    """Refuse data tokenized with another vocabulary than the source's (other token ids)."""
    def read(path):
        with fileio.gfile().GFile(path, "rb") as f:
            return f.read()

    theirs = vocab_lib.find(start.data_dir)
    if read(vocab_lib.find(data_dir)) != read(theirs):
        raise FinetuneError(f"{data_dir} is tokenized with another vocabulary than "
                            f"--from_run's ({theirs}); prepare it in the run's token ids: "
                            f"prealign prepare --tokenizer={start.data_dir} ...")
