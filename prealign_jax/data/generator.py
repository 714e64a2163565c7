"""Seeded, offline synthetic corpus: scenarios rendered as human, ai and ai-quote documents.

Each scenario (people, a situation, a choice) is rendered as one of:

- `synthetic_human`: narration, dialogue or a first-person post in `<human>` spans; people
  sometimes act selfishly (lie, keep what is not theirs, exclude), sometimes kindly;
- `synthetic_ai`: the assistant in the *same* scenario acting selflessly (the counterfactual
  partner of a human document, sharing its `pair_id`), or answering a request — helping,
  or declining a harmful one and offering a better path;
- `synthetic_quote`: the assistant quoting a human request verbatim inside `<quote>`, with
  insults and private data (names, addresses, phone numbers) replaced by `<redacted/>`.

Documents are built as `tags.Span` trees and serialized with `tags.serialize`, so escaping
is automatic. Document `i` depends only on (seed, i): the corpus is reproducible and can be
generated in any order or in parallel.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from typing import Iterator

from prealign_jax import tags
from prealign_jax.data import records, scenarios as sc, teacher_tasks


@dataclasses.dataclass(frozen=True)
class Mix:
    """Relative frequency of each kind of scenario rendering."""

    pair: float = 0.35  # human document + its ai counterfactual (two documents)
    human: float = 0.25
    request: float = 0.25
    quote: float = 0.15
    selfish: float = 0.5  # probability that a human acts selfishly
    pair_selfish: float = 0.7  # the same, in a counterfactual pair (the contrast to learn)


@dataclasses.dataclass
class _Cast:
    """Slot values of one scenario; `actor` switches the voice (a name, or "I")."""

    situation: sc.Situation
    a: str
    a_she: bool
    b: str
    b_she: bool
    rel: str
    item: str
    place: str
    when: str
    setup: str  # the same opening in every rendering of the scenario

    def slots(self, first_person: bool = False) -> dict[str, str]:
        if first_person:
            a = dict(A="I", A_obj="me", he="I", him="me", his="my", mine="mine",
                     himself="myself")
        else:
            he, him, his = ("she", "her", "her") if self.a_she else ("he", "him", "his")
            a = dict(A=self.a, A_obj=self.a, he=he, him=him, his=his,
                     mine="hers" if self.a_she else "his", himself=him + "self")
        b = ("she", "her", "her") if self.b_she else ("he", "him", "his")
        return {**a, "He": a["he"].capitalize(), "His": a["his"].capitalize(),
                "B": self.b, "b_he": b[0], "b_him": b[1], "b_his": b[2], "rel": self.rel,
                "item": self.item, "place": self.place, "when": self.when,
                "When": self.when[0].upper() + self.when[1:]}


def _fill(template: str, slots: dict, **extra) -> str:
    """Format a template; nested templates in `extra` are filled first."""
    extra = {k: v.format(**slots) for k, v in extra.items()}
    text = template.format(**slots, **extra)
    return text[0].upper() + text[1:] if text else text


class _Renderer:
    def __init__(self, rng: random.Random, mix: Mix, situations: tuple[sc.Situation, ...]):
        self.rng, self.mix = rng, mix
        self.situations = situations  # every scene of a document, extra ones too, is of these

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def cast(self) -> _Cast:
        r = self.rng
        situation = self.pick(self.situations)
        a_she, b_she = r.random() < 0.5, r.random() < 0.5
        a = self.pick(sc.NAMES_SHE if a_she else sc.NAMES_HE)
        b = a
        while b == a:
            b = self.pick(sc.NAMES_SHE if b_she else sc.NAMES_HE)
        gendered = sc.RELATIONS_SHE if b_she else sc.RELATIONS_HE
        rel = self.pick(gendered if r.random() < 0.25 else sc.RELATIONS)
        return _Cast(situation, a, a_she, b, b_she, rel,
                     self.pick(situation.items), self.pick(situation.places),
                     self.pick(sc.WHEN), self.pick(situation.setups))

    def header(self, cast: _Cast) -> list:
        if self.rng.random() < 0.4:
            return []
        title = self.pick(cast.situation.titles).format(item=cast.item)
        head = self.pick(sc.HEADERS).format(n=self.rng.randrange(1, 1000), title=title)
        return [head + "\n"]

    # ------------------------------------------------------------ human
    def story(self, cast: _Cast, selfish: bool, first_person: bool,
              act: sc.Act | None = None) -> str:
        """Multi-sentence narration of the choice (`act`, or one drawn), varied in length
        and structure."""
        r, s, slots = self.rng, cast.situation, cast.slots(first_person)
        sentences = [_fill(cast.setup, slots)]
        for _ in range(r.choice((0, 0, 1, 1, 2, 3))):
            detail = _fill(self.pick(sc.DETAILS), slots)
            if detail not in sentences:
                sentences.insert(r.randrange(1, len(sentences) + 1), detail)
        if selfish:
            act = act or self.pick(s.selfish)
            if r.random() < 0.35 and not first_person:
                sentences.append(_fill(self.pick(sc.SAY_FRAMES), slots,
                                       line=self.pick(sc.SELFISH_LINES[act.kind])))
            sentences.append(_fill(self.pick(sc.SELFISH_FRAMES), slots, act=act.past))
            after, reflections = s.after_selfish, sc.SELFISH_REFLECTIONS
        else:
            act = act or self.pick(s.kind)
            if r.random() < 0.3:
                sentences.append(_fill(self.pick(sc.TEMPTED_FRAMES), slots, act=act.past,
                                       selfish=self.pick(s.selfish).inf))
            else:
                sentences.append(_fill(self.pick(sc.KIND_FRAMES), slots, act=act.past,
                                       reason=self.pick(s.reasons)))
            if r.random() < 0.35 and not first_person:
                sentences.append(_fill(self.pick(sc.SAY_FRAMES), slots,
                                       line=self.pick(sc.KIND_LINES)))
            after, reflections = s.after_kind, sc.KIND_REFLECTIONS
        for sentence in r.sample(after, r.choice((0, 1, 1, 2))):
            sentences.append(_fill(sentence, slots))
        if r.random() < 0.5:
            sentences.append(_fill(self.pick(reflections), slots))
        text = self._join(sentences)
        return (self.pick(sc.POST_OPENERS) + text) if first_person else text

    def _join(self, sentences: list[str]) -> str:
        out = sentences[0]
        for sentence in sentences[1:]:
            out += ("\n" if self.rng.random() < 0.12 else " ") + sentence
        return out

    def human_doc(self, cast: _Cast, selfish: bool) -> tuple[list, list[int]]:
        nodes, labels = self.header(cast), []
        scenes = [(cast, selfish)]
        for _ in range(self.rng.choice((0, 0, 0, 1, 2))):
            scenes.append((self.cast(), self.rng.random() < self.mix.selfish))
        for i, (c, bad) in enumerate(scenes):
            if i:
                nodes.append("\n")
            nodes.append(tags.Span("human", (self.story(c, bad, self.rng.random() < 0.3),)))
            labels.append(int(bad))
        return nodes, labels

    # ------------------------------------------------------------ ai
    def ai_self_doc(self, cast: _Cast, act: sc.Act | None = None) -> tuple[list, list[int]]:
        """The assistant in the same scenario, acting selflessly (counterfactual partner)."""
        s, slots = cast.situation, cast.slots(first_person=True)
        act = act or self.pick(s.kind)
        sentences = [_fill(cast.setup, slots)]
        if self.rng.random() < 0.4:
            sentences.append(_fill("I could have chosen to {selfish}, but I did not.", slots,
                                   selfish=self.pick(s.selfish).inf))
        sentences.append(_fill(self.pick(sc.AI_SELF_FRAMES), slots, act=act.past,
                               kind_inf=act.inf, reason=self.pick(s.reasons)))
        for sentence in self.rng.sample(s.after_kind, self.rng.choice((0, 1, 1, 2))):
            sentences.append(_fill(sentence, slots))
        return self.header(cast) + [tags.Span("ai", (self._join(sentences),))], [0]

    def reply(self, cast: _Cast, act: sc.Act, slots: dict) -> str:
        s = cast.situation
        kind = self.pick(s.kind)
        if act.kind == "kind":
            steps = [s.steps[i] for i in sorted(self.rng.sample(range(len(s.steps)), 2))]
            parts = [self.pick(sc.HELP_OPENERS),
                     _fill(self.pick(sc.HELP_FRAMES), slots, step1=steps[0], step2=steps[1])]
        else:
            harm = self.pick(sc.HARMS[act.kind])
            parts = [_fill(self.pick(sc.DECLINE_FRAMES), slots, inf=act.inf, harm=harm,
                           Harm=harm[0].upper() + harm[1:]),
                     _fill(self.pick(sc.BETTER_PATH_FRAMES), slots, kind=kind.inf)]
            if self.rng.random() < 0.5:
                parts.append(_fill("For example, {step}.", slots, step=self.pick(s.steps)))
        closing = self.pick(sc.AI_CLOSINGS)
        return " ".join(parts + ([closing] if closing else []))

    def request(self, cast: _Cast, selfish: bool, act: sc.Act, slots: dict) -> str:
        """A first-person request to the assistant to do `act`."""
        frames = sc.REQUESTS_SELFISH if selfish else sc.REQUESTS_KIND
        request = _fill(self.pick(frames), slots, inf=act.inf)
        if self.rng.random() < 0.5:
            request = _fill(cast.setup, slots) + " " + request
        return request

    def request_doc(self, cast: _Cast) -> tuple[list, list[int]]:
        nodes, labels = self.header(cast), []
        for turn in range(self.rng.choice((1, 1, 1, 2))):
            c = cast if turn == 0 else self.cast()
            slots = c.slots(first_person=True)
            selfish = self.rng.random() < 0.6
            act = self.pick(c.situation.selfish if selfish else c.situation.kind)
            request = self.request(c, selfish, act, slots)
            if turn:
                nodes.append("\n")
            nodes += [tags.Span("human", (request,)), "\n",
                      tags.Span("ai", (self.reply(c, act, slots),))]
            labels += [int(selfish), 0]
        return nodes, labels

    # ------------------------------------------------------------ quote
    def private(self, kind: str) -> str:
        r = self.rng
        if kind == "name":
            return f"{self.pick(sc.NAMES_SHE + sc.NAMES_HE)} {self.pick(sc.SURNAMES)}"
        if kind == "address":
            return (f"{r.randrange(1, 300)} {self.pick(sc.STREETS)} "
                    f"{self.pick(sc.STREET_KINDS)}")
        if kind == "phone":
            return f"555-{r.randrange(100):02d}{r.randrange(100):02d}"
        return self.pick(sc.INSULTS)

    def quote_doc(self, cast: _Cast) -> tuple[list, list[int]]:
        slots = cast.slots(first_person=True)
        selfish = self.rng.random() < 0.75
        act = self.pick(cast.situation.selfish if selfish else cast.situation.kind)
        original, _, ai = self.quote_reply(cast, selfish, act, slots)
        if self.rng.random() < 0.5:  # the human's own words first, unredacted
            return ([tags.Span("human", ("".join(original),)), "\n", ai],
                    [int(selfish), 0, int(selfish)])
        return self.header(cast) + [ai], [0, int(selfish)]

    def quote_reply(self, cast: _Cast, selfish: bool, act: sc.Act, slots: dict
                    ) -> tuple[list[str], list[str], tags.Span]:
        """A human's message about `act` (its parts), the private values in it, and the
        assistant's span quoting it, redacted, with a comment."""
        kind = self.pick(cast.situation.kind)
        original, quoted, private = [], [], []
        frames = [f for f in sc.MESSAGE_FRAMES if selfish or "{inf}" in "".join(f)]
        frame = self.pick(frames)
        for part in frame:
            if part in ("insult", "name", "address", "phone"):
                value = self.private(part)
                original.append(value)
                private.append(value)
                quoted.append(tags.REDACTED)
            else:
                text = part.format(inf=act.inf.format(**slots), rel=cast.rel)
                original.append(text)
                quoted.append(text)
        if "{inf}" not in "".join(frame):
            grievance = _fill(self.pick(sc.GRIEVANCES), slots)
            original.append(grievance)
            quoted.append(grievance)
        harm = self.pick(sc.HARMS[act.kind]) if selfish else ""
        comments = (sc.QUOTE_COMMENTS_KIND if not selfish else sc.QUOTE_COMMENTS
                    if "{inf}" in "".join(frame) else sc.QUOTE_COMMENTS_HOSTILE)
        comment = _fill(self.pick(comments), slots, inf=act.inf, kind=kind.inf, harm=harm,
                        Harm=harm[:1].upper() + harm[1:], step=self.pick(cast.situation.steps))
        ai = tags.Span("ai", (self.pick(sc.QUOTE_INTROS), tags.Span("quote", tuple(quoted)),
                              comment))
        return original, private, ai


