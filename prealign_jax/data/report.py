"""The corpus report of `prealign prepare`: a Beam CombineFn over per-document stats.

Per split: documents, tokens (per mode, per source), document length percentiles, 4/8/16-gram
uniqueness (distinct / total n-grams over token ids) and the top situations and sources.
Production corpora are ~10^8 documents, so every part of the accumulator is bounded:

- n-gram distinct counts: KMV sketches (the k smallest 64-bit hashes; distinct ~ (k-1)/U_k,
  relative standard error ~ 1/sqrt(k-2)), exact while fewer than k distinct n-grams were seen.
  Hashing is numpy over batches of documents (Beam's ApproximateUnique hashes per element in
  Python, far too slow per n-gram) with fixed constants, so it is the same in every process.
- lengths: a histogram with one bin per length below `EXACT_LENGTHS` (exact percentiles) and
  bins 2^(1/64) wide beyond (a percentile is its bin's lower edge, at most 1.1% below).
- situations: Misra-Gries counters, pruned to `max_situations` keys (the mergeable-summary
  rule: subtract the (k+1)-th largest count, drop what reaches 0). Exact while there are at
  most that many distinct situations; otherwise every count is low by at most
  `situation_count_error` (reported) and every situation above that share is kept.
- sources stay exact: they are a handful by construction (the generator, the ingest inputs).
"""

from __future__ import annotations

import collections
import math
from typing import NamedTuple

import apache_beam as beam
import numpy as np

NGRAMS = (4, 8, 16)
MODES = ("doc", "human", "ai", "quote", "tags")
SPLITS = ("train", "validation")
EXACT_LENGTHS = 4096
_LOG_BINS_PER_OCTAVE = 64
TOP = 10

# Integer lower edges of the length bins: 0, 1, ..., EXACT_LENGTHS-1, then log-spaced to 2^62.
_OCTAVES = 62 - int(math.log2(EXACT_LENGTHS))
_EDGES = np.concatenate([
    np.arange(EXACT_LENGTHS, dtype=np.int64),
    np.ceil(EXACT_LENGTHS * 2.0 ** (np.arange(_OCTAVES * _LOG_BINS_PER_OCTAVE)
                                    / _LOG_BINS_PER_OCTAVE)).astype(np.int64)])

# splitmix64's finalizer (a bijection on uint64 with full avalanche) and an odd multiplier.
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


class DocStats(NamedTuple):
    """One document's contribution to the report (what the pipeline emits per document)."""
    source: str
    split: str
    situation: str           # '' when unknown
    tokens: np.ndarray       # int32 token ids, EOS excluded
    mode_tokens: dict        # mode ('doc', 'human', 'ai', 'quote', 'tags') -> tokens


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def ngram_hashes(tokens: np.ndarray) -> dict[int, np.ndarray]:
    """n -> 64-bit hash of the n-gram starting at each position (for n in NGRAMS).

    Built by doubling: h_2n[i] = mix(h_n[i] * GOLDEN + h_n[i + n]), so 16-grams cost 5 array
    passes, not 16. Positions whose n-gram runs off the end are absent (len - n + 1 values).
    """
    h = _mix(tokens.astype(np.uint64) + _GOLDEN)
    out, n = {}, 1
    while n < max(NGRAMS):
        h = _mix(h[:len(h) - n] * _GOLDEN + h[n:]) if len(h) > n else h[:0]
        n *= 2
        if n in NGRAMS:
            out[n] = h
    return out


class _Kmv:
    """The k smallest distinct 64-bit hashes seen, and how many values were offered."""

    def __init__(self, k: int):
        self.k, self.total, self.mins = k, 0, np.zeros(0, np.uint64)

    def add(self, hashes: np.ndarray, total: int) -> None:
        self.total += total
        if len(self.mins) == self.k:
            hashes = hashes[hashes < self.mins[-1]]
        # Insert the new values into the sorted sketch: a full np.unique per batch costs more
        # than the hashing once the sketch is full and few values pass the threshold.
        hashes = np.unique(hashes)[:self.k]
        at = np.searchsorted(self.mins, hashes)
        new = at == len(self.mins)
        new[~new] = self.mins[at[~new]] != hashes[~new]
        self.mins = np.insert(self.mins, at[new], hashes[new])[:self.k]

    def merge(self, other: "_Kmv") -> None:
        self.add(other.mins, other.total)

    @property
    def exact(self) -> bool:
        return len(self.mins) < self.k

    def distinct(self) -> float:
        """Exact below k; else (k-1)/U_k, capped at the total (no more distinct than seen)."""
        if self.exact:
            return float(len(self.mins))
        return min((self.k - 1) / ((float(self.mins[-1]) + 1.0) / 2.0 ** 64), self.total)


