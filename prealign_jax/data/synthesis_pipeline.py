"""The Apache Beam pipeline of `prealign synthesize` (the driver is `synthesize.py`).

    units ─ Reshuffle ─ teach ─┬─ accepted ─ Deduplicate ─┬─ kept ── corpus/documents-*.jsonl
                               │                          └─ dropped ─┐
                               ├─ rejected ───────────────────────────┴─ rejects/*.jsonl
                               └─ stats (answers, requests, retries, tokens) ─ parts/stats.json

- **units**: ranges of scenarios of the spec (`generator.briefs`: one or two requests
  each) and files of real human passages (the assistant answers each one). A unit's
  results go to `units-<plan hash>/<unit>.jsonl` as soon as it is done, whole: a rerun
  reuses them and asks again only what failed for a transient cause.
- **teach**: a unit's requests go to the teacher at once (`teacher.py`: concurrent,
  rate-limited, retried); each answer is checked (`vetting.py`) and, rejected, asked again
  with the reason (`retry_invalid` times, chat teachers). Without a teacher the template
  generator renders the same briefs, checked the same way.
- **dedup**: `dedup.Deduplicate` drops exact and near duplicates and documents sharing text
  with the held-out families or the evaluation prompts, before prepare splits the corpus.
Corpus and rejects are JSONL, sorted by their place in the input (a rerun writes the same
files); paths are URLs through `tf.io.gfile`, as in `beam_pipeline.py`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import time
import zlib
from typing import Sequence

import apache_beam as beam

from prealign_jax import fileio
from prealign_jax.data import beam_pipeline, dedup, generator, ingest, records, teacher_tasks
from prealign_jax.data import teacher as teacher_lib, vetting

_SUFFIX = {"human_story": "h", "ai_counterfactual": "a", "ai_answer": "r", "ai_quote": "q",
           "passage_answer": "p"}


def units(plan) -> list[tuple]:
    n, size = plan.num_scenarios, plan.scenarios_per_unit
    return ([("scenarios", start, min(size, n - start)) for start in range(0, n, size)]
            + [("passages", path) for path in plan.passages])


def unit_name(unit: tuple) -> str:
    if unit[0] == "scenarios":
        return f"scenarios-{unit[1]:09d}"
    return f"passages-{zlib.crc32(unit[1].encode()):08x}"


def unit_briefs(unit: tuple, plan) -> list[tuple[teacher_tasks.Brief, str | None]]:
    """The unit's requests, each with the template generator's answer (None for a
    passage: only a teacher answers real text)."""
    if unit[0] == "scenarios":
        return [pair for i in range(unit[1], unit[1] + unit[2])
                for pair in generator.briefs(plan.seed, i, plan.split)]
    briefs = []
    for k, item in enumerate(ingest.read_input(unit[1])):
        if isinstance(item, ingest.BadRecord):
            raise ingest.IngestError(beam_pipeline.ERROR_MARKER + item.message())
        scenario_id = f"p{zlib.crc32(unit[1].encode()):08x}-{k:07d}"
        briefs.append((teacher_tasks.Brief(
            scenario_id=scenario_id, task="passage_answer",
            seed=zlib.crc32(f"{plan.seed}/{scenario_id}".encode()),
            passage=_human_text(item.text)), None))
    return briefs


def _human_text(tagged: str) -> str:
    from prealign_jax import tags

    return "".join(n.text() if isinstance(n, tags.Span) else n for n in tags.parse(tagged))


# ---------------------------------------------------------------- one unit
def teach_unit(unit: tuple, plan, units_dir: str) -> tuple[list[dict], dict]:
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
    pairs = unit_briefs(unit, plan)
    briefs = [b for b, _ in pairs]
    todo = [(b, t) for b, t in pairs if (b.scenario_id, b.task) not in done]
    stats: dict = {}
    if todo:
        if plan.teacher is None:
            fresh = [_result(b, plan, "done", t, 1, vetting.vet(b, t, "stop")) for b, t in todo]
        else:
            fresh, stats = asyncio.run(_ask_all([b for b, _ in todo], plan))
        done.update({(r["brief"]["scenario_id"], r["brief"]["task"]): r for r in fresh})
        results = [done[(b.scenario_id, b.task)] for b in briefs]
        fileio.gfile().makedirs(units_dir)
        fileio.atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                          for r in results))
    else:
        results = [done[(b.scenario_id, b.task)] for b in briefs]
    stats["reused"] = len(briefs) - len(todo)
    return results, stats


def _result(brief, plan, status: str, answer: str = "", attempts: int = 0,
            verdict=None, detail: str = "") -> dict:
    out = {"brief": dataclasses.asdict(brief), "status": status, "answer": answer,
           "attempts": attempts, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if isinstance(verdict, vetting.Reject):
        out.update(reason=verdict.reason, detail=verdict.detail)
    elif isinstance(verdict, vetting.Accepted):
        task = teacher_tasks.task(brief.task)
        suffix = _SUFFIX[brief.task]
        out["document"] = dataclasses.asdict(records.Document(
            text=verdict.text, source=task.source, doc_id=f"{brief.scenario_id}-{suffix}",
            pair_id=brief.pair_id, span_labels=verdict.span_labels, situation=brief.family,
            provenance=json.dumps({"teacher": plan.model, "task": task.id,
                                   "scenario": brief.scenario_id, "seed": brief.seed,
                                   "attempts": attempts, "time": out["time"]},
                                  sort_keys=True)))
    else:  # failed for a transient cause: asked again by the next run
        out.update(reason="teacher unavailable", detail=detail)
    return out


async def _ask_all(briefs, plan) -> tuple[list[dict], dict]:
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

    def __init__(self, plan, units_dir: str):
        self.plan, self.units_dir = plan, units_dir

    def __call__(self, indexed):
        index, unit = indexed
        results, stats = teach_unit(unit, self.plan, self.units_dir)
        counts = collections.Counter(stats)
        for k, r in enumerate(results):
            counts["answers"] += 1
            if r["status"] == "failed":
                counts["failed"] += 1
                yield beam.pvalue.TaggedOutput("rejects", r)
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


def build(pipeline, plan, out: str, units_dir: str, num_files: int,
          dedup_threshold: float, reference) -> None:
    """Add the synthesize stages to a `beam.Pipeline`; results land in `<out>/parts`."""
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

    def shard_of(key: str) -> int:
        return zlib.crc32(key.encode()) % num_files

    def reject_line(r: dict) -> tuple:
        key = r["brief"]["scenario_id"] + "/" + r["brief"]["task"] if "brief" in r \
            else r["document"]["doc_id"]
        return shard_of(key), (key, json.dumps(r, sort_keys=True) + "\n")

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
         | "KeyRejects" >> beam.Map(reject_line)
         | "GroupRejects" >> beam.GroupByKey()
         | "WriteRejects" >> beam.MapTuple(lambda i, lines: _write_jsonl(
             os.path.join(out, "rejects"), "rejects", i, num_files, list(lines))))
    _ = (((taught.stats,
           rejects | "RejectReasons" >> beam.Map(
               lambda r: {f"dropped.{r['reason']}": 1} if r["status"] == "dropped" else {}))
          | "AllStats" >> beam.Flatten())
         | "SumStats" >> beam.CombineGlobally(beam_pipeline.sum_counts)
         | "WriteStats" >> beam.Map(lambda s: beam_pipeline.write_json(
             os.path.join(parts, "stats.json"), s)))
