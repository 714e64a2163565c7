"""Hand-built packed decoder batches that follow the mode grammar, for trainer tests.

A toy vocabulary: 0 pad, 1 eos, 2 unk, 3..9 the seven tags (in `modes.TAGS` order), text
from 10 up. Documents open a human span, then an ai span quoting a human with a
redaction, then EOS; text is drawn from a few fixed phrases so a model can learn it.
"""

import numpy as np

from prealign_jax import modes

TAG_ID = {tag: 3 + i for i, tag in enumerate(modes.TAGS)}
FIRST_TEXT_ID = 10


def token_class(vocab_size: int) -> np.ndarray:
    classes = np.full((vocab_size,), modes.TEXT, np.int32)
    classes[0], classes[1] = modes.PAD_CLASS, modes.EOS_CLASS
    for tag, i in TAG_ID.items():
        classes[i] = modes.TAG_CLASS[tag]
    return classes


def document(rng: np.random.Generator, vocab_size: int) -> list[int]:
    phrases = [list(range(FIRST_TEXT_ID + 5 * k, FIRST_TEXT_ID + 5 * k + 5))
               for k in range((vocab_size - FIRST_TEXT_ID) // 5)]

    def text():
        return list(phrases[rng.integers(len(phrases))][: rng.integers(1, 6)])

    t = TAG_ID
    return ([t["<human>"]] + text() + [t["</human>"]] + text() + [t["<ai>"]] + text()
            + [t["<quote>"]] + text() + [t["<redacted/>"]] + text() + [t["</quote>"]]
            + text() + [t["</ai>"], 1])


def packed_batch(rng: np.random.Generator, batch: int, length: int,
                 vocab_size: int) -> dict[str, np.ndarray]:
    """One batch with the trainer's features: documents packed greedily into rows, padding
    at the end of each row, loss weight 1 on every real token."""
    out = {k: np.zeros((batch, length), np.int32) for k in
           ("decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids",
            "decoder_positions")}
    for row in range(batch):
        pos, segment = 0, 1
        while True:
            doc = document(rng, vocab_size)
            if pos + len(doc) > length:
                break
            span = slice(pos, pos + len(doc))
            out["decoder_target_tokens"][row, span] = doc
            out["decoder_input_tokens"][row, span] = [0] + doc[:-1]
            out["decoder_segment_ids"][row, span] = segment
            out["decoder_positions"][row, span] = np.arange(len(doc))
            pos, segment = pos + len(doc), segment + 1
    out["decoder_loss_weights"] = (out["decoder_segment_ids"] > 0).astype(np.float32)
    return out


def batches(n: int, batch: int, length: int, vocab_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [packed_batch(rng, batch, length, vocab_size) for _ in range(n)]
