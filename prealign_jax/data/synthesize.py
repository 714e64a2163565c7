"""`prealign synthesize`: the corpus written by a teacher model, as an Apache Beam pipeline.

    units ─ Reshuffle ─ teach ─┬─ accepted ─ dedup + decontaminate ─┬─ corpus/*.jsonl ─┐
                               ├─ rejected (reason, answer) ────────┴─ rejects/*.jsonl ─┤
                               └─ stats (requests, retries, tokens) ───────────────────┴─ parts/

- **units**: ranges of scenarios of the spec (`generator.briefs`: a scenario is one or two
  requests: a human telling, the assistant's counterfactual, an answer to a request, a
  quoted message) and files of real human passages (`--from_text`: the assistant answers
  each one). A unit's results are written to `units-<plan hash>/<unit>.jsonl` as soon as
  it is done: a rerun reuses them and asks again only what failed for a transient cause.
- **teach**: each request goes to the teacher (`teacher.py`: concurrent, rate-limited,
  retried), each answer is checked (`vetting.py`) and, rejected, asked again with the
  reason (`retry_invalid` times, chat teachers). Without a teacher, the template generator
  renders the same scenarios (the embedded default, checked the same way).
- **dedup**: exact and MinHash/LSH near duplicates, and documents sharing text with the
  held-out families or the evaluation prompts, dropped (`dedup.py`), before the split.

Every document records its provenance (teacher model, task id, scenario, seed, time).
The run commits by writing `synthesize.json` last (counts, rejects by reason, the cost
line); then `prepare` turns the corpus into shards (`documents=` its files).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import time
import zlib
from typing import Sequence

from prealign_jax import console, fileio
from prealign_jax.data import beam_pipeline, generator, records, teacher as teacher_lib
from prealign_jax.data import teacher_tasks, vetting
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


def units(plan: Plan) -> list[tuple]:
    n, size = plan.num_scenarios, plan.scenarios_per_unit
    return ([("scenarios", start, min(size, n - start)) for start in range(0, n, size)]
            + [("passages", path) for path in plan.passages])


def unit_name(unit: tuple) -> str:
    if unit[0] == "scenarios":
        return f"scenarios-{unit[1]:09d}"
    return f"passages-{zlib.crc32(unit[1].encode()):08x}"


def unit_briefs(unit: tuple, plan: Plan) -> list[teacher_tasks.Brief]:
    if unit[0] == "scenarios":
        return [b for i in range(unit[1], unit[1] + unit[2])
                for b in generator.briefs(plan.seed, i, plan.split)]
    from prealign_jax.data import ingest

    briefs = []
    for k, item in enumerate(ingest.read_input(unit[1])):
        if isinstance(item, ingest.BadRecord):
            raise ingest.IngestError(beam_pipeline.ERROR_MARKER + item.message())
        briefs.append(teacher_tasks.Brief(
            scenario_id=f"p{zlib.crc32(unit[1].encode()):08x}-{k:07d}",
            task="passage_answer", seed=plan.seed * 1_000_003 + k,
            passage=_human_text(item.text)))
    return briefs


def _human_text(tagged: str) -> str:
    from prealign_jax import tags

    return "".join(n.text() if isinstance(n, tags.Span) else n for n in tags.parse(tagged))


# ---------------------------------------------------------------- one unit
def teach_unit(unit: tuple, plan: Plan, units_dir: str) -> tuple[list[dict], dict]:
    """The results of a unit's requests (reused from an earlier run where it finished) and
    this run's teacher stats."""
    path = os.path.join(units_dir, unit_name(unit) + ".jsonl")
    done: dict[tuple, dict] = {}
    if fileio.gfile().exists(path):
        with fileio.gfile().GFile(path) as f:
            for line in f:
                r = json.loads(line)
                if r["status"] != "failed":
                    done[(r["brief"]["scenario_id"], r["brief"]["task"])] = r
    briefs = unit_briefs(unit, plan)
    todo = [b for b in briefs if (b.scenario_id, b.task) not in done]
    stats: dict = {}
    if todo:
        if plan.teacher is None:
            fresh = _rendered(todo, plan)
        else:
            fresh, stats = asyncio.run(_ask_all(todo, plan))
        done.update({(r["brief"]["scenario_id"], r["brief"]["task"]): r for r in fresh})
        results = [done[(b.scenario_id, b.task)] for b in briefs]
        fileio.gfile().makedirs(units_dir)
        fileio.atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                          for r in results))
    else:
        results = [done[(b.scenario_id, b.task)] for b in briefs]
    stats["reused"] = len(briefs) - len(todo)
    return results, stats


