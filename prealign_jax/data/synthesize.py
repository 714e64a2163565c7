"""`prealign synthesize`: the corpus written by a teacher model from the scenario spec.

The driver (this module) checks the configuration and the teacher (its URL, key and
model, once, as one line), runs the Beam pipeline (`synthesis_pipeline.py`: DirectRunner
here, Dataflow / Flink / Spark at scale) into a fresh run directory of the output dir, and
commits it by writing `synthesize.json` last: the plan, the corpus files, counts, rejects
by reason, and the cost line. Older runs are then removed; the per-unit results (the
resume state, `units-<plan hash>/`) stay, so a rerun of the same plan asks the teacher only
what it has not answered. `prealign synthesize` then runs `prepare` on the corpus.

Every document records its provenance (teacher model, task id, scenario, seed, time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from typing import Sequence

from prealign_jax import console, fileio
from prealign_jax.data import generator, teacher as teacher_lib
from prealign_jax.errors import UserError

REPORT = "synthesize.json"
TEMPLATES = "templates"  # the teacher model of template-rendered documents
SPLITS = ("train", "held_out")
_HASHED = ("teacher_tasks.yaml", "scenarios.yaml", "generator.py")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to synthesize (hashed: the resume key) and how (plain, picklable)."""
    num_scenarios: int
    seed: int
    split: str
    passages: tuple[str, ...]
    scenarios_per_unit: int
    retry_invalid: int
    teacher: teacher_lib.TeacherConfig | None
    model: str  # the resolved teacher model, or TEMPLATES

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        if self.teacher:  # where the teacher runs and how hard it is pushed: not what it writes
            fields["teacher"] = {k: fields["teacher"][k] for k in (
                "api", "max_tokens", "temperature", "top_p")}
        h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
        here = os.path.dirname(os.path.abspath(__file__))
        for name in _HASHED:
            with open(os.path.join(here, name), "rb") as f:
                h.update(f.read())
        return h.hexdigest()


