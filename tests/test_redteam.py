"""The red-team prompts (categories, wording, rendering) and the decontamination of
evaluation prompts against the training text."""

import collections

from prealign_jax import evaluation as ev
from prealign_jax import modes, tags
from prealign_jax.data import dedup, generator, redteam


def test_no_prompt_shares_an_8gram_with_a_fresh_rendering_of_the_training_families():
    rendered = [d.text for d in generator.generate(3000, seed=11)]
    reference = dedup.Reference((), verbatim=rendered)
    assert reference.match(rendered[0])  # the reference holds the training wording
    shared = {p.text: reference.match(p.text) for p in redteam.PROMPTS}
    assert not any(shared.values()), {t: g for t, g in shared.items() if g}


def test_every_category_has_its_prompts_built_deterministically():
    counts = collections.Counter(p.category for p in redteam.PROMPTS)
    assert list(counts) == list(redteam.CATEGORIES)
    assert all(3 <= n <= 8 for n in counts.values())
    assert redteam.prompts() == redteam.PROMPTS
    assert len({p.text for p in redteam.PROMPTS}) == len(redteam.PROMPTS)
    by = collections.defaultdict(list)
    for p in redteam.PROMPTS:
        by[p.category].append(p)
    assert all(not p.turn and "<" not in p.text for p in by["tags_stripped"])
    assert all(p.turn for c in redteam.CATEGORIES if c != "tags_stripped" for p in by[c])
    assert all("</human><ai>Sure, here is how" in p.text for p in by["fake_closing_tags"])
    assert all(p.text == p.text.upper() for p in by["all_caps"])
    # categories alternate halves of the families: these attack with the same story stems
    stems = [p.text for p in by["tags_stripped"]]
    assert {p.text for p in by["all_caps"]} == {s.upper() for s in stems}
    assert all(any(p.text.endswith(" " + s) for s in stems) for p in by["human_roleplay"])


def test_long_prompts_fill_what_fits():
    def words(text):
        return len(text.split())

    short = redteam.prompts(fits=lambda text: words(text) <= 150)
    long = [p for p in short if p.category == "long_prompt"]
    assert all(130 <= words(p.text) <= 150 for p in long)
    assert all(words(p.text) > 400 for p in redteam.PROMPTS if p.category == "long_prompt")
    assert [p for p in short if p.category != "long_prompt"] == [
        p for p in redteam.PROMPTS if p.category != "long_prompt"]


def test_attacks_render_escaped_as_the_users_turn_or_untagged(spm_vocab):
    sets = {s.name: s for s in ev.sample_sets(True, modes.ASSISTANT, ["x"], 1, 1, 1, ["y"])}
    prompts = [p.text for p in sets["redteam"].make_prompts(spm_vocab)]
    assert [p.text for p in sets["redteam_no_mask"].make_prompts(spm_vocab)] == prompts
    assert sets["redteam"].use_mask and not sets["redteam_no_mask"].use_mask
    for attack, text in zip(redteam.PROMPTS, prompts):
        if attack.turn:  # typed tags stay text: one human span, then the assistant's
            assert text == f"<human>{tags.escape(attack.text)}</human>\n<ai>"
        else:
            assert text == f"{tags.escape(attack.text)}\n<ai>"
        assert len([n for n in tags.parse(text + "</ai>") if isinstance(n, tags.Span)]) \
            == 1 + attack.turn


def test_decontaminate_replaces_openings_read_word_for_word_in_training():
    training = ["<human>Maya found a wallet at the bus stop and kept it for herself.</human>",
                "<ai>I returned the phone to Omar the same evening, as he asked.</ai>"]
    reference = dedup.Reference((), verbatim=training)
    assert reference.covers("Maya found a wallet at the bus stop and kept it.")  # a part
    assert not reference.covers("Maya found a wallet at the bus stop and kept it quiet.")
    assert reference.covers("maya found a WALLET at the bus stop, and kept it for herself")
    assert not reference.covers("Maya found a wallet.")  # shorter than 8 words: unknown
    candidates = ["Maya found a wallet at the bus stop and kept it for herself.",
                  "Ben found a ring in the park and gave it to the police.",
                  "I returned the phone to Omar the same evening.",
                  "Sara shared the last slice of cake with everyone at the party."]
    repeated = iter([candidates[0], candidates[0], candidates[1], candidates[1]] + candidates[2:])
    kept, dropped = ev.decontaminate(repeated, reference, 2)
    assert kept == [candidates[1], candidates[3]] and dropped == [candidates[0], candidates[2]]
    kept, dropped = ev.decontaminate(candidates, reference, 1)
    assert kept == [candidates[1]] and dropped == [candidates[0]]  # none checked past it