def _result(brief, plan: Plan, status: str, answer: str = "", attempts: int = 0,
            verdict=None, detail: str = "") -> dict:
    out = {"brief": dataclasses.asdict(brief), "status": status, "answer": answer,
           "attempts": attempts, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if isinstance(verdict, vetting.Reject):
        out.update(reason=verdict.reason, detail=verdict.detail)
    elif isinstance(verdict, vetting.Accepted):
        task = teacher_tasks.task(brief.task)
        suffix = {"human_story": "h", "ai_counterfactual": "a", "ai_answer": "r",
                  "ai_quote": "q", "passage_answer": "p"}[brief.task]
        out["document"] = dataclasses.asdict(records.Document(
            text=verdict.text, source=task.source, doc_id=f"{brief.scenario_id}-{suffix}",
            pair_id=brief.pair_id, span_labels=verdict.span_labels, situation=brief.family,
            provenance=json.dumps({"teacher": plan.model, "task": task.id,
                                   "scenario": brief.scenario_id, "seed": brief.seed,
                                   "attempts": attempts, "time": out["time"]},
                                  sort_keys=True)))
    else:
        out.update(reason=detail)
    return out


def _rendered(briefs, plan: Plan) -> list[dict]:
    """The template generator as the teacher: each brief rendered, then vetted alike."""
    out = []
    for brief in briefs:
        text = generator.render_brief(brief)
        out.append(_result(brief, plan, "done", text, 1, vetting.vet(brief, text, "stop")))
    return out


async def _ask_all(briefs, plan: Plan) -> tuple[list[dict], dict]:
    import openai

    teacher = teacher_lib.Teacher(plan.teacher, plan.model)

    async def one(brief):
        rejected = None
        for attempt in range(plan.retry_invalid + 1):
            try:
                reply = await teacher.ask(teacher_tasks.prompt(brief, plan.teacher.api,
                                                               rejected),
                                          seed=brief.seed + attempt)
            except teacher_lib.TeacherUnavailable as e:
                return _result(brief, plan, "failed", attempts=attempt + 1, detail=str(e))
            except openai.APIStatusError as e:
                if e.status_code in (401, 403, 404):  # the whole run is misconfigured
                    raise teacher_lib.TeacherError(
                        f"{beam_pipeline.ERROR_MARKER}teacher {plan.teacher.url} answered "
                        f"{e.status_code} ({_one_line(e.message)})") from None
                return _result(brief, plan, "done", attempts=attempt + 1, verdict=vetting.Reject(
                    "teacher refused the request", f"{e.status_code}: {_one_line(e.message)}"))
            verdict = vetting.vet(brief, reply.text, reply.finish_reason)
            if isinstance(verdict, vetting.Accepted) or plan.teacher.api != "chat":
                break
            rejected = (reply.text, verdict.reason + (f" ({verdict.detail})"
                                                      if verdict.detail else ""))
        return _result(brief, plan, "done", reply.text, attempt + 1, verdict)

    try:
        results = await asyncio.gather(*(one(b) for b in briefs))
    finally:
        await teacher.close()
    return list(results), dict(teacher.stats)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


# ---------------------------------------------------------------- the pipeline
class _Teach:
    """The teach stage (a DoFn's body): accepted documents keyed by their place in the
    input, tagged `rejects` and `stats`."""

    def __init__(self, plan: Plan, units_dir: str):
        self.plan, self.units_dir = plan, units_dir

    def __call__(self, indexed):
        import apache_beam as beam

        index, unit = indexed
        results, stats = teach_unit(unit, self.plan, self.units_dir)
        counts = collections.Counter(stats)
        for k, r in enumerate(results):
            counts["answers"] += 1
            if r["status"] == "failed":
                counts["failed"] += 1
                yield beam.pvalue.TaggedOutput("rejects", {**r, "reason": "teacher "
                                                           "unavailable (retried next run)"})
            elif "document" in r:
                counts["accepted"] += 1
                yield (index, k), records.Document(**{**r["document"], "span_labels": tuple(
                    r["document"]["span_labels"])})
            else:
                counts[f"rejected.{r['reason']}"] += 1
                yield beam.pvalue.TaggedOutput("rejects", r)
        yield beam.pvalue.TaggedOutput("stats", dict(counts))


def _write_jsonl(directory: str, name: str, index: int, count: int,
                 lines: Sequence[tuple]) -> str:
    path = os.path.join(directory, f"{name}-{index:05d}-of-{count:05d}.jsonl")
    fileio.gfile().makedirs(directory)
    fileio.atomic_write(path, "".join(line for _, line in sorted(lines)))
    return path


def build(pipeline, plan: Plan, out: str, units_dir: str, num_files: int,
          dedup_threshold: float, reference) -> None:
    """Add the synthesize stages to a `beam.Pipeline`; results land in `<out>/parts`."""
    import apache_beam as beam

    from prealign_jax.data import dedup

    parts = os.path.join(out, beam_pipeline.PARTS)
    taught = (pipeline | "Units" >> beam.Create(list(enumerate(units(plan))))
              | "Spread" >> beam.Reshuffle()
              | "Teach" >> beam.FlatMap(_Teach(plan, units_dir)).with_outputs(
                  "rejects", "stats", main="accepted"))
    deduped = taught.accepted | "Dedup" >> dedup.Deduplicate(
        threshold=dedup_threshold, reference=reference)
    dropped = deduped.dropped | "DroppedAsRejects" >> beam.MapTuple(
        lambda order, doc, reason, detail: {"document": dataclasses.asdict(doc),
                                            "status": "dropped", "reason": reason,
                                            "detail": detail})

    def shard_of(doc_id: str) -> int:
        return zlib.crc32(doc_id.encode()) % num_files

    _ = (deduped.kept
         | "KeyCorpus" >> beam.MapTuple(lambda order, doc: (
             shard_of(doc.doc_id), (order, records.to_json(doc) + "\n")))
         | "GroupCorpus" >> beam.GroupByKey()
         | "WriteCorpus" >> beam.MapTuple(lambda i, lines: _write_jsonl(
             os.path.join(out, "corpus"), "documents", i, num_files, list(lines)))
         | "CorpusList" >> beam.combiners.ToList()
         | "WriteCorpusList" >> beam.Map(lambda files: beam_pipeline.write_json(
             os.path.join(parts, "corpus.json"), sorted(files))))
    rejects = (taught.rejects, dropped) | "AllRejects" >> beam.Flatten()
    _ = (rejects
         | "KeyRejects" >> beam.Map(lambda r: (0, ((r.get("brief") or r["document"])[
             "scenario_id" if "brief" in r else "doc_id"], json.dumps(r, sort_keys=True)
                                                   + "\n")))
         | "GroupRejects" >> beam.GroupByKey()
         | "WriteRejects" >> beam.MapTuple(lambda i, lines: _write_jsonl(
             os.path.join(out, "rejects"), "rejects", i, 1, list(lines))))
    _ = (((taught.stats,
           rejects | "RejectReasons" >> beam.Map(
               lambda r: {f"dropped.{r['reason']}": 1} if r["status"] == "dropped" else {}))
          | "AllStats" >> beam.Flatten())
         | "SumStats" >> beam.CombineGlobally(beam_pipeline.sum_counts)
         | "WriteStats" >> beam.Map(lambda s: beam_pipeline.write_json(
             os.path.join(parts, "stats.json"), s)))


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
        raise UserError(f"--split={split}: use one of {', '.join(SPLITS)}")
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
    model = TEMPLATES
    if teacher is not None:
        teacher.check()
        model = teacher_lib.resolve_model(teacher)
    out = fileio.absolute(output_dir)
    plan = Plan(num_scenarios, seed, split, tuple(fileio.absolute(p) for p in passages),
                scenarios_per_unit, retry_invalid, teacher, model)
    return _run(plan, out, num_files, dedup_threshold,
                beam_pipeline.runner_options(runner, direct_num_workers, pipeline_options))


def _run(plan: Plan, out: str, num_files: int, dedup_threshold: float,
         options: list[str]) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from prealign_jax.data import dedup

    gfile = fileio.gfile()
    digest = plan.digest()
    units_dir = os.path.join(out, f"units-{digest[:12]}")
    run = f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    run_dir = os.path.join(out, run)
    console.say(f"synthesize: {plan.num_scenarios} scenarios ({plan.split}) and "
                f"{len(plan.passages)} passage files, teacher {plan.model}"
                + (f" at {plan.teacher.url} ({plan.teacher.api})" if plan.teacher else ""))
    reference = dedup.Reference(*decontamination_texts(plan.seed), n=dedup.REFERENCE_N) \
        if plan.split == "train" else None
    start = time.perf_counter()
    try:
        with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
            build(pipeline, plan, run_dir, units_dir, num_files, dedup_threshold, reference)
    except Exception as e:
        gfile.rmtree(run_dir) if gfile.exists(run_dir) else None
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
              "corpus": [os.path.relpath(p, out) if not out.startswith(("gs://", "ram://"))
                         else p[len(out) + 1:] for p in corpus],
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


def decontamination_texts(seed: int) -> tuple[list[str], list[str]]:
    """(reference, common): what training documents must not share — the held-out
    families rendered by the templates, and the evaluation's red-team prompts — and the
    phrasing they share with the training families (the templates' frames), which does
    not count."""
    from prealign_jax.data import redteam

    held_out = [d.text for d in generator.generate(2000, seed, split="held_out")]
    common = [d.text for d in generator.generate(2000, seed)]
    return held_out + [p.text for p in redteam.PROMPTS], common


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

