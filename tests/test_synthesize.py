"""`prealign synthesize` without a teacher: the template generator writes the spec's
scenarios through the same pipeline (vetting, dedup, provenance, resume) into a corpus
that `prepare` shards. On TF's `ram://` filesystem, as on `gs://`. The teacher itself is
tested against a real server in test_synthesize_teacher.py."""

import json
import os
import uuid

import pytest

from prealign_jax import fileio
from prealign_jax.data import prepare, records, scenarios, shards, synthesize, teacher_tasks
from prealign_jax.errors import UserError

TRAIN = {s.name for s in scenarios.SITUATIONS}
HELD_OUT = {s.name for s in scenarios.HELD_OUT_SITUATIONS}


def read_corpus(out):
    docs = []
    for path in synthesize.corpus_files(out):
        with fileio.gfile().GFile(path) as f:
            docs += [records.from_json(line) for line in f]
    return docs


def read_rejects(out):
    report = json.loads(fileio.gfile().GFile(os.path.join(out, synthesize.REPORT)).read())
    rejects = os.path.join(out, report["run"], "rejects")
    lines = []
    for name in fileio.gfile().listdir(rejects):
        with fileio.gfile().GFile(os.path.join(rejects, name)) as f:
            lines += [json.loads(line) for line in f]
    return lines


@pytest.fixture(scope="module")
def synthesized():
    out = f"ram://{uuid.uuid4().hex}/synth"
    return out, synthesize.synthesize(output_dir=out, num_scenarios=300, scenarios_per_unit=64)


def test_the_templates_write_a_vetted_deduplicated_corpus_with_provenance(synthesized):
    out, report = synthesized
    s = report["summary"]
    assert s["answers"] > 300 and s["accepted"] == s["answers"] and s["failed"] == 0
    assert s["requests"] == 0 and s["reused"] == 0
    docs = read_corpus(out)
    assert len(docs) == s["kept"] == s["accepted"] - sum(s["dropped"].values())
    assert len({d.doc_id for d in docs}) == len(docs)
    ids = {t.id for t in teacher_tasks.load()[1].values()}
    for doc in docs:
        provenance = json.loads(doc.provenance)
        assert provenance["teacher"] == synthesize.TEMPLATES and provenance["task"] in ids
        assert doc.doc_id.startswith(provenance["scenario"] + "-")
        assert doc.situation in TRAIN  # held-out families never enter the training corpus
    # every document dropped is in the rejects side output, with its reason and detail
    dropped = [r for r in read_rejects(out) if r["status"] == "dropped"]
    assert len(dropped) == sum(s["dropped"].values()) and all(r["detail"] for r in dropped)
    assert "synthesize: 0 requests" in synthesize.cost_line(report)


def test_a_rerun_reuses_every_answer_and_writes_the_same_corpus(synthesized):
    out, report = synthesized
    before = read_corpus(out)
    again = synthesize.synthesize(output_dir=out, num_scenarios=300, scenarios_per_unit=64)
    assert again["summary"]["reused"] == report["summary"]["answers"]
    assert again["plan_hash"] == report["plan_hash"] and again["run"] != report["run"]
    assert read_corpus(out) == before
    # one committed run: older run directories are removed
    assert sum(n.startswith("run-") for n in fileio.gfile().listdir(out)) == 1


def test_prepare_shards_the_corpus_keeping_provenance(synthesized):
    out, report = synthesized
    data_dir = out.replace("/synth", "/data")
    prepare.prepare(data_dir=data_dir, num_scenarios=0, vocab_size=512,
                    vocab_documents=400, documents=synthesize.corpus_files(out))
    manifest = shards.read_manifest(data_dir)
    assert sum(c["documents"] for c in manifest["totals"].values()) == report["summary"]["kept"]
    docs = list(shards.iter_documents(os.path.join(data_dir, s["file"])
                                      for s in manifest["shards"]))
    by_id = {d.doc_id: d for d in read_corpus(out)}
    assert {d.doc_id for d in docs} == set(by_id)
    assert all(d == by_id[d.doc_id] for d in docs)
    # both documents of a counterfactual pair land in the same split
    split_of = {d.doc_id: s["split"] for s in manifest["shards"]
                for d in shards.iter_documents([os.path.join(data_dir, s["file"])])}
    pairs = {}
    for doc_id, split in split_of.items():
        pairs.setdefault(doc_id.rsplit("-", 1)[0], set()).add(split)
    assert all(len(splits) == 1 for splits in pairs.values())


def test_the_held_out_split_writes_only_held_out_families(tmp_path):
    report = synthesize.synthesize(output_dir=str(tmp_path), num_scenarios=40,
                                   split="held_out")
    docs = read_corpus(str(tmp_path))
    assert len(docs) == report["summary"]["kept"] > 30
    assert {d.situation for d in docs} <= HELD_OUT


@pytest.mark.parametrize("kwargs, needle", [
    (dict(split="test"), "synthesize.split='test'"),
    (dict(num_scenarios=0), "nothing to synthesize"),
    (dict(passages=("x.txt",)), "answered by a teacher"),
    (dict(dedup_threshold=1.5), "dedup_threshold"),
    (dict(scenarios_per_unit=0), "scenarios_per_unit"),
    (dict(runner="NoSuchRunner"), "--runner=NoSuchRunner"),
])
def test_bad_settings_are_one_line_errors(tmp_path, kwargs, needle):
    with pytest.raises(UserError, match=needle) as e:
        synthesize.synthesize(output_dir=str(tmp_path / "s"), **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists()


def test_a_line_that_is_not_a_document_record_is_a_bad_record(synthesized, tmp_path):
    out, _ = synthesized
    path = tmp_path / "docs.jsonl"
    with fileio.gfile().GFile(synthesize.corpus_files(out)[0]) as f:
        good = f.read().splitlines()[:20]
    path.write_text("\n".join(good[:10] + ['{"text": "<human>hi</human>"}'] + good[10:]) + "\n")
    with pytest.raises(UserError, match=r"docs.jsonl:11: not a document record"):
        prepare.prepare(data_dir=str(tmp_path / "d"), num_scenarios=0, vocab_size=512,
                        documents=[str(path)])
    prepare.prepare(data_dir=str(tmp_path / "d"), num_scenarios=0, vocab_size=512,
                    documents=[str(path)], bad_records="skip")
    manifest = shards.read_manifest(str(tmp_path / "d"))
    [(source, reasons)] = manifest["bad_records"].items()
    assert list(reasons.values())[0]["count"] == 1
    assert sum(c["documents"] for c in manifest["totals"].values()) == 20
