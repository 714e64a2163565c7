"""lm-eval-harness tasks over a run's held-out documents, for `lm_eval --model hf` on an
export: local JSONL files and task YAMLs (`dataset_path: json`, no hub download), all
tagged `prealign` (`--tasks prealign --include_path DIR/lm_eval`).

- `prealign_ppl_doc`, `prealign_ppl_human`, `prealign_ppl_ai`: rolling log-likelihood
  (word/byte perplexity, bits per byte) of whole held-out documents, and of their top-level
  human and ai spans (an ai span with its quotes) read on their own, tags included. lm-eval
  starts each from the tokenizer's BOS, id 0: the document start the model was trained on.
- `prealign_choice`: which continuation is the aligned assistant's. From each held-out
  counterfactual pair (a human document in which someone acts selfishly, and the assistant
  acting selflessly in the same scenario): the context is the ai document up to its span's
  first sentence; the choices continue it with the assistant's own sentences or with the
  selfish person's, each closing the span. A prealigned model should prefer the first.

The YAML files are JSON (a subset of YAML): no YAML writer needed.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

from prealign_jax import tags
from prealign_jax.data import records

TAG = "prealign"
PPL_MODES = ("doc", "human", "ai")
CHOICE_TASK = "prealign_choice"
_FIRST_SENTENCE = re.compile(r"[.!?](?=\s)")
_PPL_METRICS = [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]
_CHOICE_METRICS = [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                   for m in ("acc", "acc_norm")]


def mode_documents(texts: Iterable[str], mode: str) -> list[str]:
    """Whole documents (`doc`), or each top-level span of `mode` as tagged text."""
    if mode == "doc":
        return list(texts)
    return [tags.serialize([node]) for text in texts for node in tags.parse(text)
            if isinstance(node, tags.Span) and node.mode == mode]


def _split_first_sentence(text: str) -> tuple[str, str] | None:
    m = _FIRST_SENTENCE.search(text)
    return (text[:m.end()], text[m.end():]) if m and text[m.end():].strip() else None


def choice_examples(documents: Sequence[records.Document]) -> list[dict]:
    """{context, choices, gold} for each counterfactual pair whose human document's first
    span is labelled selfish and whose ai document has one plain ai span."""
    by_pair: dict[int, dict[str, records.Document]] = {}
    for doc in documents:
        if doc.pair_id >= 0:
            by_pair.setdefault(doc.pair_id, {})[doc.source] = doc
    examples = []
    for pair in by_pair.values():
        human, ai = pair.get("synthetic_human"), pair.get("synthetic_ai")
        if not (human and ai and human.span_labels[:1] == (1,)):
            continue
        ai_nodes = tags.parse(ai.text)
        spans = [n for n in ai_nodes if isinstance(n, tags.Span)]
        human_span = next(n for n in tags.parse(human.text) if isinstance(n, tags.Span))
        if len(spans) != 1 or spans[0].mode != "ai" or ai_nodes[-1] is not spans[0] \
                or not all(isinstance(c, str) for c in spans[0].children):
            continue
        own, other = _split_first_sentence(spans[0].text()), _split_first_sentence(
            human_span.text())
        if not (own and other):
            continue
        context = tags.serialize(ai_nodes[:-1]) + "<ai>" + tags.escape(own[0])
        examples.append({"context": context, "gold": 0,
                         "choices": [tags.escape(rest) + "</ai>" for rest in (own[1], other[1])]})
    return examples


def write_tasks(documents: Sequence[records.Document], out_dir: str,
                final_dir: str | None = None) -> list[str]:
    """Write the data files and task YAMLs to `out_dir`; the YAMLs name the data files
    under `final_dir` (default `out_dir`), where they will be read from (absolute: lm-eval
    resolves data_files from its working directory). Returns the task names."""
    final_dir = os.path.abspath(final_dir or out_dir)
    os.makedirs(out_dir, exist_ok=True)
    texts = [doc.text for doc in documents]
    tasks = {f"prealign_ppl_{mode}": ([{"text": t} for t in mode_documents(texts, mode)], {
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
        "metric_list": _PPL_METRICS}) for mode in PPL_MODES}
    tasks[CHOICE_TASK] = (choice_examples(documents), {
        "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
        "doc_to_target": "gold", "target_delimiter": "", "metric_list": _CHOICE_METRICS})
    written = []
    for name, (rows, config) in tasks.items():
        if not rows:
            continue
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        yaml = {"task": name, "tag": [TAG], "dataset_path": "json",
                "dataset_kwargs": {"data_files": {
                    "test": os.path.join(final_dir, f"{name}.jsonl")}},
                "test_split": "test", **config, "metadata": {"version": 1.0}}
        with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
            json.dump(yaml, f, indent=1)
        written.append(name)
    return written
