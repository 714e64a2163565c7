"""Synthetic generator: determinism, grammar, labels, counterfactual pairs, variety,
redaction, the pinned corpus, the held-out families and the spec's loader; and the scorer's
precision/recall on held-out generated text."""

import collections
import hashlib
import itertools
import pathlib
import random
import re

import numpy as np
import pytest
import yaml

from prealign_jax import tags
from prealign_jax.data import generator, records, scenarios, scorer


def _docs(n, seed=0, **kw):
    return list(generator.generate(n, seed=seed, **kw))


def test_same_seed_same_bytes_and_order_independent():
    a, b = _docs(300, seed=7), _docs(300, seed=7)
    assert [records.to_example(d) for d in a] == [records.to_example(d) for d in b]
    # scenario i does not depend on which scenarios were generated before it
    tail = list(generator.generate(100, seed=7, start=200))
    assert tail == [d for d in a if int(d.doc_id.split("-")[1]) >= 200]
    assert [d.text for d in _docs(50, seed=8)] != [d.text for d in a[:len(_docs(50, 8))]]


def test_documents_are_valid_and_labelled():
    docs = _docs(1500, seed=3)
    assert {d.source for d in docs} == {"synthetic_human", "synthetic_ai", "synthetic_quote"}
    for d in docs:
        nodes = tags.parse(d.text)  # well-formed under the grammar
        assert tags.serialize(nodes) == d.text
        assert len(scorer.span_texts(d.text)) == len(d.span_labels)
        assert set(d.span_labels) <= {0, 1}
        modes_in = {n.mode for n in nodes if isinstance(n, tags.Span)}
        if d.source == "synthetic_human":
            assert modes_in == {"human"}
        elif d.source == "synthetic_quote":
            assert "<quote>" in d.text and "<redacted/>" in d.text
        # every ai span is labelled aligned
        flat = _preorder_modes(nodes)
        assert all(label == 0 for mode, label in zip(flat, d.span_labels) if mode == "ai")
    labels = [label for d in docs if d.source == "synthetic_human" for label in d.span_labels]
    assert 0.3 < np.mean(labels) < 0.8  # people act selfishly sometimes, not always


def _preorder_modes(nodes):
    out = []
    for n in nodes:
        if isinstance(n, tags.Span):
            out.append(n.mode)
            out += _preorder_modes(n.children)
    return out


def test_counterfactual_pairs_share_the_scenario():
    docs = _docs(600, seed=5)
    by_pair = collections.defaultdict(list)
    for d in docs:
        if d.pair_id >= 0:
            by_pair[d.pair_id].append(d)
    assert len(by_pair) > 100
    for pair in by_pair.values():
        assert sorted(d.source for d in pair) == ["synthetic_ai", "synthetic_human"]
        ai = next(d for d in pair if d.source == "synthetic_ai")
        human = next(d for d in pair if d.source == "synthetic_human")
        assert ai.span_labels == (0,)
        # same scenario: the ai's opening sentence is the human's, in the first person
        opening = re.split(r"(?<=\.)\s", scorer.span_texts(ai.text)[0])[0]
        words = {w.lower() for w in re.findall(r"[A-Za-z]{4,}", opening)}
        human_words = {w.lower() for w in re.findall(r"[A-Za-z]{4,}", human.text)}
        assert len(words & human_words) >= 0.6 * len(words), (human.text, ai.text)
    selfish = np.mean([d.span_labels[0] for p in by_pair.values() for d in p
                       if d.source == "synthetic_human"])
    assert selfish > 0.55  # pairs favour the contrast: human selfish, ai selfless


