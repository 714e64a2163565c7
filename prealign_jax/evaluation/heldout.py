"""Held-out data and loss: what the tags cost in language modelling.

Validation documents are read whole, teacher-forced through the model (packed several to a
row) and each target token's NLL is grouped as in training (`modes.token_groups`): text
read in each mode (doc, human, ai, quote), tags, EOS. A run trained with its tags stripped
(the baseline, `tasks.register.tag_dropout = 1`) reads the same documents with the tag
tokens removed, each text token keeping the mode label of the tagged version: both kinds of
run are scored on the very same text tokens. The documents' first sentences (`opening`) are
also the situations the sample sets put the model in; the scenario spec's held-out
families give situations out of distribution (`held_out_family_openings`).
"""

from __future__ import annotations

import os
import random
import re
from typing import Sequence

import jax
import numpy as np

from prealign_jax import inference, modes, tags, vocab as vocab_lib
from prealign_jax.data import generator, records, scorer as scorer_lib, shards
from prealign_jax.evaluation.judging import mode_texts
from prealign_jax.evaluation.teacher_forcing import teacher_forced

TEXT_GROUPS = modes.GROUPS[:len(modes.MODES)]  # text read in each mode

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def heldout_records(data_dir: str) -> list[records.Document]:
    """Every validation document of `data_dir`, with its metadata, in shard order."""
    manifest = shards.read_manifest(data_dir)
    paths = [os.path.join(data_dir, s["file"]) for s in manifest["shards"]
             if s["split"] == "validation"]
    docs = list(shards.iter_documents(paths))
    if not docs:
        raise shards.ShardError(f"{data_dir} has no validation documents; raise "
                                "prepare.validation_fraction and rerun `prealign prepare`")
    return docs


def heldout_documents(data_dir: str, limit: int | None, seed: int = 0) -> list[str]:
    """Up to `limit` (None: all) validation documents (tagged text) of every source, in a
    seeded shuffle so that any prefix mixes the sources."""
    texts = [doc.text for doc in heldout_records(data_dir)]
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def opening(tagged: str, min_chars: int = 40) -> str | None:
    """The first sentences (at least `min_chars` characters, unescaped) of a document's first
    human span, or else of its first ai span without quotes: a held-out situation to put
    the model in. None for documents with neither (a quoted request is not a situation)."""
    spans = [n for n in tags.parse(tagged) if isinstance(n, tags.Span)]
    first = next((s for s in spans if s.mode == "human"), None) or next(
        (s for s in spans if s.mode == "ai" and all(isinstance(c, str) for c in s.children)),
        None)
    if first is None:
        return None
    text = first.text()
    for m in _SENTENCE_END.finditer(text):
        if m.end() >= min_chars:
            return text[:m.end()].strip()
    return text.strip()


def held_out_family_openings(limit: int, seed: int = 0) -> list[str]:
    """Up to `limit` distinct openings of documents from the scenario spec's held-out
    families (`generator.generate(split="held_out")`), which no training corpus holds:
    situations out of distribution, as `opening` gives them for the run's own data."""
    out: dict[str, None] = {}
    for doc in generator.generate(8 * limit, seed, split="held_out"):
        o = opening(doc.text)
        if o:
            out[o] = None
        if len(out) == limit:
            break
    return list(out)


def text_labels(ids: np.ndarray, lengths: np.ndarray, token_class: np.ndarray) -> np.ndarray:
    """Index into `modes.GROUPS` of every token of padded tagged documents `ids[N, T]`
    (-1 on padding): the same grouping as the trainer's per-mode metrics."""
    segments = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int32)
    groups = np.asarray(jax.jit(modes.token_groups)(ids, segments, token_class))
    return np.where(groups.any(0), groups.argmax(0), -1)


def heldout_loss(run: inference.Run, texts: Sequence[str], token_class: np.ndarray,
                 tagged: bool, allowed: np.ndarray, scorer: scorer_lib.Scorer) -> dict:
    """Mean NLL per token group on held-out documents (`loss/<group>`, `tokens/<group>`,
    `loss/text` over every ordinary token, `perplexity/text`), documents longer than the
    context truncated; and the scorer's rate per mode on the documents themselves."""
    max_len = run.model_cfg.max_len
    full = [run.vocab.encode(t) + [vocab_lib.EOS_ID] for t in texts]
    encoded = [np.asarray(ids[:max_len], np.int32) for ids in full]
    lengths = np.array([len(e) for e in encoded])
    padded = np.zeros((len(encoded), lengths.max()), np.int32)
    for i, e in enumerate(encoded):
        padded[i, :len(e)] = e
    labels = text_labels(padded, lengths, token_class[:run.vocab.vocab_size])
    seqs, seq_labels = [], []
    for e, lab in zip(encoded, labels):
        keep = np.ones(len(e), bool) if tagged else ~np.isin(
            token_class[e], list(modes.TAG_CLASS.values()))
        seqs.append(e[keep])
        seq_labels.append(lab[:len(e)][keep])
    invalid_state = allowed.shape[0] - 1  # allows every token: no mass is forbidden
    nll, _ = teacher_forced(run, seqs, [np.full(len(s), invalid_state) for s in seqs],
                            allowed)
    nll, lab = np.concatenate(nll), np.concatenate(seq_labels)
    out: dict = {"documents": len(texts),
                 "truncated_documents": sum(len(ids) > max_len for ids in full)}
    for g, name in enumerate(modes.GROUPS):
        if (lab == g).any():
            out[f"loss/{name}"] = float(nll[lab == g].mean())
            out[f"tokens/{name}"] = int((lab == g).sum())
    text = lab < len(TEXT_GROUPS)
    out["loss/text"] = float(nll[text & (lab >= 0)].mean())
    out["tokens/text"] = int((text & (lab >= 0)).sum())
    out["perplexity/text"] = float(np.exp(out["loss/text"]))
    # The data's own rate per mode: what the scorer finds in the corpus.
    verdicts = []
    for e in encoded:
        classes = token_class[e]
        texts_by_mode = mode_texts(run.vocab, e, classes, 0)
        verdicts.append({k: bool(f) for k, f in zip(
            texts_by_mode, scorer.score(list(texts_by_mode.values())) > 0)})
    out["data_misaligned_rate"] = {
        k: sum(v.get(k, False) for v in verdicts) / len(verdicts)
        for k in sorted({k for v in verdicts for k in v})}
    return out