class _Split:
    """Everything the report keeps for one split; bounded but for `pending` (one batch)."""

    def __init__(self, k: int):
        self.documents = 0
        self.tokens = 0
        self.length_max = 0
        self.mode_tokens: collections.Counter = collections.Counter()
        self.source_documents: collections.Counter = collections.Counter()
        self.source_tokens: collections.Counter = collections.Counter()
        self.situations: collections.Counter = collections.Counter()
        self.situated = 0  # documents with a known situation
        self.lengths = np.zeros(len(_EDGES), np.int64)
        self.ngrams = {n: _Kmv(k) for n in NGRAMS}
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0


class CorpusReport(beam.CombineFn):
    """Combines `DocStats` into the corpus report (a JSON-serializable dict, see module doc).

    Documents are hashed in batches of about `batch_tokens` tokens: numpy over the
    concatenation, n-grams that straddle two documents masked out.
    """

    def __init__(self, k: int = 1 << 14, max_situations: int = 1000,
                 batch_tokens: int = 1 << 16):
        self.k, self.max_situations, self.batch_tokens = k, max_situations, batch_tokens

    def create_accumulator(self) -> dict[str, _Split]:
        return {}

    def add_input(self, acc, doc: DocStats):
        s = acc.get(doc.split) or acc.setdefault(doc.split, _Split(self.k))
        n = len(doc.tokens)
        s.documents += 1
        s.tokens += n
        s.mode_tokens.update(doc.mode_tokens)
        s.source_documents[doc.source] += 1
        s.source_tokens[doc.source] += n
        if doc.situation:
            s.situated += 1
            s.situations[doc.situation] += 1
            if len(s.situations) > 2 * self.max_situations:
                self._prune(s)
        s.pending.append(np.asarray(doc.tokens, np.int32))
        s.pending_tokens += n
        if s.pending_tokens >= self.batch_tokens:
            self._flush(s)
        return acc

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        out = next(accumulators)
        for acc in accumulators:
            for split, s in acc.items():  # only `out` may be mutated
                o = out.get(split) or out.setdefault(split, _Split(self.k))
                o.documents += s.documents
                o.tokens += s.tokens
                o.length_max = max(o.length_max, s.length_max)
                o.mode_tokens.update(s.mode_tokens)
                o.source_documents.update(s.source_documents)
                o.source_tokens.update(s.source_tokens)
                o.situations.update(s.situations)
                o.situated += s.situated
                o.lengths += s.lengths
                for n in NGRAMS:
                    o.ngrams[n].merge(s.ngrams[n])
                o.pending += s.pending
                o.pending_tokens += s.pending_tokens
                if o.pending_tokens >= self.batch_tokens:
                    self._flush(o)
                if len(o.situations) > self.max_situations:
                    self._prune(o)
        return out

    def compact(self, acc):
        for s in acc.values():
            self._flush(s)
            self._prune(s)
        return acc

    def extract_output(self, acc) -> dict:
        acc = self.compact(acc)
        order = [s for s in SPLITS if s in acc] + sorted(set(acc) - set(SPLITS))
        return {
            "splits": {split: self._split_report(acc[split]) for split in order},
            "estimators": {
                "ngrams": f"KMV, k={self.k} minimum 64-bit hashes: exact below k distinct "
                          "n-grams, else relative standard error ngram_relative_error",
                "ngram_relative_error": 1 / math.sqrt(self.k - 2),
                "length": f"exact below {EXACT_LENGTHS} tokens, else the bin's lower edge "
                          f"(at most {2 ** (1 / _LOG_BINS_PER_OCTAVE) - 1:.1%} low)",
                "situations": f"Misra-Gries, {self.max_situations} counters: each count low "
                              "by at most situation_count_error",
            },
        }

    def _flush(self, s: _Split) -> None:
        """Hashes the pending documents' n-grams into the sketches, bins their lengths."""
        if not s.pending:
            return
        lengths = np.array([len(t) for t in s.pending], np.int64)
        tokens = np.concatenate(s.pending)
        s.pending, s.pending_tokens = [], 0
        s.lengths += np.bincount(np.searchsorted(_EDGES, lengths, side="right") - 1,
                                 minlength=len(_EDGES))
        s.length_max = max(s.length_max, int(lengths.max()))
        ends = np.repeat(np.cumsum(lengths), lengths)
        for n, h in ngram_hashes(tokens).items():
            inside = np.arange(len(h)) + n <= ends[:len(h)]
            s.ngrams[n].add(h[inside], int(np.maximum(lengths - n + 1, 0).sum()))

    def _prune(self, s: _Split) -> None:
        if len(s.situations) <= self.max_situations:
            return
        cut = sorted(s.situations.values(), reverse=True)[self.max_situations]
        s.situations = collections.Counter(
            {k: c - cut for k, c in s.situations.items() if c > cut})

    def _split_report(self, s: _Split) -> dict:
        def top(counter):
            return [[k, c] for k, c in sorted(counter.items(), key=lambda kc: (-kc[1], kc[0]))
                    [:TOP]]

        cumulative = np.cumsum(s.lengths)

        def percentile(q):
            rank = max(1, math.ceil(q / 100 * s.documents))
            return int(_EDGES[np.searchsorted(cumulative, rank)])

        ngrams = {}
        for n, kmv in s.ngrams.items():
            distinct = kmv.distinct()
            ngrams[str(n)] = {"total": kmv.total, "distinct": round(distinct),
                              "uniqueness": distinct / kmv.total if kmv.total else None,
                              "exact": kmv.exact}
        return {
            "documents": s.documents,
            "tokens": s.tokens,
            "tokens_per_mode": {m: s.mode_tokens[m] for m in
                                [m for m in MODES if m in s.mode_tokens]
                                + sorted(set(s.mode_tokens) - set(MODES))},
            "sources": {src: {"documents": s.source_documents[src],
                              "tokens": s.source_tokens[src]}
                        for src in sorted(s.source_documents)},
            "length": {"p50": percentile(50), "p90": percentile(90), "p99": percentile(99),
                       "max": s.length_max, "mean": s.tokens / s.documents},
            "ngrams": ngrams,
            "top_situations": top(s.situations),
            "situation_count_error": (s.situated - sum(s.situations.values()))
                                     // (self.max_situations + 1),
            "top_sources": top(s.source_documents),
        }


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}"


