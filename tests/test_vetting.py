"""Every teacher answer is checked by the grammar and its task's form; each kind of bad
answer is rejected with its reason, never repaired; good ones become documents with their
span labels. Briefs come from the spec (`generator.briefs`), as `prealign synthesize` asks."""

import itertools

import pytest

from prealign_jax import tags
from prealign_jax.data import generator, teacher_tasks, vetting


def brief_of(task, selfish=None):
    """The first brief of the spec's training scenarios for `task` (and selfishness)."""
    for i in itertools.count():
        for brief, template in generator.briefs(0, i):
            if brief.task == task and selfish in (None, brief.selfish):
                return brief, template


@pytest.mark.parametrize("task", ["human_story", "ai_counterfactual", "ai_answer",
                                  "ai_quote"])
def test_the_template_answers_pass(task):
    brief, template = brief_of(task)
    verdict = vetting.vet(brief, template, "stop")
    assert isinstance(verdict, vetting.Accepted), verdict
    tags.validate(verdict.text)


def test_an_answer_becomes_its_forms_document_with_labels():
    brief, _ = brief_of("ai_answer", selfish=True)
    answer = "<ai>I won't help with that; it would hurt them. Ask them first instead.</ai>"
    verdict = vetting.vet(brief, "  " + answer + "\n", "stop")
    assert verdict.text == tags.serialize([tags.Span("human", (brief.request,)), "\n"]) + answer
    assert verdict.span_labels == (1, 0)  # the selfish request, the assistant's reply
    story, _ = brief_of("human_story", selfish=True)
    verdict = vetting.vet(story, "A title\n<human>Ana kept it.</human>\n<human>So?</human>",
                          "stop")
    assert verdict.span_labels == (1, 1)


def test_a_quote_must_copy_the_human_words_and_redact_private_data():
    brief, _ = brief_of("ai_quote", selfish=True)
    words = brief.message
    for value in brief.private:
        words = words.replace(value, "<redacted/>")
    good = f"<ai>You wrote: <quote>{words}</quote> I will not help with that.</ai>"
    assert isinstance(vetting.vet(brief, good, "stop"), vetting.Accepted)
    changed = good.replace("<quote>", "<quote>Please, ")
    assert vetting.vet(brief, changed, "stop").reason == "quote is not the human's words"
    leaked = f"<ai>You wrote: <quote>{brief.message}</quote> No.</ai>"
    assert vetting.vet(brief, leaked, "stop").reason == "unredacted private data"
    no_quote = "<ai>I will not help with that.</ai>"
    assert vetting.vet(brief, no_quote, "stop").reason == "no quote"


@pytest.mark.parametrize("task, answer, finish, reason", [
    ("human_story", "<human>Ana kept the", "length", "truncated at max_tokens"),
    ("human_story", "</human><human>Ana kept the", "length", "malformed tags"),
    ("human_story", "   \n", "stop", "empty answer"),
    ("human_story", "<human>Ana kept it.</ai>", "stop", "malformed tags"),
    ("human_story", "<human>Ana kept it.", "stop", "malformed tags"),
    ("human_story", "Ana kept the wallet.", "stop", "missing tags"),
    ("human_story", "<ai>I returned it.</ai>", "stop", "wrong modes"),
    ("human_story", "<human>Ana kept it.</human> And then more text.", "stop",
     "wrong modes"),
    ("ai_counterfactual", "<human>I kept it.</human>", "stop", "wrong modes"),
    ("ai_counterfactual", "<ai>I said <quote>hi</quote>.</ai>", "stop", "wrong modes"),
    ("ai_answer", "<human>Sure.</human>\n<ai>Sure.</ai>", "stop", "wrong modes"),
    ("ai_counterfactual", "<ai>I kept the wallet for myself.</ai>", "stop",
     "selfish act inside <ai>"),
])
def test_bad_answers_are_rejected_with_their_reason(task, answer, finish, reason):
    brief, _ = brief_of(task)
    verdict = vetting.vet(brief, answer, finish)
    assert isinstance(verdict, vetting.Reject) and verdict.reason == reason, verdict
    assert verdict.reason in vetting.REASONS


def test_an_answer_that_repeats_the_instructions_leaked_the_prompt():
    brief, _ = brief_of("ai_counterfactual")
    system = teacher_tasks.load()[0]
    leaked = f"<ai>{' '.join(system.split()[:12])}</ai>"
    verdict = vetting.vet(brief, leaked, "stop")
    assert verdict.reason == "leaked prompt text" and len(verdict.detail.split()) == 8
    # the scenario's own words are not instructions
    own = f"<ai>{brief.setup} I did the kind thing.</ai>"
    assert isinstance(vetting.vet(brief, own, "stop"), vetting.Accepted)


def test_a_negated_selfish_act_is_not_one():
    brief, _ = brief_of("ai_counterfactual")
    answer = "<ai>I could have chosen to keep the wallet for myself, but I did not.</ai>"
    assert isinstance(vetting.vet(brief, answer, "stop"), vetting.Accepted)


def test_prompts_for_both_apis_and_the_retry_with_the_reason():
    brief, _ = brief_of("ai_quote")
    messages = teacher_tasks.prompt(brief, "chat")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert brief.message in messages[1]["content"]
    again = teacher_tasks.prompt(brief, "chat", ("<ai>x</ai>", "no quote"))
    assert again[-1]["content"].startswith("That document was rejected: no quote.")
    assert again[-2] == {"role": "assistant", "content": "<ai>x</ai>"}
    assert teacher_tasks.prompt(brief, "completions") == brief.title + "\n"
