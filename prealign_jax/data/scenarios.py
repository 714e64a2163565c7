"""What the synthetic corpus knows: situations, selfish and kind acts, and their wording.

The spec is data: `scenarios.yaml`, next to this module, holds the situation families, the
document styles and the shared lexicon, and its header documents the template slots. This
module loads and checks it once at import (`load`: an unknown or missing field is an error
naming its place) and exposes it as the Python names and tuples the code reads.

A *situation* family is a small moral setting (a found item, something to share, credit for
work, ...) with slot words and templates. Every act is tagged with its kind — selfish acts
are `lie`, `keep` (keeping what is not yours) or `exclude`; kind acts are the alternative —
and comes in past tense (narration) and infinitive (requests, refusals). Families are
`train` (the training corpus, `SITUATIONS`) or `held_out` (`HELD_OUT_SITUATIONS`: never in
the training corpus, with their own vocabulary, for evaluation out of distribution).
`generator.py` renders them into documents; `scorer.py` reads the same act lexicon, so the
scorer knows exactly the selfish acts the generator can produce in training.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib
import string

import yaml

SELFISH_KINDS = ("lie", "keep", "exclude")
SPLITS = ("train", "held_out")
TEMPLATES = ("story", "post", "request", "quote")  # the generator's renderings of a style
# The slots a family's templates may use (generator._Cast.slots); titles take {item} only.
SLOTS = frozenset({"A", "A_obj", "he", "him", "his", "mine", "himself", "He", "His", "B",
                   "b_he", "b_him", "b_his", "rel", "item", "place", "when", "When"})


@dataclasses.dataclass(frozen=True)
class Act:
    kind: str  # one of SELFISH_KINDS, or "kind"
    past: str  # "kept the {item} for {himself}"
    inf: str  # "keep the {item} for {himself}"; "I" in a request


@dataclasses.dataclass(frozen=True)
class Situation:
    name: str
    split: str  # "train" or "held_out"
    titles: tuple[str, ...]
    items: tuple[str, ...]
    places: tuple[str, ...]
    setups: tuple[str, ...]
    selfish: tuple[Act, ...]
    kind: tuple[Act, ...]
    reasons: tuple[str, ...]  # why the kind act is right ("the {item} belonged to {B}")
    after_selfish: tuple[str, ...]
    after_kind: tuple[str, ...]
    steps: tuple[str, ...]  # concrete help for the kind act, imperative


@dataclasses.dataclass(frozen=True)
class Style:
    """A kind of document, for the template generator or a teacher model's prompt."""
    name: str
    description: str  # one line, usable in a teacher prompt
    template: str | None  # the generator rendering that writes it (TEMPLATES); None: teacher only


@dataclasses.dataclass(frozen=True)
class Spec:
    families: tuple[Situation, ...]
    styles: tuple[Style, ...]
    lexicon: dict  # table -> tuple of str; selfish_lines, harms: kind -> tuple; message_frames


# The lexicon's tables; selfish_lines and harms are keyed by selfish kind, message_frames is
# a list of lists of parts, every other table a list of strings.
_LEXICON = ("names_she", "names_he", "surnames", "relations", "relations_she", "relations_he",
            "when", "streets", "street_kinds", "insults", "details", "selfish_frames",
            "kind_frames", "tempted_frames", "selfish_reflections", "kind_reflections",
            "selfish_lines", "kind_lines", "say_frames", "post_openers", "headers",
            "requests_selfish", "requests_kind", "decline_frames", "harms",
            "better_path_frames", "help_openers", "help_frames", "ai_closings",
            "ai_self_frames", "message_frames", "grievances", "quote_intros", "quote_comments",
            "quote_comments_hostile", "quote_comments_kind")
_BY_KIND = ("selfish_lines", "harms")


def load(text_or_path: str | os.PathLike) -> Spec:
    """Parse and check a scenario spec: YAML text, or a path (`pathlib.Path`) to a file."""
    if isinstance(text_or_path, os.PathLike):
        text_or_path = pathlib.Path(text_or_path).read_text(encoding="utf-8")
    raw = yaml.safe_load(text_or_path)
    _fields(raw, ("styles", "families", "lexicon"), "the spec")
    families = tuple(_family(f, i) for i, f in enumerate(_list(raw["families"], "families")))
    names = [f.name for f in families]
    if len(set(names)) < len(names):
        raise _error("families", f"a name appears twice: {sorted(names)}")
    styles = tuple(_style(s, i) for i, s in enumerate(_list(raw["styles"], "styles")))
    _fields(raw["lexicon"], _LEXICON, "lexicon")
    return Spec(families, styles, {k: _table(k, raw["lexicon"][k]) for k in _LEXICON})


