"""The corpus report: exact counts on hand-made documents, merge equivalence, the KMV
estimate within its stated error, determinism across processes, and a real Beam pipeline."""

import json
import os
import subprocess
import sys

import apache_beam as beam
import numpy as np
from apache_beam.testing.util import assert_that, equal_to

from prealign_jax.data.report import CorpusReport, DocStats, format_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _doc(tokens, source="synthetic_human", split="train", situation="", modes=None):
    tokens = np.asarray(tokens, np.int32)
    return DocStats(source, split, situation, tokens, modes or {"doc": len(tokens)})


def _combine(docs, fn=None):
    fn = fn or CorpusReport()
    acc = fn.create_accumulator()
    for d in docs:
        acc = fn.add_input(acc, d)
    return fn.extract_output(acc)


def _random_docs(n, seed, vocab=50):
    rng = np.random.default_rng(seed)
    return [_doc(rng.integers(0, vocab, rng.integers(0, 60)),
                 source=("synthetic_human", "ingested")[i % 2],
                 split="validation" if i % 5 == 0 else "train",
                 situation=f"s{rng.integers(0, 6)}" if i % 3 else "",
                 modes={"human": i % 7, "ai": 2 * i, "tags": 3})
            for i in range(n)]


def _true_distinct(docs, n, split="train"):
    grams = {tuple(d.tokens[i:i + n]) for d in docs if d.split == split
             for i in range(len(d.tokens) - n + 1)}
    return len(grams)


def test_hand_made_counts_percentiles_and_uniqueness():
    a = list(range(1, 6))  # 5 tokens: two 4-grams, no 8-gram
    docs = [_doc(a, situation="bike", modes={"human": 3, "tags": 2}),
            _doc(a, situation="bike", modes={"ai": 5}),
            _doc(range(10, 30), source="ingested", modes={"doc": 20}),  # 20 distinct tokens
            _doc([7, 7, 7, 7, 7], split="validation", situation="loan", modes={"quote": 5})]
    r = _combine(docs)
    assert list(r["splits"]) == ["train", "validation"]
    train, val = r["splits"]["train"], r["splits"]["validation"]
    assert train["documents"] == 3 and train["tokens"] == 30
    assert train["tokens_per_mode"] == {"doc": 20, "human": 3, "ai": 5, "tags": 2}
    assert train["sources"] == {"ingested": {"documents": 1, "tokens": 20},
                                "synthetic_human": {"documents": 2, "tokens": 10}}
    assert train["top_sources"] == [["synthetic_human", 2], ["ingested", 1]]
    assert train["top_situations"] == [["bike", 2]] and train["situation_count_error"] == 0
    # lengths 5, 5, 20: nearest-rank percentiles
    assert train["length"] == {"p50": 5, "p90": 20, "p99": 20, "max": 20, "mean": 10.0}
    # 4-grams: 2 + 2 (the same two) + 17; no n-gram straddles two documents
    assert train["ngrams"]["4"] == {"total": 21, "distinct": 19, "uniqueness": 19 / 21,
                                    "exact": True}
    assert train["ngrams"]["8"] == {"total": 13, "distinct": 13, "uniqueness": 1.0,
                                    "exact": True}
    assert train["ngrams"]["16"]["total"] == 5 and train["ngrams"]["16"]["uniqueness"] == 1.0
    assert val["ngrams"]["4"]["uniqueness"] == 1 / 2 and val["tokens_per_mode"] == {"quote": 5}
    assert val["top_situations"] == [["loan", 1]]
    json.dumps(r)


def test_repeating_a_document_halves_uniqueness():
    doc = _doc(np.arange(100))
    once, twice = _combine([doc])["splits"]["train"], _combine([doc, doc])["splits"]["train"]
    for n in ("4", "8", "16"):
        assert once["ngrams"][n]["uniqueness"] == 1.0
        assert twice["ngrams"][n]["uniqueness"] == 0.5


def test_exact_below_k_matches_a_set_of_ngrams():
    docs = _random_docs(300, seed=1, vocab=4)  # small vocabulary: many repeated n-grams
    r = _combine(docs, CorpusReport(batch_tokens=500))["splits"]["train"]
    for n in (4, 8, 16):
        assert r["ngrams"][str(n)]["exact"]
        assert r["ngrams"][str(n)]["distinct"] == _true_distinct(docs, n)


