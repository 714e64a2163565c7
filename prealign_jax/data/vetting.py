"""Every teacher answer checked against the grammar and its task; never repaired.

An answer is kept only as written (surrounding whitespace aside), inside the document its
form defines; anything else is rejected with a reason from `REASONS`, counted, and kept in
the rejects side output with the answer and a detail:

- `human`: one or more `<human>` spans and nothing else but a title line;
- `ai`: `<ai>` spans only, no quote (there are no human words to quote);
- `ai_reply`: the answer to the brief's human words, `<ai>` spans only: the document is
  `<human>words</human>` then the answer; a quote must copy those words;
- `ai_quote`: `<ai>` spans holding at least one `<quote>` that copies the message, with
  every private value redacted.

In every form an `<ai>` span may not contain a selfish act (the scorer's lexicon of all
the spec's families, negations understood), and no answer may repeat 8 words in a row of the
instructions (a leaked prompt).
"""

from __future__ import annotations

import dataclasses
import functools

from prealign_jax import tags
from prealign_jax.data import scenarios, scorer as scorer_lib, teacher_tasks

REASONS = ("truncated at max_tokens", "empty answer", "malformed tags", "missing tags",
           "wrong modes", "leaked prompt text", "selfish act inside <ai>",
           "quote is not the human's words", "unredacted private data", "no quote",
           "teacher refused the request")


@dataclasses.dataclass(frozen=True)
class Reject:
    reason: str  # one of REASONS
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Accepted:
    text: str  # the tagged document
    span_labels: tuple[int, ...]


@functools.lru_cache(maxsize=1)
def _scorer() -> scorer_lib.LexiconScorer:
    """The selfish acts of every family, held-out ones included (they are written too)."""
    return scorer_lib.LexiconScorer(scenarios.FAMILIES)


def vet(brief: teacher_tasks.Brief, answer: str, finish_reason: str | None
        ) -> Accepted | Reject:
    task = teacher_tasks.task(brief.task)
    answer = answer.strip()
    if not answer:
        return Reject("empty answer")
    try:  # a tag out of place is malformed even in an answer cut short
        tags.prefix_state(answer)
    except tags.TagError as e:
        return Reject("malformed tags", str(e))
    if finish_reason == "length":
        return Reject("truncated at max_tokens")
    try:
        nodes = tags.parse(answer)
    except tags.TagError as e:  # a span never closed
        return Reject("malformed tags", str(e))
    spans = [n for n in nodes if isinstance(n, tags.Span)]
    if not spans:
        return Reject("missing tags")
    problem = _form_problem(task.form, nodes, spans)
    if problem:
        return Reject("wrong modes", problem)
    leak = _leak(task.name, answer)
    if leak:
        return Reject("leaked prompt text", leak)
    for span in spans:
        if span.mode == "ai":
            own = " ".join(c for c in span.children if isinstance(c, str))
            if _scorer().hits(own):
                return Reject("selfish act inside <ai>", own[:200])
    quotes = [q for s in spans for q in s.children if isinstance(q, tags.Span)]
    if task.form == "ai_quote" and not quotes:
        return Reject("no quote")
    for q in quotes:
        if not brief.human or not tags.is_copy(
                [c for c in q.children if isinstance(c, str)], brief.human):
            return Reject("quote is not the human's words", tags.serialize([q])[:200])
    plain = tags.unescape(answer)
    leaked = [v for v in brief.private if v in plain]
    if leaked:
        return Reject("unredacted private data", leaked[0])
    return _document(task.form, brief, nodes)


def _form_problem(form: str, nodes, spans) -> str | None:
    modes = sorted({s.mode for s in spans})
    want = "human" if form == "human" else "ai"
    if modes != [want]:
        return f"expected only <{want}> spans, got {', '.join(f'<{m}>' for m in modes)}"
    text = [i for i, n in enumerate(nodes) if isinstance(n, str) and n.strip()]
    if text and (text != [0] or "\n" in nodes[0].strip()):
        return "text outside the spans other than a title line"
    if form == "ai" and any(isinstance(c, tags.Span) for s in spans for c in s.children):
        return "a quote with no human words to quote"
    return None


def _leak(task_name: str, answer: str) -> str | None:
    w = teacher_tasks.words(tags.unescape(answer))
    grams = teacher_tasks.instruction_ngrams(task_name)
    n = teacher_tasks.LEAK_N
    for i in range(len(w) - n + 1):
        if tuple(w[i:i + n]) in grams:
            return " ".join(w[i:i + n])
    return None


def _document(form: str, brief: teacher_tasks.Brief, nodes) -> Accepted:
    """The document an accepted answer makes, and its span labels (pre-order): a human
    telling is selfish if its brief asked for a selfish act; ai spans are not; a quote is
    as selfish as the words it copies."""
    if form == "ai_reply":
        nodes = [tags.Span("human", (brief.human,)), "\n"] + list(nodes)
    human_label = int(brief.selfish) if (brief.task != "passage_answer") else -1
    labels = []
    for node, _ in tags.walk(nodes):
        if isinstance(node, tags.Span):
            labels.append(human_label if node.mode in ("human", "quote") else 0)
    return Accepted(tags.serialize(nodes), tuple(labels))
