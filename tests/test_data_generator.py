"""Synthetic generator: determinism, grammar, labels, counterfactual pairs, variety,
redaction; and the scorer's precision/recall on held-out generated text."""

import collections
import itertools
import re

import numpy as np

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