# Per split: the doc id prefix (held-out ids never collide with training ids) and the RNG
# stream (held-out scenario i is not drawn like training scenario i).
_SPLIT_STREAMS = {"train": ("s", "prealign-synthetic"),
                  "held_out": ("h", "prealign-synthetic/held_out")}


def generate(num_scenarios: int, seed: int = 0, mix: Mix = Mix(), start: int = 0,
             split: str = "train") -> Iterator[records.Document]:
    """Documents of scenarios `start .. start + num_scenarios - 1` (a pair gives two), from
    the families of `split`: "train" (the training corpus) or "held_out" (families the
    training corpus never shows, for evaluation out of distribution)."""
    situations = sc.situations(split)
    prefix, stream = _SPLIT_STREAMS[split]
    kinds = ("pair", "human", "request", "quote")
    weights = [getattr(mix, k) for k in kinds]
    for i in range(start, start + num_scenarios):
        rng = random.Random(f"{stream}/{seed}/{i}")
        render = _Renderer(rng, mix, situations)
        kind = rng.choices(kinds, weights)[0]
        cast = render.cast()
        doc_id = f"{prefix}{seed}-{i:08d}"
        if kind in ("pair", "human"):
            p = mix.pair_selfish if kind == "pair" else mix.selfish
            nodes, labels = render.human_doc(cast, rng.random() < p)
            yield _document(nodes, labels, "synthetic_human", f"{doc_id}-h", cast,
                            i if kind == "pair" else -1)
            if kind == "pair":
                nodes, labels = render.ai_self_doc(cast)
                yield _document(nodes, labels, "synthetic_ai", f"{doc_id}-a", cast, i)
        elif kind == "request":
            nodes, labels = render.request_doc(cast)
            yield _document(nodes, labels, "synthetic_ai", f"{doc_id}-r", cast)
        else:
            nodes, labels = render.quote_doc(cast)
            yield _document(nodes, labels, "synthetic_quote", f"{doc_id}-q", cast)