def format_report(report: dict) -> str:
    """A few aligned lines for the console: one column per split."""
    splits = report["splits"]
    rows = [("corpus report", list(splits))]

    def row(label, values):
        rows.append((label, values))

    row("documents", [_n(s["documents"]) for s in splits.values()])
    row("tokens", [_n(s["tokens"]) for s in splits.values()])
    modes = dict.fromkeys(m for s in splits.values() for m in s["tokens_per_mode"])
    for m in modes:
        row(f"  mode {m}", [_n(s["tokens_per_mode"].get(m, 0)) for s in splits.values()])
    sources = sorted({src for s in splits.values() for src in s["sources"]})
    for src in sources:
        counts = [s["sources"].get(src, {"documents": 0, "tokens": 0}) for s in splits.values()]
        row(f"  source {src}", [f"{_n(c['tokens'])} ({_n(c['documents'])} docs)"
                                for c in counts])
    row("length p50/p90/p99/max", ["/".join(_n(s["length"][p]) for p in
                                            ("p50", "p90", "p99", "max"))
                                   for s in splits.values()])
    row("length mean", [_n(s["length"]["mean"]) for s in splits.values()])
    row("uniqueness " + "/".join(f"{n}" for n in NGRAMS) + "-gram",
        ["/".join("-" if g["uniqueness"] is None else
                  ("" if g["exact"] else "~") + f"{g['uniqueness']:.3f}"
                  for g in (s["ngrams"][str(n)] for n in NGRAMS)) for s in splits.values()])
    width = max(len(label) for label, _ in rows)
    cols = [max(len(v[i]) for _, v in rows) for i in range(len(splits))]
    lines = [label.ljust(width) + "  " + "  ".join(v.rjust(c) for v, c in zip(values, cols))
             for label, values in rows]
    for name, s in splits.items():
        lines.append(f"top situations ({name}): " + (", ".join(
            f"{k} {c:,}" for k, c in s["top_situations"]) or "-"))
    return "\n".join(lines)
