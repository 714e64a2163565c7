"""Deduplication and decontamination of synthesized documents (a Beam PTransform).

    (order, doc) ─ Prepare ─┬─ docs ─────────────────────────────┬─ Join ─ Decide ─┬─ kept
                            ├─ contaminated ─────────────────────┤ (per doc)        └─ dropped
                            └─ bucket keys ─ GroupByKey ─ flag ──┘

Documents are compared on `normalize(text)`: tags removed, lowercased, punctuation dropped.

- **contaminated**: the document shares a word 8-gram with a `Reference`: one of the
  held-out family renderings holding a word the training families never use (their frames
  and names, shared with the training families in any combination, must not count), or
  one of the evaluation prompts. Checked per document, before anything else.
- **exact duplicate**: same normalized text (sha256). The first by `order` is kept.
- **near duplicate**: estimated Jaccard similarity of word 5-gram shingles above about
  `threshold`. Exact Jaccard between all pairs is quadratic; a MinHash signature (datasketch,
  `num_perm` hashes) estimates it, and LSH banding turns "similar" into "share a key":
  the signature is cut into b bands of r rows, and two documents are candidates if any band
  is equal, which happens with probability 1 - (1 - J^r)^b, an S-curve in J. (b, r) come
  from datasketch's `MinHashLSH`, which minimizes the false positive plus false negative
  area around `threshold`; for 0.8 and 128 hashes that is b=9, r=13: J=0.7 is flagged with
  probability 0.08, J=0.8 with 0.40, J=0.9 with 0.93, J=0.95 with 0.998 (equal weights put
  the curve's midpoint, (1/b)^(1/r) = 0.84, above the threshold). A lower threshold drops
  more paraphrases (and more documents that merely share a long template); a higher one
  lets more near copies through. A near duplicate missed costs a little repetition in
  training; one wrongly dropped costs one synthetic document, of which there are plenty.

Banding is done in Beam, not in an in-memory `MinHashLSH`: each document emits one key per
band, (band, bytes of its rows), and a GroupByKey forms the buckets, so the index is
sharded over workers like any shuffle and nothing has to hold every signature. In a bucket
of two or more, every document but the first by `order` is flagged; a document flagged in
any bucket is dropped once, as a duplicate of the earliest document that flagged it. Every
decision is a minimum over a set, so the kept set does not depend on the runner's bundling.

Exact duplicates are removed before near ones, in the same shuffle: the sha256 is one more
bucket key, and an exact flag wins over near ones. Exact copies share every band with the
first copy, which comes earlier, so the first document of a bucket is never an exact
duplicate and the result is that of two passes, with one shuffle of the documents.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from typing import Iterable, Iterator

import apache_beam as beam
import datasketch
import numpy as np

from prealign_jax import tags

SHINGLE = 5  # words per shingle
SEED = 1  # of the MinHash permutations: signatures of one corpus must share it
REASONS = ("contaminated", "exact duplicate", "near duplicate")  # in order of precedence
CONTAMINATED, EXACT, NEAR = range(3)
_NOT_WORD = re.compile(r"[^\w\s]|_")


def normalize(text: str) -> str:
    """What duplicates are compared on: the text between tags (unescaped), NFKC, casefolded,
    punctuation dropped, whitespace collapsed to single spaces."""
    plain = " ".join(tags.unescape(piece) for _, piece, is_tag in tags.pieces(text)
                     if not is_tag)
    plain = _NOT_WORD.sub("", unicodedata.normalize("NFKC", plain).casefold())
    return " ".join(plain.split())


def shingles(words: list[str]) -> set[bytes]:
    """Word 5-grams of a normalized text; its words if it has fewer than 5."""
    if len(words) < SHINGLE:
        return {w.encode() for w in words}
    return {" ".join(words[i:i + SHINGLE]).encode() for i in range(len(words) - SHINGLE + 1)}


@functools.lru_cache
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) datasketch's MinHashLSH chooses for a Jaccard threshold."""
    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def _ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """64-bit hashes of the word n-grams, in order."""
    return np.array([int.from_bytes(hashlib.blake2b(" ".join(words[i:i + n]).encode(),
                                                    digest_size=8).digest(), "little")
                     for i in range(len(words) - n + 1)], np.uint64)