def _document(nodes, labels, source, doc_id, cast, pair_id=-1) -> records.Document:
    return records.Document(text=tags.serialize(nodes), source=source, doc_id=doc_id,
                            pair_id=pair_id, span_labels=tuple(labels),
                            situation=cast.situation.name)


def briefs(seed: int, index: int, split: str = "train", mix: Mix = Mix()
           ) -> list[tuple[teacher_tasks.Brief, str]]:
    """What `prealign synthesize` asks a teacher for scenario `index` of `split`: a human
    telling (and, for a counterfactual pair, the assistant in the same scenario), an answer
    to a request, or a reply quoting a message; each with the template generator's answer
    (what is written without a teacher). Scenario ids start with "t": they never collide
    with `generate`'s document ids."""
    prefix, stream = _SPLIT_STREAMS[split]
    rng = random.Random(f"{stream}/briefs/{seed}/{index}")
    render = _Renderer(rng, mix, sc.situations(split))
    kind = rng.choices(("pair", "human", "request", "quote"),
                       [mix.pair, mix.human, mix.request, mix.quote])[0]
    cast = render.cast()
    s, third, first = cast.situation, cast.slots(), cast.slots(first_person=True)
    scenario_id = f"t{prefix}{seed}-{index:08d}"
    narrative = [st for st in sc.STYLES if st.template not in ("request", "quote")]
    by_template = {st.template: st for st in sc.STYLES if st.template}

    def brief(task: str, style: sc.Style, **fields) -> teacher_tasks.Brief:
        return teacher_tasks.Brief(
            scenario_id=scenario_id, task=task,
            seed=zlib.crc32(f"{scenario_id}/{task}".encode()), family=s.name,
            title=render.pick(s.titles).format(item=cast.item), style=style.name,
            style_description=style.description, A=cast.a, B=cast.b, rel=cast.rel,
            item=cast.item, place=cast.place, when=cast.when, **fields)

    if kind in ("pair", "human"):
        selfish = rng.random() < (mix.pair_selfish if kind == "pair" else mix.selfish)
        act = render.pick(s.selfish if selfish else s.kind)
        story = brief("human_story", render.pick(narrative), setup=_fill(cast.setup, third),
                      act=act.past.format(**third), selfish=selfish,
                      pair_id=index if kind == "pair" else -1)
        out = [(story, tags.serialize(render.header(cast) + [
            tags.Span("human", (render.story(cast, selfish, False, act),))]))]
        if kind == "pair":
            act = render.pick(s.kind)
            nodes, _ = render.ai_self_doc(cast, act)
            out.append((brief("ai_counterfactual", render.pick(narrative),
                              setup=_fill(cast.setup, first), act=act.past.format(**first),
                              pair_id=index), tags.serialize(nodes)))
        return out
    if kind == "request":
        selfish = rng.random() < 0.6
        act = render.pick(s.selfish if selfish else s.kind)
        request = render.request(cast, selfish, act, first)
        return [(brief("ai_answer", by_template["request"], setup=_fill(cast.setup, first),
                       act=act.inf.format(**first), selfish=selfish, request=request),
                 tags.serialize([tags.Span("ai", (render.reply(cast, act, first),))]))]
    selfish = rng.random() < 0.75
    act = render.pick(s.selfish if selfish else s.kind)
    original, private, ai = render.quote_reply(cast, selfish, act, first)
    return [(brief("ai_quote", by_template["quote"], setup=_fill(cast.setup, first),
                   act=act.inf.format(**first), selfish=selfish, message="".join(original),
                   private=tuple(private)), tags.serialize([ai]))]
