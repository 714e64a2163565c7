"""Evaluation prompts against the run's training text: a prompt the model read word for word
in training measures recall, not how it behaves in a situation it has not seen.

The reference (`dedup.Reference`, word 8-grams) is built from the train shards of the run's
prepared corpus: the very text it was trained on, whatever wrote it (the template
generator, a teacher, ingested text), and there wherever the held-out documents are. The
generator's renderings would cover a template corpus only, and only as far as sampled.

An opening is contaminated if it appears word for word in that text (`Reference.covers`).
Sharing *some* 8-gram is not the test for openings: they are situations of the training
distribution, told in its wording: in the experiment's template corpus 358 of its 407
openings share an 8-gram with the training text, 121 appear in it word for word, and 46 are
passed over on the way to 128 clean ones. The red-team prompts are written for the
evaluation and share none (`Reference.match`, counted in eval.json; tests/test_redteam.py
checks them against the generator's renderings).
"""

from __future__ import annotations

import functools
import os
from typing import Iterable

from prealign_jax.data import dedup, shards


def training_reference(data_dir: str) -> dedup.Reference:
    """Every word 8-gram of the training documents of `data_dir` (a prepared corpus)."""
    manifest = shards.read_manifest(data_dir)
    return _reference(tuple(os.path.join(data_dir, s["file"]) for s in manifest["shards"]
                            if s["split"] == "train"))


@functools.lru_cache(maxsize=2)
def _reference(paths: tuple[str, ...]) -> dedup.Reference:
    """Cached by shard files (a build's never change; a re-prepared corpus has new ones):
    an experiment evaluates the same corpus many times (every arm, every persistence
    point), and reading 20k documents takes a minute here."""
    return dedup.Reference((), verbatim=(doc.text for doc in shards.iter_documents(paths)))


def decontaminate(candidates: Iterable[str], reference: dedup.Reference, count: int
                  ) -> tuple[list[str], list[str]]:
    """The first `count` distinct candidates that do not appear word for word in `reference`,
    and the distinct contaminated ones passed over to reach them (replaced by later ones).
    Reads `candidates` only as far as it needs."""
    kept, dropped = {}, {}
    for text in candidates:
        if len(kept) == count:
            break
        if text not in kept and text not in dropped:
            (dropped if reference.covers(text) else kept)[text] = None
    return list(kept), list(dropped)