def test_quotes_redact_private_data_verbatim_otherwise():
    docs = [d for d in _docs(2000, seed=11) if d.source == "synthetic_quote"]
    assert len(docs) > 100
    phone = re.compile(r"555-\d{4}")
    with_original = 0
    for d in docs:
        nodes = tags.parse(d.text)
        ai = next(n for n in nodes if isinstance(n, tags.Span) and n.mode == "ai")
        quote = next(c for c in ai.children if isinstance(c, tags.Span))
        quoted = "".join(c for c in quote.children if isinstance(c, str))
        assert not phone.search(quoted) and not re.search(r"\d+ \w+ (Street|Road|Lane)", quoted)
        human = [n for n in nodes if isinstance(n, tags.Span) and n.mode == "human"]
        if human:  # the quote is the human's words with private parts cut out, in order
            with_original += 1
            original = human[0].text()
            pieces = [c for c in quote.children if isinstance(c, str)]
            pattern = ".+?".join(re.escape(p) for p in pieces)
            assert re.fullmatch(pattern, original), (original, pieces)
    assert with_original > 20


def test_variety_unique_ngrams():
    docs = _docs(3000, seed=1)
    assert len({d.text for d in docs}) == len(docs)
    words = [w for d in docs for w in re.findall(r"\w+|[^\w\s]", d.text)]
    grams = list(zip(*(words[i:] for i in range(8))))
    assert len(set(grams)) / len(grams) > 0.3
    lengths = [len(d.text) for d in docs]
    assert np.percentile(lengths, 90) > 2 * np.percentile(lengths, 10)


def test_scorer_precision_recall_on_held_out_text():
    """Circular by construction: the scorer is built from the very lexicon the generator
    writes with, so an unseen seed is new text but not new wording; this checks the
    scorer's negation and sentence handling, not that it generalises (see the held-out
    situation test below for that)."""
    s = scorer.LexiconScorer()
    y, p = [], []
    for d in itertools.islice(generator.generate(2000, seed=999_001), None):
        texts = scorer.span_texts(d.text)
        y += list(d.span_labels)
        p += list(s.score(texts) >= 0.5)
    y, p = np.array(y, bool), np.array(p, bool)
    precision = (y & p).sum() / p.sum()
    recall = (y & p).sum() / y.sum()
    print(f"scorer precision={precision:.4f} recall={recall:.4f} spans={len(y)}")
    assert precision > 0.95 and recall > 0.95


def test_scorer_on_situations_it_was_not_built_from(monkeypatch):
    """Leave one situation out: a scorer built from the other nine, on text of the tenth.
    Measured (10 folds x 300 scenarios, seed 999_002): 6842 spans, 2801 selfish, precision
    1.0, recall 0.205. The act lexicon does not generalise across situations: every
    span it flags is also flagged by a scorer built from no situation at all, i.e. through
    the situation-independent dialogue lines and hostile-request wording only. A scorer
    that generalised would fail the last assertion: then update these figures."""
    generic = scorer.LexiconScorer(situations=())
    y, p, p_generic = [], [], []
    for held in scenarios.SITUATIONS:
        s = scorer.LexiconScorer(situations=[x for x in scenarios.SITUATIONS if x is not held])
        with monkeypatch.context() as m:
            m.setattr(scenarios, "SITUATIONS", (held,))  # what the generator draws from
            for d in generator.generate(300, seed=999_002):
                texts = scorer.span_texts(d.text)
                y += d.span_labels
                p += list(s.score(texts) >= 0.5)
                p_generic += list(generic.score(texts) >= 0.5)
    y, p, p_generic = (np.array(a, bool) for a in (y, p, p_generic))
    precision = (y & p).sum() / p.sum()
    recall = (y & p).sum() / y.sum()
    print(f"held-out situations: precision={precision:.4f} recall={recall:.4f} "
          f"spans={len(y)} selfish={y.sum()}")
    assert precision > 0.95 and 0.15 < recall < 0.3
    assert (p == p_generic).all(), "the act lexicon now generalises: update the docstring"


