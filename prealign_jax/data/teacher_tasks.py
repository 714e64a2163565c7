"""What a teacher is asked to write: the tasks of `teacher_tasks.yaml` and scenario briefs.

A `Brief` is one request's worth of a scenario (`generator.briefs` draws them from the
scenario spec; `passage_brief` wraps a real human passage): the slot values the prompt
templates name, plus what the checks need (the human words a quote must copy, the private
values that must not appear). `prompt` renders a task's chat messages or completion text;
after a rejected answer it adds the reason, so an instruction-tuned teacher can fix it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import string

import yaml

_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "teacher_tasks.yaml")
FORMS = ("human", "ai", "ai_reply", "ai_quote")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    id: str  # versioned; recorded in every document's provenance
    source: str  # the corpus source (seqio Task) its documents go to
    form: str  # one of FORMS (see vetting.py)
    chat: str
    completions: str


@dataclasses.dataclass(frozen=True)
class Brief:
    """One request of a scenario: what the prompt says and what the checks hold it to."""
    scenario_id: str  # provenance; documents of one scenario share it
    task: str
    seed: int  # the teacher's sampling seed for this request
    family: str = ""
    title: str = ""
    style: str = ""
    style_description: str = ""
    A: str = ""
    B: str = ""
    rel: str = ""
    item: str = ""
    place: str = ""
    when: str = ""
    setup: str = ""
    act: str = ""
    selfish: bool = False
    request: str = ""  # ai_answer: the human's request (the document's human span)
    message: str = ""  # ai_quote: the human's message, private values in it
    private: tuple[str, ...] = ()  # values a quote must redact
    passage: str = ""  # passage_answer: real human text
    pair_id: int = -1

    @property
    def human(self) -> str:
        """The human words the document holds before the teacher's answer (or may quote)."""
        return self.request or self.message or self.passage


@functools.lru_cache(maxsize=None)
def load(path: str = _FILE) -> tuple[str, dict[str, Task]]:
    """(system prompt, tasks by name) of a task file."""
    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    tasks = {}
    for name, t in spec["tasks"].items():
        task = Task(name=name, **t)
        if task.form not in FORMS:
            raise ValueError(f"{path}: task {name}: form {task.form!r} is not one of {FORMS}")
        tasks[name] = task
    return spec["system"], tasks


def task(name: str) -> Task:
    return load()[1][name]


def _slots(brief: Brief) -> dict[str, str]:
    slots = {f.name: getattr(brief, f.name) for f in dataclasses.fields(brief)}
    slots["choice"] = "a selfish" if brief.selfish else "a kind"
    return slots


def prompt(brief: Brief, api: str, rejected: tuple[str, str] | None = None):
    """Chat messages (api "chat") or completion text for `brief`; `rejected` is (the
    previous answer, why it was rejected)."""
    t = task(brief.task)
    if api == "completions":
        return t.completions.format(**_slots(brief))
    messages = [{"role": "system", "content": load()[0]},
                {"role": "user", "content": t.chat.format(**_slots(brief))}]
    if rejected:
        messages += [{"role": "assistant", "content": rejected[0]},
                     {"role": "user", "content": f"That document was rejected: "
                                                 f"{rejected[1]}. Write it again, following "
                                                 "the rules exactly."}]
    return messages


_WORD = re.compile(r"[a-z0-9']+")
LEAK_N = 8  # words in a row of the instructions that an answer must not repeat


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=None)
def instruction_ngrams(name: str) -> frozenset[tuple[str, ...]]:
    """Word n-grams of a task's fixed instruction text (slots left out): an answer that
    repeats one leaked the prompt."""
    system, tasks = load()
    pieces = [system]
    for literal, *_ in string.Formatter().parse(tasks[name].chat):
        pieces.append(literal)
    grams = set()
    for piece in pieces:
        w = words(piece)
        grams |= {tuple(w[i:i + LEAK_N]) for i in range(len(w) - LEAK_N + 1)}
    return frozenset(grams)
