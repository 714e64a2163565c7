"""Where the trainer's scalars go: clu `MetricWriter`s combined by clu's `MultiWriter`.

- TensorBoard events in `<workdir>/tensorboard` (clu's TF summary writer);
- `<workdir>/metrics.jsonl`, one JSON object per write with its "step" (`JsonlWriter`);
- a Weights & Biases run when `train.wandb_project` is set (`WandbWriter`).

Only process 0 writes. Resume: records after the restored step (written by the interrupted
run, about to be recomputed) are dropped from metrics.jsonl, so each step appears there
once. TensorBoard keeps them: TF's summary writer has no purge step, so its curves show the
recomputed steps twice (the same values, the run being exact); metrics.jsonl is the record.
Both go through TF's file layer, so the workdir may be a URL (`gs://...`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax

from prealign_jax import fileio, tf_cpu
from prealign_jax.errors import TrainError

tf_cpu.import_tf()  # clu's summary writer imports TensorFlow: keep it off accelerators
from clu import metric_writers  # noqa: E402  (after tf_cpu)


def make_writer(workdir: str, start_step: int,
                wandb_project: str | None = None) -> metric_writers.MetricWriter:
    """The run's writer (a no-op on processes other than 0); `start_step` is the restored
    step (0: a fresh run, which also drops a stale metrics.jsonl)."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    writers = [metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")),
               JsonlWriter(os.path.join(workdir, "metrics.jsonl"), start_step)]
    if wandb_project:
        writers.append(WandbWriter(wandb_project, workdir))
    return metric_writers.MultiWriter(writers)


class ScalarWriter(metric_writers.MetricWriter):
    """A MetricWriter of scalars only (all the trainer writes): other kinds are ignored."""

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None):
        pass

    def write_images(self, step: int, images: Mapping[str, Any]):
        pass

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        pass

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]):
        pass

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
        pass

    def write_hparams(self, hparams: Mapping[str, Any]):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class JsonlWriter(ScalarWriter):
    """Appends `{"step": s, name: value, ...}` lines to `path`, opened per write, so a killed
    run leaves every line it wrote. Created with the restored step, it first drops the
    lines of later steps (and a line torn by a kill mid-write). `path` may be a URL
    (`fileio`; on GCS an append rewrites the object, a cost of one small file per log)."""

    def __init__(self, path: str, start_step: int):
        self._path, self._gfile = path, fileio.gfile()
        if self._gfile.exists(path):
            with self._gfile.GFile(path) as f:
                kept = [line for line in f.read().splitlines(keepends=True)
                        if (step := _step_of(line)) is not None and step <= start_step]
            fileio.atomic_write(path, "".join(kept))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with self._gfile.GFile(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return None


class WandbWriter(ScalarWriter):
    """Scalars to a new W&B run in `project` per launch (W&B steps only grow, and a resumed
    run recomputes the steps after its checkpoint); the run is named after the workdir."""

    def __init__(self, project: str, workdir: str):
        try:
            import wandb
        except ImportError:
            raise TrainError(f"train.wandb_project={project!r} needs the wandb package "
                             "(pip install wandb), or set it to None") from None
        # (W&B keeps its files in a local directory: a workdir URL leaves it the default)
        self._run = wandb.init(project=project, dir=None if "://" in workdir else workdir,
                               name=os.path.basename(fileio.absolute(workdir).rstrip("/")))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        self._run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def close(self):
        self._run.finish()