def test_scorer_negations_are_not_selfish():
    s = scorer.LexiconScorer()
    bad, ok = s.score([
        "Maya kept the wallet for herself.",
        "I won't help you keep the wallet I found, because it isn't yours to keep.",
    ])
    assert bad >= 0.5 > ok
    assert s.score(["For a moment Omar was tempted to tell Ana he never saw the watch, "
                    "but he returned the watch to Ana instead."])[0] < 0.5


def test_escaping_of_tag_like_text_in_generated_documents():
    text = tags.serialize([tags.Span("human", ("I typed <ai> and </human> on purpose.",))])
    assert tags.parse(text)[0].text() == "I typed <ai> and </human> on purpose."


def _digest(docs):
    """Of the documents' fields as rendered (not of their storage format)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(repr((d.text, d.source, d.doc_id, d.pair_id, d.span_labels,
                       d.situation)).encode())
    return h.hexdigest()


def test_the_rendered_corpus_is_pinned():
    """The spec moved from Python tuples to scenarios.yaml without changing a word or an RNG
    draw: these digests were recorded before the move (the same at fc45039, checked). A deliberate corpus change (a word of
    the spec, the order of a list, the renderer) updates them."""
    assert _digest(generator.generate(3000, seed=0)) == (
        "dd17d9c34cb3e56faa601d5efe94c8142b0da0450e8222761fd48f9fd0a212a9")
    assert _digest(generator.generate(500, seed=7, start=12345)) == (
        "11174c9aa93a8324740ff5fb4fb484072759ea9d10cd9fa0f446d783a4f570e2")


def _own_words(families):
    """The families' items and places that the shared lexicon does not also use."""
    lexicon = " ".join(s for table in scenarios.SPEC.lexicon.values()
                       for strings in (table.values() if isinstance(table, dict) else table)
                       for s in ((strings,) if isinstance(strings, str) else strings))
    return [w for f in families for w in f.items + f.places
            if not re.search(rf"\b{re.escape(w)}\b", lexicon)]


def _mentions(words, text):
    return [w for w in words if re.search(rf"\b{re.escape(w)}\b", text)]


def test_held_out_families_never_reach_the_training_corpus():
    train = [f.name for f in scenarios.SITUATIONS]
    held = [f.name for f in scenarios.HELD_OUT_SITUATIONS]
    assert train == ["found_item", "sharing", "credit", "invitation", "accident", "money",
                     "borrowed", "information", "queue", "promise"]  # the draw order
    assert len(held) == 4 and scenarios.FAMILIES == (scenarios.SITUATIONS
                                                     + scenarios.HELD_OUT_SITUATIONS)
    assert scenarios.family(held[0]).split == "held_out"
    with pytest.raises(KeyError, match="no situation family 'nope'"):
        scenarios.family("nope")
    held_docs = _docs(400, split="held_out")
    train_docs = _docs(400)
    assert {d.situation for d in held_docs} == set(held)
    assert {d.situation for d in train_docs} == set(train)
    assert all(d.doc_id.startswith("h0-") for d in held_docs)
    assert not {d.doc_id for d in held_docs} & {d.doc_id for d in train_docs}
    # every scene, extra ones in a document too, is of the document's split: no item or
    # place of the other split's families appears
    held_text = "\n".join(d.text for d in held_docs)
    train_text = "\n".join(d.text for d in train_docs)
    assert _mentions(_own_words(scenarios.SITUATIONS), held_text) == []
    assert _mentions(_own_words(scenarios.HELD_OUT_SITUATIONS), train_text) == []
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        next(generator.generate(1, split="validation"))


def test_every_held_out_family_renders_in_every_document_kind():
    docs = _docs(400, seed=2, split="held_out")
    kinds = collections.defaultdict(set)
    for d in docs:
        assert tags.serialize(tags.parse(d.text)) == d.text
        assert len(scorer.span_texts(d.text)) == len(d.span_labels)
        kinds[d.situation].add(d.doc_id[-1])  # h(uman), a(i pair), r(equest), q(uote)
    assert kinds == {f.name: {"h", "a", "r", "q"} for f in scenarios.HELD_OUT_SITUATIONS}
    for f in scenarios.HELD_OUT_SITUATIONS:  # the spec's minimums for a new family
        assert {a.kind for a in f.selfish} == set(scenarios.SELFISH_KINDS)
        assert len(f.items) >= 10 and len(f.places) >= 6 and len(f.titles) >= 4


