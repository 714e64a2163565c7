"""Deduplication and decontamination (prealign_jax/data/dedup.py) on the DirectRunner."""

import pickle
import random

import apache_beam as beam
import pytest

from prealign_jax import tags
from prealign_jax.data import dedup
from prealign_jax.data.records import Document

WORDS = ("river lamp orange quiet seven garden window market letter winter pencil bridge "
         "cloud engine forest honey island jacket kettle ladder mirror needle ocean paper "
         "rabbit saddle tunnel violin wagon yellow anchor basket candle desert feather "
         "glacier harbor iron jungle kitten lemon marble novel orchid pepper").split()


def _text(seed, n=60):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _doc(doc_id, text):
    return Document(text=text, source="synthetic_ai", doc_id=doc_id)


def _run(tmp_path, inputs: dict, **kwargs):
    """{name: [(order, doc)]} through one Deduplicate each, in one pipeline; {name: (kept
    {doc_id: order}, dropped {doc_id: (reason, detail)})}."""
    with beam.Pipeline() as p:
        for name, items in inputs.items():
            out = p | f"Create{name}" >> beam.Create(items) | f"Dedup{name}" >> (
                dedup.Deduplicate(**kwargs))
            for what, pcoll in (("kept", out.kept), ("dropped", out.dropped)):
                path = str(tmp_path / f"{name}.{what}")
                _ = (pcoll | f"List{name}{what}" >> beam.combiners.ToList()
                     | f"Write{name}{what}" >> beam.Map(
                         lambda xs, path=path: open(path, "wb").write(pickle.dumps(xs))))
    results = {}
    for name in inputs:
        kept = pickle.loads((tmp_path / f"{name}.kept").read_bytes())
        dropped = pickle.loads((tmp_path / f"{name}.dropped").read_bytes())
        results[name] = ({doc.doc_id: order for order, doc in kept},
                         {doc.doc_id: (reason, detail) for _, doc, reason, detail in dropped})
    return results


def test_normalize_removes_tags_case_punctuation_and_unescapes():
    tagged = tags.serialize([tags.Span("human", ("Hello, <ai> World!",)), "\n",
                             tags.Span("ai", ("Hi  there.",))])
    assert "<\u2060ai>" in tagged
    assert dedup.normalize(tagged) == "hello ai world hi there"
    assert dedup.normalize("<human>Don't</human><ai>STOP</ai>") == "dont stop"
    assert dedup.shingles(["a", "b"]) == {b"a", b"b"}
    assert dedup.shingles("a b c d e f".split()) == {b"a b c d e", b"b c d e f"}


def test_lsh_params_from_datasketch():
    assert dedup.lsh_params(0.8, 128) == (9, 13)


def test_reference_ignores_common_ngrams_and_pickles():
    frame = "the assistant was asked to help and it said that it would"
    held_out = "Sam hid the neighbour's wallet under the old blue porch step at night"
    ref = dedup.Reference([frame + " " + held_out], n=8, common=[frame + " today"])
    ref = pickle.loads(pickle.dumps(ref))
    assert ref.match("A story: " + frame + " gladly.") is None
    assert ref.match("Later, Sam HID the neighbour's wallet under the old blue porch "
                     "again") == "sam hid the neighbours wallet under the old"
    assert ref.match("too short") is None
    assert dedup.Reference(["short text"]).match("short text") is None


def test_deduplicate(tmp_path):
    base = _text(1)
    words = base.split()
    near = " ".join(words[:-1] + ["zebra"])  # 55 of 57 shingles shared: J = 0.96
    phrase = "the quick brown fox jumps"
    held_out = _text(7, 20)
    common = _text(8, 20)
    docs = [
        ("a", base),
        ("b", "<human>" + base.upper().replace(" ", ", ", 3) + "!</human>"),  # exact dup
        ("c", near),
        ("d", _text(2)),  # unrelated
        ("e", _text(3, 30) + " " + phrase),  # e and f share only a 5-word phrase
        ("f", phrase + " " + _text(4, 30)),
        ("g", "Hello there"),  # short texts
        ("h", "hello, THERE."),
        ("i", "hello world"),
        ("j", _text(5, 20) + " " + " ".join(held_out.split()[5:15])),  # 10 held-out words
        ("k", _text(6, 20) + " " + common),  # shares only common n-grams
    ]
    items = [(f"{i:03d}", _doc(doc_id, text)) for i, (doc_id, text) in enumerate(docs)]
    shuffled = list(reversed(items))
    random.Random(0).shuffle(shuffled)
    ref = dedup.Reference([held_out + " " + common], common=[common])
    results = _run(tmp_path, {"Sorted": items, "Shuffled": shuffled}, reference=ref)
    kept, dropped = results["Sorted"]
    assert set(kept) == {"a", "d", "e", "f", "g", "i", "k"}
    assert kept["a"] == "000"
    assert dropped["b"] == ("exact duplicate", "a")
    assert dropped["c"] == ("near duplicate", "a")
    assert dropped["h"] == ("exact duplicate", "g")
    reason, gram = dropped["j"]
    assert reason == "contaminated" and gram in dedup.normalize(held_out)
    assert results["Shuffled"] == results["Sorted"]


def test_first_by_order_wins_and_contaminated_documents_duplicate_nothing(tmp_path):
    text, other, ref_text = _text(11), _text(12), _text(13, 8)
    items = [(("x", 2), _doc("late", text)), (("x", 1), _doc("early", text + ".")),
             (("w", 9), _doc("tainted", ref_text + " " + other)),
             # near "tainted" (J = 0.97), which comes first but is dropped as contaminated
             (("y", 0), _doc("after", "zebra " + ref_text.split(" ", 1)[1] + " " + other))]
    kept, dropped = _run(tmp_path, {"Order": items},
                         reference=dedup.Reference([ref_text]))["Order"]
    assert kept == {"early": ("x", 1), "after": ("y", 0)}
    assert dropped == {"late": ("exact duplicate", "early"),
                       "tainted": ("contaminated", dedup.normalize(ref_text))}


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_threshold_sets_bands(threshold):
    transform = dedup.Deduplicate(threshold=threshold)
    assert (transform.bands, transform.rows) == dedup.lsh_params(threshold, 128)
    assert transform.bands * transform.rows <= 128
