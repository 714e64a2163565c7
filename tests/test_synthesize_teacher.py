"""`prealign synthesize` against a real teacher: the tiny demo model under `prealign serve
--tagged_content` on 127.0.0.1 (its prose is not the point, the plumbing is), reached
through a fault-injecting proxy (tests/teacher_proxy.py: 429s, 500s, stalls past the
timeout, malformed tags, a request never served). Spec -> prompts -> teacher -> vetting
-> dedup -> shards -> `prealign train` reads them; every fault counted, nothing lost, and a
rerun asks again only what failed."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from cli_helpers import WAIT_S, Server, cpu_env, tiny_model_flags, train_tiny_run

from prealign_jax import main
from prealign_jax.data import generator, scenarios, shards, synthesize

pytestmark = pytest.mark.slow

SCENARIOS = 40
PASSAGES = ("My neighbour keeps parking in my spot. I am tempted to block his car in.",
            "I found out my friend lied to me about the party. Should I tell everyone?",
            "Our team won the quiz and I want to keep the voucher. It was mostly my answers.")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    train_tiny_run(run, max_len=256, steps=300)  # enough to write closed tags now and then
    server = Server(run, "--policy=grammar", "--tagged_content", "--model_name=tiny-teacher")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def proxy(teacher):
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "teacher_proxy.py"),
                             teacher.url], stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().split(" on ")[1].strip()
    yield url
    proc.terminate()
    proc.wait(WAIT_S)


def prealign(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "prealign_jax.main", *args],
                            capture_output=True, text=True, env=cpu_env(), timeout=900)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def synthesize_flags(workdir, url, passages):
    return ["synthesize", f"--workdir={workdir}", f"--teacher_url={url}",
            "--from_text", str(passages),
            "--teacher_api=completions", f"--gin.synthesize.num_scenarios={SCENARIOS}",
            "--gin.synthesize.scenarios_per_unit=10", "--gin.TeacherConfig.max_tokens=160",
            "--gin.TeacherConfig.temperature=1.0", "--gin.TeacherConfig.timeout_s=2.0",
            "--gin.TeacherConfig.max_retries=2", "--gin.TeacherConfig.backoff_s=0.05",
            # the teacher's documents mixed with template-rendered ones
            "--gin.prepare.num_scenarios=400", "--gin.prepare.vocab_size=512",
            "--gin.prepare.num_shards={'train': 2, 'validation': 1}"]


def report(workdir):
    with open(os.path.join(workdir, "synth", synthesize.REPORT)) as f:
        return json.load(f)


def test_a_faulty_teacher_is_retried_counted_and_resumed_and_train_reads_its_shards(
        teacher, proxy, tmp_path):
    workdir, passages = tmp_path / "w", tmp_path / "passages.txt"
    passages.write_text("\n\n".join(PASSAGES) + "\n")
    out = prealign(*synthesize_flags(workdir, proxy, passages))
    first = report(workdir)
    m = first["summary"]
    briefs = sum(len(generator.briefs(0, i)) for i in range(SCENARIOS)) + len(PASSAGES)
    assert m["answers"] == briefs  # every request has a result: nothing lost
    with urllib.request.urlopen(proxy.removesuffix("/v1") + "/faults") as r:
        faults = json.load(r)
    # each transient fault was retried, and counted by its cause
    assert m["retries"]["429"] == faults["429"] > 0
    assert m["retries"]["5xx"] >= faults["500"] > 0
    assert m["retries"]["timeout"] >= faults["stall"] > 0
    # a request the teacher never serves is failed, not dropped, and retried next run
    assert m["failed"] > 0 and faults["503"] == m["failed"] * 3
    assert m["rejects"].get("malformed tags", 0) >= 1
    assert m["accepted"] >= 1 and m["requests"] > m["answers"]
    assert "synthesize: " in out.stdout and "documents/s" in out.stdout

    # the rerun, straight to the teacher: only the failed requests are asked again
    prealign(*synthesize_flags(workdir, teacher.url, passages))
    second = report(workdir)["summary"]
    assert second["reused"] == briefs - m["failed"] and second["failed"] == 0
    assert second["requests"] == m["failed"]

    # the corpus went through prepare: the teacher's documents are in the shards
    manifest = shards.read_manifest(str(workdir / "data"))
    docs = list(shards.iter_documents(os.path.join(workdir, "data", s["file"])
                                      for s in manifest["shards"]))
    taught = [d for d in docs if d.provenance
              and json.loads(d.provenance)["teacher"] == "tiny-teacher"]
    assert len(taught) == second["kept"] > 0
    assert {json.loads(d.provenance)["task"].split(".")[0] for d in taught} <= {
        "human_story", "ai_counterfactual", "ai_answer", "ai_quote", "passage_answer"}
    training = {s.name for s in scenarios.SITUATIONS}
    assert {d.situation for d in docs} - {""} <= training  # no held-out family, ever
    prealign("train", "--gin_file=runs/cpu_demo.gin", f"--workdir={workdir}",
             "--gin.train.num_steps=2", "--gin.train.batch_size=4",
             "--gin.train.checkpoint_every=2", "--gin.train.eval_every=0",
             *tiny_model_flags(128))


@pytest.mark.parametrize("flags, needle", [
    (["--teacher_url=http://127.0.0.1:9/v1"], "cannot connect"),
    (["--teacher_model=gpt-none"], "--teacher_model=gpt-none: "),
    (["--teacher_url=127.0.0.1:8000"], "--teacher_url=127.0.0.1:8000: give the API base"),
])
def test_a_teacher_the_run_cannot_use_is_one_line(teacher, tmp_path, capsys, flags, needle):
    url = [f"--teacher_url={teacher.url}"] if not flags[0].startswith("--teacher_url") else []
    assert main.main(["synthesize", f"--workdir={tmp_path / 'w'}", *url, *flags,
                      "--gin.TeacherConfig.timeout_s=2.0"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "w").exists()