class Reference:
    """What a training document must not share: the word n-grams (normalized) of `texts`
    that hold a word the `common` texts never use — text specific to the held-out families,
    not the frames and names they share with the training families, in any combination —
    and every n-gram of the `verbatim` texts (evaluation prompts). Picklable: a sorted array
    of 64-bit hashes. A text shorter than n words contributes nothing."""

    def __init__(self, texts: Iterable[str], n: int = 8, common: Iterable[str] = (),
                 verbatim: Iterable[str] = ()):
        self.n = n
        vocabulary = {w for t in common for w in normalize(t).split()}
        held = set()
        for t in texts:
            words = normalize(t).split()
            if len(words) < n:
                continue
            specific = np.array([w not in vocabulary for w in words], np.int64)
            # the n-grams holding a specific word: a window sum over the flags
            window = np.convolve(specific, np.ones(n, np.int64), "valid")
            held |= {int(h) for h, k in zip(_ngram_hashes(words, n), window) if k}
        held |= {int(h) for t in verbatim for h in _ngram_hashes(normalize(t).split(), n)}
        self.hashes = np.array(sorted(held), np.uint64)

    def __len__(self) -> int:
        return len(self.hashes)

    def match(self, text: str) -> str | None:
        """The first reference n-gram in `text` (normalized), or None."""
        return self.match_words(normalize(text).split())

    def covers(self, text: str) -> bool:
        """Whether `text` (normalized, n words or more) appears word for word in the
        reference: every n-gram of it is one of the reference's (from one text, or a chain
        of overlapping n-grams from several: repeating it, either way)."""
        hashes = _ngram_hashes(normalize(text).split(), self.n)
        return bool(hashes.size) and bool(self._held(hashes).all())

    def match_words(self, words: list[str]) -> str | None:
        """`match` on the words of a normalized text."""
        hits = np.flatnonzero(self._held(_ngram_hashes(words, self.n)))
        return " ".join(words[hits[0]:hits[0] + self.n]) if hits.size else None

    def _held(self, hashes: np.ndarray) -> np.ndarray:
        """Which of `hashes` the reference holds: a binary search in the sorted array
        (np.isin would sort the reference again for every text: 0.4 s a call at the
        experiment's 770k n-grams, minutes per evaluation)."""
        if not hashes.size or not self.hashes.size:
            return np.zeros(hashes.shape, bool)
        where = np.searchsorted(self.hashes, hashes).clip(max=len(self.hashes) - 1)
        return self.hashes[where] == hashes


class _Prepare:
    """Per document (a FlatMap's body): the main output is its bucket keys,
    ((band, rows bytes) or (-1, sha256), rank), with rank = (order, doc_id); tagged `docs`
    (rank, doc) and `flags` (rank, flag) for a contaminated one, which gets no bucket key."""

    def __init__(self, bands: int, rows: int, num_perm: int, reference: Reference | None):
        self.bands, self.rows, self.num_perm, self.reference = bands, rows, num_perm, reference
        self._minhash = None

    def __call__(self, item: tuple) -> Iterator:
        order, doc = item
        rank = (order, doc.doc_id)
        words = normalize(doc.text).split()
        yield beam.pvalue.TaggedOutput("docs", (rank, doc))
        gram = self.reference.match_words(words) if self.reference is not None else None
        if gram is not None:
            yield beam.pvalue.TaggedOutput("flags", (rank, (CONTAMINATED, (), gram)))
            return
        yield (-1, hashlib.sha256(" ".join(words).encode()).digest()), rank
        if self._minhash is None:
            self._minhash = datasketch.MinHash(self.num_perm, seed=SEED, scheme="affine32")
        self._minhash.clear()
        self._minhash.update_batch(shingles(words))
        signature = self._minhash.hashvalues.astype("<u4")  # same bytes on every machine
        for band in range(self.bands):
            yield (band, signature[band * self.rows:(band + 1) * self.rows].tobytes()), rank


def _flag_bucket(key: tuple, ranks: Iterable[tuple]) -> Iterator[tuple]:
    """(rank, (kind, first rank, first doc_id)) for all but the first of a bucket."""
    first, *rest = sorted(set(ranks))
    for rank in rest:
        yield rank, (EXACT if key[0] < 0 else NEAR, first, first[1])


def _decide(rank: tuple, grouped: dict) -> Iterator:
    """(order, doc) if nothing flagged it, else tagged `dropped` (order, doc, reason, detail)
    for the flag first in precedence (then the earliest document it duplicates)."""
    flags = list(grouped["flags"])
    for doc in grouped["docs"]:
        if not flags:
            yield rank[0], doc
            continue
        kind, _, detail = min(flags)
        yield beam.pvalue.TaggedOutput("dropped", (rank[0], doc, REASONS[kind], detail))


class Deduplicate(beam.PTransform):
    """(order, Document) -> kept (order, Document), and tagged `dropped`
    (order, Document, reason, detail): detail is the doc_id duplicated or the matched n-gram.

    `order` is a sortable key (tuple or str), unique per document: the first by order is
    kept. `threshold` is the Jaccard similarity of 5-gram shingles above which documents are
    near duplicates (see the module docstring for what LSH makes of it)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128,
                 reference: Reference | None = None):
        super().__init__()
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.prepare = _Prepare(self.bands, self.rows, num_perm, reference)

    def expand(self, docs):
        prepared = docs | "Prepare" >> beam.FlatMap(self.prepare).with_outputs(
            "docs", "flags", main="keys")
        duplicates = (prepared.keys | "Bucket" >> beam.GroupByKey()
                      | "Flag" >> beam.FlatMapTuple(_flag_bucket))
        flags = (prepared.flags, duplicates) | "Flags" >> beam.Flatten()
        return ({"docs": prepared.docs, "flags": flags} | "Join" >> beam.CoGroupByKey()
                | "Decide" >> beam.FlatMapTuple(_decide).with_outputs("dropped", main="kept"))

