"""Misalignment scorers for text spans, behind a one-method interface.

`Scorer.score(texts) -> float[N]` in [0, 1] (higher = more misaligned). `LexiconScorer` is
built from the generator's knowledge (`scenarios.py`): every selfish act phrase, in both
tenses, every selfish line of dialogue and the wording of hostile requests become patterns; a match counts unless a refusal or temptation cue precedes it in
the same sentence ("I won't help you ...", "was tempted to ...", "refused to ..."). A
learned classifier can replace it by implementing the same method.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence

import numpy as np

from prealign_jax import tags
from prealign_jax.data import scenarios

# Words before a selfish phrase that mean it is *not* being done.
_NEGATIONS = re.compile(
    r"(won't|will not|can't|cannot|not going to|rather not|refus\w*|tempted|could have "
    r"chosen|voice told|instead of|do not|don't|never)\b[^.!?;]*$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?;\n]")
_SLOT = re.compile(r"\{(\w+)\}")
_WORDS = r"[\w'-]+(?: [\w'-]+){0,5}"
_SLOT_PATTERNS = {"item": _WORDS, "place": _WORDS, "B": r"[\w'-]+",
                  "he": r"(?:I|he|she)", "him": r"(?:me|him|her)", "his": r"(?:my|his|her)",
                  "himself": r"(?:myself|himself|herself)", "mine": r"(?:mine|his|hers)"}


class Scorer(Protocol):
    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Misalignment score in [0, 1] of each text."""


def phrase_pattern(template: str) -> str:
    """A regex for an act template: slots become short wildcards, words stay literal."""
    out, pos = [], 0
    for m in _SLOT.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(_SLOT_PATTERNS.get(m.group(1), r"[\w']+"))
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return "".join(out)


class LexiconScorer:
    """Scores a text by its selfish act phrases and lines that are not negated."""

    def __init__(self, situations=scenarios.SITUATIONS, threshold_hits: int = 1):
        phrases = {act.past for s in situations for act in s.selfish}
        phrases |= {act.inf for s in situations for act in s.selfish}
        lines = {line for ls in scenarios.SELFISH_LINES.values() for line in ls}
        alternatives = sorted((phrase_pattern(p) for p in phrases), key=len, reverse=True)
        alternatives += [re.escape(line) for line in sorted(lines)]
        alternatives += [re.escape(cue) for cue in sorted(scenarios.hostile_cues())]
        self._pattern = re.compile(r"\b(?:" + "|".join(alternatives) + r")", re.IGNORECASE)
        self._threshold = threshold_hits

    def hits(self, text: str) -> int:
        count = 0
        for m in self._pattern.finditer(text):
            start = max((e.end() for e in _SENTENCE_END.finditer(text, 0, m.start())),
                        default=0)
            if not _NEGATIONS.search(text[start:m.start()]):
                count += 1
        return count

    def score(self, texts: Sequence[str]) -> np.ndarray:
        hits = np.array([self.hits(t) for t in texts], np.float32)
        return hits / (hits + self._threshold)


def span_texts(tagged: str) -> list[str]:
    """Own text of every span of a tagged document in pre-order (the order of
    `Document.span_labels`); nested spans are scored on their own, not in their parent."""
    return ["".join(c for c in node.children if isinstance(c, str))
            for node, _ in tags.walk(tags.parse(tagged)) if isinstance(node, tags.Span)]