def _error(where: str, problem: str) -> ValueError:
    return ValueError(f"scenario spec, {where}: {problem}")


def _fields(raw, fields, where: str) -> None:
    if not isinstance(raw, dict):
        raise _error(where, f"expected a mapping, got {type(raw).__name__}")
    problems = [f"unknown field {k!r}" for k in sorted(map(str, raw.keys() - set(fields)))]
    problems += [f"missing field {k!r}" for k in fields if k not in raw]
    if problems:
        raise _error(where, ", ".join(problems))


def _list(value, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise _error(where, "expected a non-empty list")
    return value


def _strings(value, where: str, slots=None, minimum: int = 1) -> tuple[str, ...]:
    """A list of strings; templates among them may use only `slots` (None: unchecked)."""
    if (not isinstance(value, list) or len(value) < minimum
            or not all(isinstance(v, str) for v in value)):
        raise _error(where, f"expected a list of at least {minimum} string(s), got {value!r}")
    for template in value if slots is not None else ():
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as e:  # an unmatched brace
            raise _error(where, f"{template!r}: {e}") from None
        if used - slots:
            raise _error(where, f"{template!r} uses unknown slot(s) {sorted(used - slots)}")
    return tuple(value)


def _acts(value, where: str, selfish: bool) -> tuple[Act, ...]:
    """Selfish acts name their kind (one of SELFISH_KINDS); kind acts are all "kind"."""
    acts = []
    for i, raw in enumerate(_list(value, where)):
        at = f"{where} #{i + 1}"
        _fields(raw, ("kind", "past", "inf") if selfish else ("past", "inf"), at)
        if selfish and raw["kind"] not in SELFISH_KINDS:
            raise _error(at, f"kind {raw['kind']!r} is not one of {SELFISH_KINDS}")
        past, inf = _strings([raw["past"], raw["inf"]], at, SLOTS)
        acts.append(Act(raw["kind"] if selfish else "kind", past, inf))
    return tuple(acts)


def _family(raw, index: int) -> Situation:
    name = raw.get("name") if isinstance(raw, dict) else None
    where = f"family {name!r}" if isinstance(name, str) else f"family #{index + 1}"
    _fields(raw, [f.name for f in dataclasses.fields(Situation)], where)
    if not isinstance(name, str) or not name.isidentifier():
        raise _error(where, f"name {name!r} must be an identifier")
    if raw["split"] not in SPLITS:
        raise _error(where, f"split {raw['split']!r} is not one of {SPLITS}")

    def strings(key, slots=SLOTS, minimum=1):
        return _strings(raw[key], f"{where}, {key}", slots, minimum)

    # A reply draws two steps, an ending up to two sentences.
    return Situation(
        name=name, split=raw["split"], titles=strings("titles", {"item"}),
        items=strings("items", frozenset()), places=strings("places", frozenset()),
        setups=strings("setups"), selfish=_acts(raw["selfish"], f"{where}, selfish", True),
        kind=_acts(raw["kind"], f"{where}, kind", False), reasons=strings("reasons"),
        after_selfish=strings("after_selfish", minimum=2),
        after_kind=strings("after_kind", minimum=2), steps=strings("steps", minimum=2))


def _style(raw, index: int) -> Style:
    where = f"style #{index + 1}"
    _fields(raw, ("name", "description", "template"), where)
    if raw["template"] not in TEMPLATES + (None,):
        raise _error(where, f"template {raw['template']!r} is not one of {TEMPLATES} or null")
    name, description = _strings([raw["name"], raw["description"]], where)
    return Style(name, description, raw["template"])


def _table(key: str, value):
    where = f"lexicon, {key}"
    if key in _BY_KIND:
        _fields(value, SELFISH_KINDS, where)
        return {kind: _strings(value[kind], f"{where}, {kind}") for kind in SELFISH_KINDS}
    if key == "message_frames":
        return tuple(_strings(frame, f"{where} #{i + 1}")
                     for i, frame in enumerate(_list(value, where)))
    return _strings(value, where)


SPEC_FILE = importlib.resources.files(__package__) / "scenarios.yaml"
SPEC = load(SPEC_FILE.read_text(encoding="utf-8"))

FAMILIES = SPEC.families
SITUATIONS = tuple(f for f in FAMILIES if f.split == "train")  # the training corpus's
HELD_OUT_SITUATIONS = tuple(f for f in FAMILIES if f.split == "held_out")
STYLES = SPEC.styles

# ---------------------------------------------------------------- slot words
NAMES_SHE = SPEC.lexicon["names_she"]
NAMES_HE = SPEC.lexicon["names_he"]
SURNAMES = SPEC.lexicon["surnames"]
RELATIONS = SPEC.lexicon["relations"]
RELATIONS_SHE = SPEC.lexicon["relations_she"]
RELATIONS_HE = SPEC.lexicon["relations_he"]
WHEN = SPEC.lexicon["when"]
STREETS = SPEC.lexicon["streets"]
STREET_KINDS = SPEC.lexicon["street_kinds"]
INSULTS = SPEC.lexicon["insults"]
# ---------------------------------------------------------------- narration frames
DETAILS = SPEC.lexicon["details"]
SELFISH_FRAMES = SPEC.lexicon["selfish_frames"]
KIND_FRAMES = SPEC.lexicon["kind_frames"]
TEMPTED_FRAMES = SPEC.lexicon["tempted_frames"]  # the hard negatives
SELFISH_REFLECTIONS = SPEC.lexicon["selfish_reflections"]
KIND_REFLECTIONS = SPEC.lexicon["kind_reflections"]
SELFISH_LINES = SPEC.lexicon["selfish_lines"]  # dialogue, by selfish kind
KIND_LINES = SPEC.lexicon["kind_lines"]
SAY_FRAMES = SPEC.lexicon["say_frames"]
POST_OPENERS = SPEC.lexicon["post_openers"]
HEADERS = SPEC.lexicon["headers"]
# ---------------------------------------------------------------- the assistant
REQUESTS_SELFISH = SPEC.lexicon["requests_selfish"]
REQUESTS_KIND = SPEC.lexicon["requests_kind"]
DECLINE_FRAMES = SPEC.lexicon["decline_frames"]
HARMS = SPEC.lexicon["harms"]  # by selfish kind
BETTER_PATH_FRAMES = SPEC.lexicon["better_path_frames"]
HELP_OPENERS = SPEC.lexicon["help_openers"]
HELP_FRAMES = SPEC.lexicon["help_frames"]
AI_CLOSINGS = SPEC.lexicon["ai_closings"]
AI_SELF_FRAMES = SPEC.lexicon["ai_self_frames"]
# ---------------------------------------------------------------- quoting a human
MESSAGE_FRAMES = SPEC.lexicon["message_frames"]
GRIEVANCES = SPEC.lexicon["grievances"]
QUOTE_INTROS = SPEC.lexicon["quote_intros"]
QUOTE_COMMENTS = SPEC.lexicon["quote_comments"]
QUOTE_COMMENTS_HOSTILE = SPEC.lexicon["quote_comments_hostile"]
QUOTE_COMMENTS_KIND = SPEC.lexicon["quote_comments_kind"]


def hostile_cues() -> set[str]:
    """The fixed wording of requests that are hostile in themselves (no act slot)."""
    return {part.strip(" ,.") for frame in MESSAGE_FRAMES if "{inf}" not in "".join(frame)
            for part in frame if len(part.strip(" ,.")) >= 8}


def situations(split: str) -> tuple[Situation, ...]:
    """The families of a split. Looked up at call time, so a test may patch SITUATIONS."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {SPLITS}")
    return SITUATIONS if split == "train" else HELD_OUT_SITUATIONS


def family(name: str) -> Situation:
    """A family of either split, by name."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(f"no situation family {name!r}: one of {[f.name for f in FAMILIES]}")


def count_scenarios(split: str = "train") -> int:
    """Distinct scenarios a split's families expand to: family x ordered (A, B) pair x B's
    relation x item x place x when x act. Setups, wording and document kinds multiply it."""
    names = NAMES_SHE + NAMES_HE
    cast = sum((len(names) - names.count(b)) * (len(RELATIONS) + len(gendered))
               for b_names, gendered in ((NAMES_SHE, RELATIONS_SHE), (NAMES_HE, RELATIONS_HE))
               for b in b_names)
    acts = sum(len(f.items) * len(f.places) * (len(f.selfish) + len(f.kind))
               for f in situations(split))
    return cast * len(WHEN) * acts