def test_count_scenarios():
    n = scenarios.count_scenarios("train")
    assert isinstance(n, int) and n > 10**9
    assert scenarios.count_scenarios("held_out") > 10**9
    with pytest.raises(ValueError):
        scenarios.count_scenarios("validation")


def test_styles_and_slots_match_the_generator():
    assert {s.template for s in scenarios.STYLES} == {*scenarios.TEMPLATES, None}
    assert len({s.name for s in scenarios.STYLES}) == len(scenarios.STYLES)
    assert all("\n" not in s.description for s in scenarios.STYLES)
    # the loader checks templates against the slots the renderer fills
    cast = generator._Renderer(random.Random(0), generator.Mix(), scenarios.SITUATIONS).cast()
    assert set(cast.slots()) == set(cast.slots(first_person=True)) == scenarios.SLOTS


_FAMILY = """
name: lost_umbrella
split: held_out
titles: ["The {item}", "Rainy day"]
items: [umbrella]
places: [the hall]
setups: ["{A} found {B}'s {item} at {place}."]
selfish:
  - {kind: keep, past: "kept the {item}", inf: "keep the {item}"}
kind:
  - {past: "returned the {item}", inf: "return the {item}"}
reasons: ["it was {B}'s"]
after_selfish: ["{B} got wet.", "{B} asked around."]
after_kind: ["{B} smiled.", "{B} stayed dry."]
steps: ["ask around", "leave it at the desk"]
"""


def _spec_with(family) -> str:
    """The packaged spec's text with `family` as its only family."""
    spec = yaml.safe_load(scenarios.SPEC_FILE.read_text(encoding="utf-8"))
    return yaml.safe_dump({**spec, "families": [family]})


def test_the_spec_loader_rejects_unknown_and_missing_fields():
    good = yaml.safe_load(_FAMILY)
    assert scenarios.load(_spec_with(good)).families[0].selfish == (
        scenarios.Act("keep", "kept the {item}", "keep the {item}"),)
    with pytest.raises(ValueError, match="family 'lost_umbrella': unknown field 'colour'"):
        scenarios.load(_spec_with({**good, "colour": "blue"}))
    with pytest.raises(ValueError, match="family 'lost_umbrella': missing field 'steps'"):
        scenarios.load(_spec_with({k: v for k, v in good.items() if k != "steps"}))
    with pytest.raises(ValueError, match="selfish #1: missing field 'inf'"):
        scenarios.load(_spec_with({**good, "selfish": [{"kind": "keep", "past": "kept it"}]}))
    with pytest.raises(ValueError, match="selfish #1: kind 'steal' is not one of"):
        scenarios.load(_spec_with({**good, "selfish": [
            {"kind": "steal", "past": "took it", "inf": "take it"}]}))
    with pytest.raises(ValueError, match=r"setups: .* uses unknown slot\(s\) \['C'\]"):
        scenarios.load(_spec_with({**good, "setups": ["{A} found {C}'s {item}."]}))
    with pytest.raises(ValueError, match="after_kind: expected a list of at least 2"):
        scenarios.load(_spec_with({**good, "after_kind": ["{B} smiled."]}))
    with pytest.raises(ValueError, match="lexicon: missing field 'harms'"):
        spec = yaml.safe_load(_spec_with(good))
        del spec["lexicon"]["harms"]
        scenarios.load(yaml.safe_dump(spec))
    # a path reads the file: the packaged one is what the module exposes
    assert scenarios.load(pathlib.Path(str(scenarios.SPEC_FILE))) == scenarios.SPEC