def test_length_percentiles_exact_below_the_log_bins():
    rng = np.random.default_rng(2)
    lengths = list(rng.integers(1, 300, 98)) + [9_000, 10_000]
    docs = [_doc(np.zeros(n)) for n in lengths]
    length = _combine(docs)["splits"]["train"]["length"]
    for q in (50, 90):
        assert length[f"p{q}"] == np.percentile(lengths, q, method="inverted_cdf")
    assert length["max"] == 10_000 and length["mean"] == sum(lengths) / 100
    assert 9_000 / 1.011 <= length["p99"] <= 9_000  # a log bin: at most 1.1% low


def test_merging_halves_equals_adding_all():
    docs = _random_docs(400, seed=3)
    for fn in (CorpusReport(batch_tokens=300), CorpusReport(k=64, batch_tokens=300)):
        halves = [fn.create_accumulator(), fn.create_accumulator()]
        for i, d in enumerate(docs):
            fn.add_input(halves[i % 2], d)
        fn.compact(halves[1])
        merged = fn.extract_output(fn.merge_accumulators(halves))
        assert merged == _combine(docs, fn)
    assert not merged["splits"]["train"]["ngrams"]["4"]["exact"]  # k=64 sketched


def test_kmv_estimate_within_stated_error():
    rng = np.random.default_rng(4)
    unique = [_doc(rng.integers(0, 1 << 30, 1000)) for _ in range(100)]
    docs = unique * 3  # each 4-gram three times: true uniqueness 1/3
    for k in (1024, 1 << 14):
        r = _combine(docs, CorpusReport(k=k))
        err = r["estimators"]["ngram_relative_error"]
        for n in (4, 16):
            g = r["splits"]["train"]["ngrams"][str(n)]
            truth = _true_distinct(unique, n)
            assert not g["exact"] and g["total"] == 3 * truth
            assert abs(g["distinct"] / truth - 1) < 3 * err


def test_situations_capped_keep_heavy_hitters():
    docs = [_doc([1], situation="common") for _ in range(50)]
    docs += [_doc([1], situation=f"rare{i}") for i in range(40)]
    train = _combine(docs, CorpusReport(max_situations=3))["splits"]["train"]
    err = train["situation_count_error"]
    assert err <= 90 // 4  # Misra-Gries: documents / (counters + 1)
    (name, count), *rest = train["top_situations"]
    assert name == "common" and 50 - err <= count <= 50 and len(rest) <= 2


def test_deterministic_across_processes():
    script = ("import json, sys; sys.path.insert(0, 'tests');"
              "from test_data_report import _combine, _random_docs;"
              "print(json.dumps(_combine(_random_docs(200, seed=5))))")
    outs = [subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, text=True,
                           capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed},
                           ).stdout for seed in ("1", "2")]
    assert outs[0] == outs[1]
    assert json.loads(outs[0]) == _combine(_random_docs(200, seed=5))


def test_beam_pipeline_combine_globally():
    docs = _random_docs(200, seed=6)
    expected = _combine(docs)
    with beam.Pipeline() as p:
        report = p | beam.Create(docs) | beam.CombineGlobally(CorpusReport())
        assert_that(report, equal_to([expected]))


def test_format_report_aligned():
    text = format_report(_combine(_random_docs(200, seed=7)))
    lines = text.splitlines()
    assert lines[0].split() == ["corpus", "report", "train", "validation"]
    table = [line for line in lines if not line.startswith("top situations")]
    assert len({len(line) for line in table}) == 1  # numbers right-aligned in columns
    assert any(line.startswith("documents") for line in lines)
    assert sum(line.startswith("top situations") for line in lines) == 2


def test_format_report_keeps_the_ngram_order_after_a_json_round_trip():
    """The manifest stores the report with sorted keys ("16" < "4" < "8")."""
    import json

    report = _combine(_random_docs(50, seed=3))
    stored = json.loads(json.dumps(report, sort_keys=True))
    (line,) = [x for x in format_report(stored).splitlines() if x.startswith("uniqueness")]
    train = stored["splits"]["train"]["ngrams"]
    assert line.split()[2].replace("~", "") == "/".join(
        f"{train[str(n)]['uniqueness']:.3f}" for n in (4, 8, 16))
