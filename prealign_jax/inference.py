"""A trained run, loaded for inference: the model, its latest parameters, the vocabulary.

A run directory holds what `prealign train` wrote: `run.json` (the model config and where
its data is: all inference needs), `checkpoints/`, and the gin config the CLI ran with
(`config.gin`, the record); the vocabulary is the data dir's. Only the parameters are
restored (not the optimizer state), directly into the shardings of the mesh given, so a
checkpoint saved on one mesh samples on another. Plain arguments: `load_run(workdir)` works
from a notebook.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from prealign_jax import (checkpointing, fileio, model as model_lib, partitioning, sampling,
                          tags, train)
from prealign_jax import vocab as vocab_lib
from prealign_jax.errors import UserError


class RunError(UserError):
    """A run directory that cannot be used for inference (names it and what to do)."""


@dataclasses.dataclass
class Run:
    model_cfg: model_lib.ModelConfig
    params: Any
    vocab: Any
    mesh: Any
    step: int
    workdir: str
    data_dir: str  # the prepared data it was trained on (vocabulary, held-out documents)
    tagged: bool  # False for a run trained without its modes (a baseline)
    view: str | None = None  # the published baseline's view it read (`data/baselines.py`)


def load_run(workdir: str, *, model_overrides: Mapping[str, Any] | None = None,
             mesh: partitioning.MeshConfig | None = None,
             data_dir: str | None = None, step: int | None = None) -> Run:
    """The parameters of `workdir` at checkpoint `step` (default: the latest), restored
    for the run's model (run.json) with `model_overrides` (fields that do not touch the
    weights, e.g. decode_chunk, attention; a shape field is refused) on `mesh` (default:
    every device on the data axis), with the vocabulary of `data_dir` (default: the
    run's)."""
    gfile, directory = fileio.gfile(), os.path.join(workdir, "checkpoints")
    steps = checkpointing.saved_steps(workdir)
    if not steps:
        raise RunError(f"--workdir={workdir}: no checkpoint in {directory}; train first "
                       f"(prealign train --workdir={workdir})")
    if step is not None and step not in steps:
        raise RunError(f"--step={step}: {directory} has no checkpoint of that step; it has "
                       f"{steps}")
    step = steps[-1] if step is None else step
    info_path = os.path.join(workdir, train.RUN_FILE)
    if not gfile.exists(info_path):
        raise RunError(f"--workdir={workdir}: no {train.RUN_FILE}; is it a run directory "
                       "written by prealign train?")
    try:
        with gfile.GFile(info_path) as f:
            info = json.loads(f.read())
        trained = model_lib.ModelConfig(**info["model"])
    except (ValueError, KeyError, TypeError) as e:  # (ConfigError is a ValueError too)
        raise RunError(f"{info_path}: not a run record prealign train wrote ({e}); rerun "
                       "prealign train --workdir on it to rewrite it") from None
    model = dataclasses.replace(trained, **(model_overrides or {}))
    changed = model_lib.weight_changes(trained, model)
    if changed:
        raise RunError(f"--workdir={workdir}: {', '.join(changed)}: the checkpoint's "
                       "parameters have the run's shapes; drop the override")
    data_dir = data_dir or info.get("data_dir") or os.path.join(workdir, "data")
    vocab = vocab_lib.load_dir(data_dir)
    device_mesh = (mesh or partitioning.MeshConfig()).make()
    params = checkpointing.read_params(
        os.path.join(directory, str(step)),
        partitioning.sharded_shapes(model_lib.abstract_params(model), device_mesh))
    return Run(model, params, vocab, device_mesh, step, workdir, data_dir,
               tagged=info.get("tag_dropout", 0.0) < 1.0 and not info.get("view"),
               view=info.get("view"))


def mode_runs(mode_names) -> str:
    """'ai x12, quote x3, ai x5': the modes of a sample, run-length encoded."""
    runs: list[list] = []
    for m in mode_names:
        if runs and runs[-1][0] == m:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    return ", ".join(f"{m} x{n}" for m, n in runs)


def well_formed(sample: sampling.Sample) -> bool | None:
    """Whether a finished sample, prompt included, is a valid document under the grammar;
    None for a sample cut off at max_new_tokens (it cannot be judged)."""
    if not sample.ended:
        return None
    try:
        tags.validate(sample.prompt + sample.text)
    except tags.TagError:
        return False
    return True