# ---------------------------------------------------------------- the driver
def synthesize(workdir: str | None = None, output_dir: str | None = None,
               num_scenarios: int = 1000, seed: int = 0, split: str = "train",
               passages: Sequence[str] = (), teacher: teacher_lib.TeacherConfig | None = None,
               scenarios_per_unit: int = 64, retry_invalid: int = 1, num_files: int = 4,
               dedup_threshold: float = 0.8, runner: str = "DirectRunner",
               direct_num_workers: int = 1, pipeline_options: Sequence[str] = ()) -> dict:
    """Run the pipeline into `output_dir` (default `<workdir>/synth`); returns the report.

    Args:
      num_scenarios, seed, split: the spec's scenarios to write (split "held_out": the
        held-out families, for evaluation; never mixed into training data).
      passages: real human text (files or URLs, as `prepare --from_text`) the assistant
        answers.
      teacher: the endpoint; None renders the scenarios with the template generator.
      scenarios_per_unit: scenarios a worker asks for at once (and the resume grain).
      retry_invalid: times a rejected answer is asked again with the reason (chat).
      num_files: corpus files written.
      dedup_threshold: Jaccard similarity above which documents are near duplicates.
    """
    if output_dir is None:
        if workdir is None:
            raise UserError("synthesize needs --workdir (output goes to <workdir>/synth)")
        output_dir = os.path.join(workdir, "synth")
    if split not in SPLITS:
        raise UserError(f"synthesize.split={split!r}: use one of {', '.join(SPLITS)}")
    for name, value, low in (("num_scenarios", num_scenarios, 0),
                             ("scenarios_per_unit", scenarios_per_unit, 1),
                             ("retry_invalid", retry_invalid, 0), ("num_files", num_files, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"synthesize.{name}={value!r}: give an integer >= {low}")
    if not 0 < dedup_threshold <= 1:
        raise UserError(f"synthesize.dedup_threshold={dedup_threshold}: a Jaccard "
                        "similarity in (0, 1]")
    if not num_scenarios and not passages:
        raise UserError("nothing to synthesize: give --num_scenarios > 0 or --from_text")
    if passages and teacher is None:
        raise UserError("--from_text passages are answered by a teacher: give --teacher_url "
                        "(the template generator writes scenarios only)")
    model = TEMPLATES
    if teacher is not None:
        teacher.check()
        model = teacher_lib.resolve_model(teacher)
    out = fileio.absolute(output_dir)
    plan = Plan(num_scenarios, seed, split, tuple(fileio.absolute(p) for p in passages),
                scenarios_per_unit, retry_invalid, teacher, model)
    from prealign_jax.data import beam_pipeline

    return _run(plan, out, num_files, dedup_threshold,
                beam_pipeline.runner_options(runner, direct_num_workers, pipeline_options))


def _run(plan: Plan, out: str, num_files: int, dedup_threshold: float,
         options: list[str]) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from prealign_jax.data import beam_pipeline, synthesis_pipeline

    gfile = fileio.gfile()
    digest = plan.digest()
    units_dir = os.path.join(out, f"units-{digest[:12]}")
    run = f"run-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    run_dir = os.path.join(out, run)
    console.say(f"synthesize: {plan.num_scenarios} scenarios ({plan.split}) and "
                f"{len(plan.passages)} passage files, teacher {plan.model}"
                + (f" at {plan.teacher.url} ({plan.teacher.api})" if plan.teacher else ""))
    reference = decontamination_reference(plan.seed) if plan.split == "train" else None
    start = time.perf_counter()
    try:
        with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
            synthesis_pipeline.build(pipeline, plan, run_dir, units_dir, num_files,
                                     dedup_threshold, reference)
    except Exception as e:
        if gfile.exists(run_dir):
            gfile.rmtree(run_dir)
        found = beam_pipeline.worker_error(e)
        if found:
            raise UserError(found) from None
        raise
    seconds = time.perf_counter() - start
    parts = os.path.join(run_dir, beam_pipeline.PARTS)
    stats = _read_json(os.path.join(parts, "stats.json"))
    corpus = _read_json(os.path.join(parts, "corpus.json")) \
        if gfile.exists(os.path.join(parts, "corpus.json")) else []
    gfile.rmtree(parts)
    report = {"plan": dataclasses.asdict(plan), "plan_hash": digest, "run": run,
              "corpus": [p[len(out) + 1:] for p in corpus],  # relative to the output dir
              "stats": dict(sorted(stats.items())), "seconds": round(seconds, 3),
              "units": os.path.basename(units_dir)}
    report["summary"] = summary(report)
    fileio.atomic_write(os.path.join(out, REPORT), json.dumps(report, indent=1,
                                                              sort_keys=True))
    for name in gfile.listdir(out):
        name = name.rstrip("/")
        if name.startswith("run-") and name != run:
            gfile.rmtree(os.path.join(out, name))
    console.say(cost_line(report))
    return report


def decontamination_reference(seed: int):
    """What training documents must not share (`dedup.Reference`): text specific to the
    held-out families (their template renderings, less the training families' vocabulary)
    and the evaluation's red-team prompts."""
    from prealign_jax.data import dedup, redteam

    return dedup.Reference([d.text for d in generator.generate(2000, seed, split="held_out")],
                           common=[d.text for d in generator.generate(2000, seed)],
                           verbatim=[p.text for p in redteam.PROMPTS])


def summary(report: dict) -> dict:
    s = report["stats"]
    rejects = {k.split(".", 1)[1]: v for k, v in s.items() if k.startswith("rejected.")}
    dropped = {k.split(".", 1)[1]: v for k, v in s.items() if k.startswith("dropped.")}
    answers = s.get("answers", 0)
    kept = s.get("accepted", 0) - sum(dropped.values())
    return {"answers": answers, "accepted": s.get("accepted", 0), "kept": kept,
            "failed": s.get("failed", 0), "reused": s.get("reused", 0),
            "requests": s.get("requests", 0),
            "retries": {k.split(".", 1)[1]: v for k, v in s.items() if k.startswith("retries.")},
            "prompt_tokens": s.get("prompt_tokens", 0),
            "completion_tokens": s.get("completion_tokens", 0),
            "rejects": rejects, "dropped": dropped,
            "reject_rate": round(sum(rejects.values()) / answers, 4) if answers else 0.0,
            "dedup_rate": round(sum(dropped.values()) / s["accepted"], 4)
            if s.get("accepted") else 0.0,
            "documents_per_s": round(kept / report["seconds"], 2)}


def cost_line(report: dict) -> str:
    m = report["summary"]
    retries = ", ".join(f"{k} x{v}" for k, v in sorted(m["retries"].items())) or "none"
    rejects = ", ".join(f"{k} {v}" for k, v in sorted(m["rejects"].items(),
                                                       key=lambda kv: -kv[1])) or "none"
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(m["dropped"].items())) or "none"
    return (f"synthesize: {m['requests']} requests (retried: {retries}), "
            f"{m['prompt_tokens']} prompt + {m['completion_tokens']} completion tokens; "
            f"{m['answers']} answers ({m['reused']} reused from an earlier run), "
            f"{m['accepted']} accepted, {m['failed']} failed (retried next run); "
            f"rejects: {rejects}; dedup: {dropped}; {m['kept']} documents kept in "
            f"{report['seconds']:.1f}s ({m['documents_per_s']} documents/s)")


def corpus_files(output_dir: str) -> list[str]:
    """The corpus files of the last committed run of `output_dir`."""
    report = _read_json(os.path.join(output_dir, REPORT))
    return [os.path.join(output_dir, p) for p in report["corpus"]]


def _read_json(path: str):
    with fileio.gfile().GFile(path) as f:
        return json.load(f)

