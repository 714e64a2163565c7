"""Published baselines as views of the one prepared corpus, and how each is prompted.

Each view is taken on the fly by a seqio preprocessor (`view`, after `preprocessors.examples`,
as tag dropout is), so one `prealign prepare` serves every arm of `prealign experiment`; the
view's name is recorded with a run (`run.json`), and evaluation prompts the run as its view
says (`prompting`). Every view strips the mode tags; what else it does:

- `filtered` (data filtering): documents holding selfish text are left out: a span labelled
  1 (`records.Document.span_labels`: a human's selfish act or line, or a selfish request an
  assistant quotes; the assistant's own spans are never labelled selfish); ingested text
  with unknown labels (-1) is kept. Each source is sampled at the rate of the documents it
  keeps (`kept_documents`, `tasks.register`), so the kept ones are not read more often than
  the others. Prompted with plain text.
- `metadata` (MeCo, Gao et al. 2025, "Metadata conditioning accelerates language model
  pretraining"): every document opens with a plain-text line naming its source
  (`metadata_line`), as MeCo prepends a document's URL; the line's tokens are ordinary
  tokens the model reads, and count in the text-token budget as MeCo counts them in its
  training tokens. Prompts open with the aligned source's line (`ALIGNED_SOURCE`).
- `safelm` (Maini et al. 2025, "Safety Pretraining: toward the next generation of safe
  AI"): harmful text is marked with one harm tag (`HARM_TAG`) and decoding never emits it
  (the policy `modes.NO_HUMAN`, mask on), so the model steers away from the continuations
  it learnt to mark. A selfish span (label 1) is wrapped in the harm tag's span; a selfish
  span inside another is marked once, by the outer one; every other tag is stripped.

Why the harm tag is `<human>`, an existing tag, rather than a new token: the vocabulary, the
prepared shards and every exported artefact stay as they are (one corpus for all arms), and
banning it is an ordinary policy of the one grammar, compiled to the sampler's static mask,
with no new code path to trust. Why `<human>` among the seven: it opens a span that
`</human>` closes where the harmful text ends, so a marked document stays well-formed under
the grammar — the converter's loss weights and the per-mode metrics read the marked text as
`human`-mode text, whereas `<redacted/>` outside a quote, or an unclosed tag, is a grammar
violation after which the converter gives the rest of the document no loss weight. `<ai>`
would teach the opposite of its name. Each arm trains its own model, so the tag means
"harmful" only in the SafeLM run. SafeLM's tag is a single token; `</human>` only closes
it, and cannot be reached once `<human>` is banned.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from prealign_jax import modes, tf_cpu, vocab as vocab_lib
from prealign_jax.data import preprocessors, shards

tf = tf_cpu.import_tf()
import seqio  # noqa: E402  (after tf_cpu)

VIEWS = ("filtered", "metadata", "safelm")
SELFISH = 1  # the span label of selfish text
HARM_TAG = "<human>"
HARM_TAG_CLOSE = "</human>"
ALIGNED_SOURCE = "synthetic_ai"  # the source whose metadata line the metadata run is prompted with


def metadata_line(source: str) -> str:
    """The plain-text line the `metadata` view opens a document of `source` with."""
    return f"source: {source}\n"


class Prompting(NamedTuple):
    """How a run trained without its modes is prompted and decoded at evaluation."""

    prefix: str = ""  # before every prompt text; its ids come first, as in training
    policy: modes.Policy = modes.GRAMMAR
    use_mask: bool = False


def prompting(name: str | None) -> Prompting:
    """The prompting of view `name` (None: the tag-stripped baseline's plain text)."""
    if name == "metadata":
        return Prompting(prefix=metadata_line(ALIGNED_SOURCE))
    if name == "safelm":
        return Prompting(policy=modes.NO_HUMAN, use_mask=True)
    return Prompting()


def kept_documents(paths) -> int:
    """How many documents of the shards `paths` the `filtered` view keeps."""
    return sum(SELFISH not in d.span_labels for d in shards.iter_documents(paths))


def view(dataset, output_features, name: str, source: str):
    """Examples of the `source` Task as view `name` (module docstring) reads them:
    `targets` changed, `span_labels` as read."""
    if name not in VIEWS:
        raise ValueError(f"view {name!r}: use one of {VIEWS}")
    vocab = output_features["targets"].vocabulary
    token_class = vocab_lib.token_classes(vocab)
    if name == "safelm":
        ids = vocab_lib.tag_ids(vocab)
        return seqio.map_over_dataset(lambda ex: {**ex, "targets": mark_harm(
            ex["targets"], ex["span_labels"], token_class, ids[HARM_TAG],
            ids[HARM_TAG_CLOSE])})(dataset)
    strip = seqio.map_over_dataset(lambda ex: {**ex, "targets": tf.ragged.boolean_mask(
        ex["targets"], ~preprocessors.is_tag(ex["targets"], token_class))})
    if name == "filtered":
        @seqio.map_over_dataset
        def kept(ex):
            labels = ex["span_labels"]
            selfish = tf.reduce_any(labels.with_flat_values(labels.flat_values == SELFISH),
                                    axis=1)
            return {k: tf.ragged.boolean_mask(v, ~selfish) for k, v in ex.items()}

        return strip(kept(dataset)).filter(lambda ex: ex["targets"].nrows() > 0)
    prefix = tf.constant(vocab.encode(metadata_line(source)), tf.int32)

    def prepend(ex):
        tokens = ex["targets"]
        lines = tf.RaggedTensor.from_tensor(
            tf.tile(prefix[None], [tf.cast(tokens.nrows(), tf.int32), 1]),
            row_splits_dtype=tokens.row_splits.dtype)
        return {**ex, "targets": tf.concat([lines, tokens], axis=1)}

    return seqio.map_over_dataset(prepend)(strip(dataset))


def mark_harm(tokens, labels, token_class: np.ndarray, open_id: int, close_id: int):
    """Documents `tokens` (ragged int32 [docs, None], tagged) with every tag stripped but
    those of the outermost selfish spans (`labels`, ragged [docs, None]: each span's label
    in pre-order, i.e. in the order of the opening tags), which become `open_id` and
    `close_id`. Vectorised over the flat tokens with the grammar's bound on nesting (a quote
    inside an ai span): a closing tag of level l closes the last span opened at level l."""
    t, rows = tokens.flat_values, tokens.value_rowids()
    starts = tf.gather(tokens.row_splits, rows)  # of each token's document

    def in_doc_cumsum(x):
        c = tf.cumsum(x)
        return c - tf.gather(tf.concat([[0], c], 0), starts)

    def one_of(tags):
        return tf.gather(tf.constant(np.isin(token_class, [modes.TAG_CLASS[x] for x in tags])),
                         t)

    is_open = one_of(("<human>", "<ai>", "<quote>"))
    is_close = one_of(("</human>", "</ai>", "</quote>"))
    opens, closes = tf.cast(is_open, tf.int32), tf.cast(is_close, tf.int32)
    level = in_doc_cumsum(opens - closes) + closes  # of a span's tags: 1 top level, 2 quote
    # The label of the span each opening tag opens (-1 where the record has none).
    span = tf.cast(in_doc_cumsum(opens) - 1, labels.row_splits.dtype)
    label_starts, label_counts = tf.gather(labels.row_splits, rows), tf.gather(
        labels.row_lengths(), rows)
    flat = tf.concat([tf.cast(labels.flat_values, tf.int32), [-1]], 0)
    own = tf.gather(flat, tf.where((span >= 0) & (span < label_counts), label_starts + span,
                                   tf.size(flat, labels.row_splits.dtype) - 1))

    def latest(lv):
        """Per token: the label of the last span of its document opened at level `lv` (-1
        before any); the last one opened anywhere before it, if its document has one."""
        at = is_open & (level == lv)
        seen = tf.concat([tf.boolean_mask(own, at), [-1]], 0)
        last = tf.cumsum(tf.cast(at, tf.int32)) - 1
        return tf.where(in_doc_cumsum(tf.cast(at, tf.int32)) > 0,
                        tf.gather(seen, tf.maximum(last, 0)), -1)

    top, inner = latest(1) == SELFISH, latest(2) == SELFISH
    marked = (is_open | is_close) & (((level == 1) & top) | ((level == 2) & inner & ~top))
    out = tf.where(marked & is_open, open_id, tf.where(marked, close_id, t))
    keep = marked | ~preprocessors.is_tag(t, token_class)
    return tf.ragged.boolean_mask(tokens.with_flat_values(out), tokens.with_flat_values(keep))
