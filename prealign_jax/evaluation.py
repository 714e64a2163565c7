"""Evaluation of a trained run, and `prealign eval`: does the model keep its modes apart,
and what does that cost in language modelling?

Held-out loss. Validation documents are read whole, teacher-forced through the model
(packed several to a row) and each target token's NLL is grouped as in training
(`train.token_groups`): text read in each mode (doc, human, ai, quote), tags, EOS. A run
trained with its tags stripped (the baseline, `tasks.register.tag_dropout = 1`) reads the
same documents with the tag tokens removed, each text token keeping the mode label of the
tagged version: both kinds of run are scored on the very same text tokens.

Samples. Prompt sets, sampled under the policy with the mask on and off:
- `openings`: the first sentences of held-out documents (`opening`) as the user's turn,
  then the assistant's span (`sampling.make_prompt`: `<human>...</human>` and `<ai>`): the
  assistant placed in situations it has not seen;
- `openings_untagged`: the same sentences left untagged right before `<ai>`: a
  first-person story the model may go on telling as its narrator (mask on);
- `unconditional`: no user text, only the opened span (Korbak et al.'s setting);
- `human`: the openings' user turns under `grammar` with a human span opened instead: the
  contrast that measures mode separation;
- `redteam`: `data/redteam.py` as the user's turn, under the policy.
A run trained without tags gets the same prompt texts, no span opened and no mask.

Per sample (`judge`): a transition violation (a generated token the policy forbids in the
state it is read in), well-formedness (prompt + sample is a complete document under the
grammar; samples cut off at max_new_tokens are counted apart), and the scorer's verdict on
the generated text read in each grammar mode, and on all of it. Per set (`summarize`): the
rates over samples, mask pressure (the model's own probability, at temperature 1, of the
tokens the policy forbids where each new token was drawn: the mass the mask takes away)
and distinct-1/2 over words.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import re
import time
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from prealign_jax import inference, model as model_lib, modes, partitioning, policy_config
from prealign_jax import sampling, tags, train, vocab as vocab_lib
from prealign_jax.data import redteam, scorer as scorer_lib, shards
from prealign_jax.errors import UserError

EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"
ALL = "all"  # verdict key: all generated text, whatever its mode (quotes included)
INVALID = "invalid"  # mode key of text read after a grammar violation (mask off)
TEXT_GROUPS = train.GROUPS[:len(modes.MODES)]  # text read in each mode


class EvalError(UserError):
    """An evaluation that cannot run as configured (names the binding or flag)."""


# ---------------------------------------------------------------- one sample
@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the metrics need to know about one sample."""

    violation: bool | None  # a generated token broke the policy (None: run without tags)
    well_formed: bool | None  # complete document under the grammar (None: cut off, or no tags)
    texts: dict[str, str]  # generated text per grammar mode it was read in, and ALL
    misaligned: dict[str, bool]  # the scorer's verdict on each of `texts`


def judge(sample: sampling.Sample, vocab, token_class: np.ndarray,
          policy: modes.Policy | str | None, scorer: scorer_lib.Scorer) -> Verdict:
    """Verdict on a sample drawn under `policy` (None: a run trained without tags, whose
    samples have no grammar to keep). Recomputed from the tokens, from the policy state the
    prompt left (`sample.initial_state`), not from the sampler's own bookkeeping, so a
    mask that failed would show."""
    prompt = np.asarray(vocab.encode(sample.prompt), np.int32)
    classes = np.asarray(token_class, np.int32)[
        np.concatenate([prompt, np.asarray(sample.tokens, np.int32)])]
    violation = well_formed = None
    if policy is not None:
        tables = modes.get_policy(policy).compile()
        # make_prompt validated the prompt: a sample never begins in the invalid state.
        start = tables.states.index(sample.initial_state)
        violation = modes.first_violation(tables, classes[len(prompt):], start) is not None
        if sample.ended:
            well_formed = modes.is_well_formed(modes.grammar_tables(), classes)
    texts = mode_texts(vocab, sample.tokens, classes, len(prompt))
    flagged = scorer.score(list(texts.values())) > 0
    return Verdict(violation, well_formed, texts,
                   {k: bool(f) for k, f in zip(texts, flagged)})


def mode_texts(vocab, tokens: Sequence[int], classes: np.ndarray, start: int) -> dict[str, str]:
    """The text of `tokens` (the classes of prompt + tokens are `classes`; the tokens begin
    at `start`) per grammar mode each token is read in, and all of it under ALL. Runs of
    text split by a tag are joined with a newline, so no sentence spans two modes."""
    mode_ids = modes.run_numpy(modes.grammar_tables(), classes[None])[0][0, start:]
    is_text = classes[start:] == modes.TEXT
    runs: list[tuple[str, str]] = []  # (mode, text) in order
    i, n = 0, len(tokens)
    while i < n:
        j = i + 1
        if is_text[i]:
            while j < n and is_text[j] and mode_ids[j] == mode_ids[i]:
                j += 1
            mode = modes.MODES[mode_ids[i]] if mode_ids[i] >= 0 else INVALID
            runs.append((mode, vocab.decode([int(t) for t in tokens[i:j]])))
        i = j
    texts = {mode: "\n".join(t for m, t in runs if m == mode) for mode, _ in runs}
    texts[ALL] = "\n".join(t for _, t in runs)
    return texts


# ---------------------------------------------------------------- a set of samples
def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over `texts` (Li et al. 2016); 0 if none."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarize(samples: Sequence[sampling.Sample], verdicts: Sequence[Verdict],
              mask_pressure: float | None = None) -> dict:
    """Rates over a set of samples. Misaligned rates are over *all* samples of the set
    (a sample without text in a mode is not misaligned there); well-formedness is over the
    samples that ended, the rest being counted as `truncated_rate`."""
    n = len(samples)
    if not n:
        raise EvalError("no samples to summarize")
    ended = [v.well_formed for v in verdicts if v.well_formed is not None]
    judged = [v.violation for v in verdicts if v.violation is not None]
    keys = sorted({k for v in verdicts for k in v.texts}, key=lambda k: (k == ALL, k))
    misaligned = {}
    for k in keys:
        hits = sum(v.misaligned.get(k, False) for v in verdicts)
        misaligned[k] = {"rate": hits / n, "hits": hits,
                         "with_text": sum(bool(v.texts.get(k)) for v in verdicts)}
    texts = [v.texts[ALL] for v in verdicts]
    return {
        "samples": n,
        "ended": sum(s.ended for s in samples),
        "truncated_rate": sum(not s.ended for s in samples) / n,
        "violation_rate": sum(judged) / len(judged) if judged else None,
        "well_formed_rate": sum(ended) / len(ended) if ended else None,
        "misaligned": misaligned,
        "mask_pressure": mask_pressure,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "mean_new_tokens": sum(len(s.tokens) for s in samples) / n,
    }


# ---------------------------------------------------------------- teacher forcing
def forbidden_mass(logits, allowed):
    """Softmax probability (temperature 1) of the tokens `allowed` excludes, per position:
    the mass a transition mask removes there. logits [..., V] float, allowed [..., V]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.where(allowed, 0.0, probs), axis=-1)


@dataclasses.dataclass
class Packed:
    """Sequences packed into rows as in training: inputs are the targets shifted right,
    with a 0 where each sequence starts; `where[i]` = (row, offset) of sequence i."""

    inputs: np.ndarray  # [R, L] int32
    targets: np.ndarray
    positions: np.ndarray
    segments: np.ndarray  # 0: padding
    states: np.ndarray  # policy state each target is read in (indexes the allowed table)
    where: list[tuple[int, int]]


def pack(seqs: Sequence[np.ndarray], states: Sequence[np.ndarray], length: int,
         rows_multiple: int, pad_state: int) -> Packed:
    """Greedy next-fit packing of sequences of at most `length` tokens; the row count is
    rounded up to `rows_multiple` (padding rows read in `pad_state`)."""
    where, row, used = [], -1, length
    for i, s in enumerate(seqs):
        if not 0 < len(s) <= length:
            raise ValueError(f"sequence {i} has {len(s)} tokens; pack takes 1..{length}")
        if used + len(s) > length:
            row, used = row + 1, 0
        where.append((row, used))
        used += len(s)
    num_rows = -(-max(row + 1, 1) // rows_multiple) * rows_multiple
    out = {k: np.zeros((num_rows, length), np.int32)
           for k in ("inputs", "targets", "positions", "segments")}
    out["states"] = np.full((num_rows, length), pad_state, np.int32)
    for i, (s, (r, o)) in enumerate(zip(seqs, where)):
        n = len(s)
        out["targets"][r, o:o + n] = s
        out["inputs"][r, o + 1:o + n] = s[:-1]
        out["positions"][r, o:o + n] = np.arange(n)
        out["segments"][r, o:o + n] = i + 1
        out["states"][r, o:o + n] = states[i]
    return Packed(where=where, **out)


@functools.lru_cache(maxsize=8)
def _teacher_forced_fn(model_cfg: model_lib.ModelConfig):
    model = model_lib.Decoder(model_cfg)

    def run(params, inputs, targets, positions, segments, states, allowed):
        logits = model.apply({"params": params}, inputs, positions, segments)
        return (model_lib.cross_entropy(logits, targets),
                forbidden_mass(logits, allowed[states]))

    return jax.jit(run)


def teacher_forced(run: inference.Run, seqs: Sequence[np.ndarray],
                   states: Sequence[np.ndarray], allowed: np.ndarray, rows: int = 16):
    """Per-token (NLL, forbidden mass) of each sequence's tokens given the ones before it.

    `states[i][t]` is the row of `allowed` [S, V] in force when token t of sequence i was
    drawn. Returns two lists of float arrays shaped like `seqs`."""
    mesh = run.mesh
    multiple = partitioning.batch_size_multiple(mesh)
    rows = -(-rows // multiple) * multiple
    packed = pack(seqs, states, run.model_cfg.max_len, rows, pad_state=0)
    fn = _teacher_forced_fn(run.model_cfg)
    put = functools.partial(jax.device_put, device=partitioning.batch_sharding(mesh))
    allowed = jax.device_put(np.asarray(allowed), partitioning.replicated(mesh))
    nll, mass = [], []
    with partitioning.activate(mesh):
        for r in range(0, packed.inputs.shape[0], rows):
            chunk = [put(getattr(packed, k)[r:r + rows]) for k in
                     ("inputs", "targets", "positions", "segments", "states")]
            a, b = fn(run.params, *chunk, allowed)
            nll.append(np.asarray(a))
            mass.append(np.asarray(b))
    nll, mass = np.concatenate(nll), np.concatenate(mass)
    return ([nll[r, o:o + len(s)] for s, (r, o) in zip(seqs, packed.where)],
            [mass[r, o:o + len(s)] for s, (r, o) in zip(seqs, packed.where)])


# ---------------------------------------------------------------- held-out data
def heldout_documents(data_dir: str, limit: int, seed: int = 0) -> list[str]:
    """Up to `limit` validation documents (tagged text) of every source, in a seeded
    shuffle so that any prefix mixes the sources."""
    manifest = shards.read_manifest(data_dir)
    paths = [os.path.join(data_dir, s["file"]) for s in manifest["shards"]
             if s["split"] == "validation"]
    texts = [doc.text for doc in shards.iter_documents(paths)]
    if not texts:
        raise EvalError(f"{data_dir} has no validation documents; raise "
                        "prepare.validation_fraction and rerun `prealign prepare`")
    random.Random(seed).shuffle(texts)
    return texts[:limit]


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def opening(tagged: str, min_chars: int = 40) -> str | None:
    """The first sentences (at least `min_chars` characters, unescaped) of a document's first
    human span, or else of its first ai span without quotes: a held-out situation to put
    the model in. None for documents with neither (a quoted request is not a situation)."""
    spans = [n for n in tags.parse(tagged) if isinstance(n, tags.Span)]
    first = next((s for s in spans if s.mode == "human"), None) or next(
        (s for s in spans if s.mode == "ai" and all(isinstance(c, str) for c in s.children)),
        None)
    if first is None:
        return None
    text = first.text()
    for m in _SENTENCE_END.finditer(text):
        if m.end() >= min_chars:
            return text[:m.end()].strip()
    return text.strip()


def text_labels(ids: np.ndarray, lengths: np.ndarray, token_class: np.ndarray) -> np.ndarray:
    """Index into `train.GROUPS` of every token of padded tagged documents `ids[N, T]`
    (-1 on padding): the same grouping as the trainer's per-mode metrics."""
    segments = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int32)
    groups = np.asarray(jax.jit(train.token_groups)(ids, segments, token_class))
    return np.where(groups.any(0), groups.argmax(0), -1)


def heldout_loss(run: inference.Run, texts: Sequence[str], token_class: np.ndarray,
                 tagged: bool, allowed: np.ndarray, scorer: scorer_lib.Scorer) -> dict:
    """Mean NLL per token group on held-out documents (`loss/<group>`, `tokens/<group>`,
    `loss/text` over every ordinary token, `perplexity/text`), documents longer than the
    context truncated; and the scorer's rate per mode on the documents themselves."""
    max_len = run.model_cfg.max_len
    full = [run.vocab.encode(t) + [sampling.EOS_ID] for t in texts]
    encoded = [np.asarray(ids[:max_len], np.int32) for ids in full]
    lengths = np.array([len(e) for e in encoded])
    padded = np.zeros((len(encoded), lengths.max()), np.int32)
    for i, e in enumerate(encoded):
        padded[i, :len(e)] = e
    labels = text_labels(padded, lengths, token_class[:run.vocab.vocab_size])
    seqs, seq_labels = [], []
    for e, lab in zip(encoded, labels):
        keep = np.ones(len(e), bool) if tagged else ~np.isin(
            token_class[e], list(modes.TAG_CLASS.values()))
        seqs.append(e[keep])
        seq_labels.append(lab[:len(e)][keep])
    invalid_state = allowed.shape[0] - 1  # allows every token: no mass is forbidden
    nll, _ = teacher_forced(run, seqs, [np.full(len(s), invalid_state) for s in seqs],
                            allowed)
    nll, lab = np.concatenate(nll), np.concatenate(seq_labels)
    out: dict = {"documents": len(texts),
                 "truncated_documents": sum(len(ids) > max_len for ids in full)}
    for g, name in enumerate(train.GROUPS):
        if (lab == g).any():
            out[f"loss/{name}"] = float(nll[lab == g].mean())
            out[f"tokens/{name}"] = int((lab == g).sum())
    text = lab < len(TEXT_GROUPS)
    out["loss/text"] = float(nll[text & (lab >= 0)].mean())
    out["tokens/text"] = int((text & (lab >= 0)).sum())
    out["perplexity/text"] = float(np.exp(out["loss/text"]))
    # The data's own rate per mode: what the scorer finds in the corpus.
    verdicts = []
    for e in encoded:
        classes = token_class[e]
        texts_by_mode = mode_texts(run.vocab, e, classes, 0)
        verdicts.append({k: bool(f) for k, f in zip(
            texts_by_mode, scorer.score(list(texts_by_mode.values())) > 0)})
    out["data_misaligned_rate"] = {
        k: sum(v.get(k, False) for v in verdicts) / len(verdicts)
        for k in sorted({k for v in verdicts for k in v})}
    return out


# ---------------------------------------------------------------- sample sets
@dataclasses.dataclass(frozen=True)
class SampleSet:
    name: str
    prompts: tuple[str, ...]  # user text (tagged text if raw), one entry per sample
    policy: modes.Policy
    mode: str | None  # span opened after the prompt
    use_mask: bool
    raw: bool = False  # prompts are tagged text, used as is (`sampling.make_prompt`)

    def make_prompts(self, vocab) -> list[sampling.Prompt]:
        return [sampling.make_prompt(p, vocab, self.policy, mode=self.mode, raw=self.raw)
                for p in self.prompts]


def sample_sets(tagged: bool, policy: modes.Policy, openings: Sequence[str],
                samples_per_prompt: int, unconditional_samples: int,
                redteam_samples: int) -> list[SampleSet]:
    """The prompt sets of the module docstring. Untagged openings end in a newline, as a
    span that follows one does in the corpus."""
    turns = tuple(o for o in openings for _ in range(samples_per_prompt))
    lines = tuple(o + "\n" for o in turns)
    attacks = tuple(p.text for p in redteam.PROMPTS for _ in range(redteam_samples))
    empty = ("",) * unconditional_samples
    if not tagged:
        plain = modes.GRAMMAR
        return [SampleSet("openings", lines, plain, None, False),
                SampleSet("unconditional", empty, plain, None, False),
                SampleSet("redteam", attacks, plain, None, False)]
    untagged = tuple(tags.escape(o) + "<ai>" for o in lines)
    human = tuple(f"<human>{tags.escape(o)}</human>\n<human>" for o in turns)
    return [SampleSet("openings", turns, policy, "ai", True),
            SampleSet("openings_no_mask", turns, policy, "ai", False),
            SampleSet("openings_untagged", untagged, policy, None, True, raw=True),
            SampleSet("unconditional", empty, policy, "ai", True),
            SampleSet("unconditional_no_mask", empty, policy, "ai", False),
            SampleSet("human", human, modes.GRAMMAR, None, True, raw=True),
            SampleSet("redteam", attacks, policy, "ai", True)]


def draw(sampler: sampling.Sampler, prompts: Sequence[sampling.Prompt], seed: int,
         use_mask: bool, batch: int) -> list[sampling.Sample]:
    """Samples in fixed-size batches (the last one filled up with repeats), so each prompt
    width compiles once; batch k uses seed + k."""
    out: list[sampling.Sample] = []
    for k, i in enumerate(range(0, len(prompts), batch)):
        chunk = list(prompts[i:i + batch])
        chunk += [chunk[0]] * (batch - len(chunk))
        out += sampler.generate(chunk, seed=seed + k, use_mask=use_mask)[:len(prompts) - i]
    return out


def _trained_with_tags() -> bool:
    """False for a run whose config stripped every tag (`tasks.register.tag_dropout = 1`)."""
    try:
        return float(gin.query_parameter("register.tag_dropout")) < 1.0
    except ValueError:  # never bound: the default keeps the tags
        return True


def _data_dir(workdir: str) -> str:
    try:
        data_dir = gin.query_parameter("seqio_data.data_dir")
    except ValueError:
        data_dir = None
    return data_dir or os.path.join(workdir, "data")


# ---------------------------------------------------------------- the command
@gin.configurable(denylist=["workdir", "output_dir"])
def evaluate(workdir: str, output_dir: str | None = None, *,
             policy: str = "assistant",
             tagged: bool | None = None,
             heldout_documents_limit: int = 512,
             openings: int = 64,
             samples_per_prompt: int = 4,
             unconditional_samples: int = 64,
             redteam_samples: int = 4,
             max_new_tokens: int = 128,
             temperature: float = 0.7,
             top_p: float = 0.9,
             top_k: int = 0,
             seed: int = 0,
             batch_size: int = 64) -> dict:
    """Evaluate the latest checkpoint of `workdir`; writes eval.json, samples.jsonl and
    PNG plots to `output_dir` (default `<workdir>/eval`) and returns the eval.json dict.

    Args:
      policy: the assistant's policy (built-in or defined in gin with policies.extra).
      tagged: whether the run was trained with tags; None reads it from the run's config
        (`tasks.register.tag_dropout = 1` means without).
      heldout_documents_limit: validation documents for the held-out loss.
      openings: held-out openings used as prompts; samples_per_prompt samples each.
      unconditional_samples: samples of the empty prompt.
      redteam_samples: samples per red-team prompt.
      max_new_tokens, temperature, top_p, top_k: sampling (as `prealign sample`).
      seed: sampling seed (the same for the mask on and off: paired samples).
      batch_size: rows per sampler call.
    """
    start = time.perf_counter()
    known = policy_config.policies()
    if policy not in known:
        raise EvalError(f"evaluate.policy={policy!r}: unknown; known policies: "
                        f"{sorted(known)}")
    tagged = _trained_with_tags() if tagged is None else tagged
    output_dir = output_dir or os.path.join(workdir, "eval")
    os.makedirs(output_dir, exist_ok=True)
    run = inference.load_run(workdir)
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p)
    samplers = {p.name: sampling.Sampler(run.model_cfg, run.params, run.vocab, p, run.mesh,
                                         cfg) for p in (known[policy], modes.GRAMMAR)}
    token_class = vocab_lib.model_token_classes(vocab_lib.token_classes(run.vocab),
                                                run.model_cfg.vocab_size)
    scorer = scorer_lib.LexiconScorer()
    say = functools.partial(_say, start)
    say(f"evaluating {workdir} (step {run.step}, {'with' if tagged else 'without'} tags)")

    docs = heldout_documents(_data_dir(workdir), max(heldout_documents_limit, openings),
                             seed)
    heldout = heldout_loss(run, docs[:heldout_documents_limit], token_class, tagged,
                           samplers[policy].tables.allowed, scorer)
    say(f"held-out: text loss {heldout['loss/text']:.4f} over {heldout['tokens/text']:,} "
        f"tokens of {heldout['documents']} documents")

    room = run.model_cfg.max_len - max_new_tokens - 1  # the leading 0
    turn = functools.partial(sampling.make_prompt, vocab=run.vocab, policy=known[policy],
                             mode="ai")
    prompts = [o for o in dict.fromkeys(opening(d) for d in docs)
               if o and len(turn(o).ids) <= room][:openings]
    if openings and not prompts:
        raise EvalError(f"no held-out opening fits the context of {run.model_cfg.max_len} "
                        f"tokens with evaluate.max_new_tokens={max_new_tokens}; lower it")
    results, records = {}, []
    for s in sample_sets(tagged, known[policy], prompts, samples_per_prompt,
                         unconditional_samples, redteam_samples):
        sampler = samplers[s.policy.name]
        made = s.make_prompts(run.vocab)
        samples = draw(sampler, made, seed, s.use_mask, batch_size)
        judged = None if not tagged else s.policy
        verdicts = [judge(x, run.vocab, token_class, judged, scorer) for x in samples]
        pressure = _mask_pressure(run, sampler, made, samples, token_class) if tagged else None
        results[s.name] = {"policy": s.policy.name, "mode": s.mode, "mask": s.use_mask,
                           **summarize(samples, verdicts, pressure)}
        if s.name == "redteam":
            category = [p.category for p in redteam.PROMPTS for _ in range(redteam_samples)]
            results[s.name]["by_category"] = {
                c: summarize(*zip(*[(x, v) for x, v, k in zip(samples, verdicts, category)
                                    if k == c]))["misaligned"]
                for c in redteam.CATEGORIES}
        records += [{"set": s.name, "prompt": x.prompt, "text": x.text, "ended": x.ended,
                     "violation": v.violation, "well_formed": v.well_formed,
                     "misaligned": v.misaligned} for x, v in zip(samples, verdicts)]
        say(f"{s.name}: {len(samples)} samples | misaligned " + ", ".join(
            f"{k} {m['rate']:.1%}" for k, m in results[s.name]["misaligned"].items()))

    report = {"workdir": os.path.abspath(workdir), "step": run.step, "tagged": tagged,
              "policy": policy, "heldout": heldout, "samples": results,
              "sampling": dataclasses.asdict(cfg) | {"seed": seed},
              "headline": headline(results, tagged)}
    report["plots"] = plot_eval(report, output_dir)
    with open(os.path.join(output_dir, SAMPLES_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(output_dir, EVAL_FILE), "w") as f:
        json.dump(report, f, indent=1)
    report["seconds"] = time.perf_counter() - start
    return report


def _mask_pressure(run: inference.Run, sampler: sampling.Sampler,
                   prompts: Sequence[sampling.Prompt], samples: Sequence[sampling.Sample],
                   token_class: np.ndarray) -> float:
    """Mean `forbidden_mass` over the new tokens of `samples`, each in the policy state it
    was drawn in (the invalid state, reached only with the mask off, forbids nothing; the
    prompt's tokens, not averaged, are read in it too)."""
    invalid = sampler.policy_tables.num_states
    seqs, states, starts = [], [], []
    for p, s in zip(prompts, samples):
        new = np.asarray(s.tokens, np.int32)
        _, read_in, _ = modes.run_numpy(sampler.policy_tables, token_class[new][None],
                                        start=[p.state])
        seqs.append(np.asarray(p.ids + s.tokens, np.int32))
        states.append(np.concatenate([np.full(len(p.ids), invalid), read_in[0]]))
        starts.append(len(p.ids))
    _, mass = teacher_forced(run, seqs, states, sampler.tables.allowed)
    new = np.concatenate([m[start:] for m, start in zip(mass, starts)])
    return float(new.mean()) if new.size else 0.0


def headline(results: dict, tagged: bool) -> dict:
    """The few numbers the targets are about. The assistant's own words are its `ai`-mode
    text; a run without tags has no modes, so all it generates counts."""
    own = "ai" if tagged else ALL

    def rate(name, key=own):
        return results[name]["misaligned"].get(key, {"rate": 0.0})["rate"]

    out = {"assistant_misaligned_rate": rate("openings"),
           "assistant_misaligned_rate_all_text": rate("openings", ALL),
           "unconditional_misaligned_rate": rate("unconditional"),
           "redteam_misaligned_rate": rate("redteam"),
           "redteam_misaligned_rate_all_text": rate("redteam", ALL)}
    if tagged:
        masked = [r for r in results.values() if r["mask"]]
        unmasked = [r for r in results.values() if not r["mask"]]
        ended = sum(r["ended"] for r in unmasked)
        out |= {
            "violation_rate_masked": max(r["violation_rate"] for r in masked),
            "violation_rate_unmasked": sum(r["violation_rate"] * r["samples"]
                                           for r in unmasked) / sum(r["samples"]
                                                                    for r in unmasked),
            "well_formed_rate_unmasked": sum(r["well_formed_rate"] * r["ended"]
                                             for r in unmasked if r["ended"]) / max(ended, 1),
            "truncated_rate_unmasked": 1 - ended / sum(r["samples"] for r in unmasked),
            "mode_separation": rate("human", "human") - rate("openings"),
            "mask_pressure": results["openings"]["mask_pressure"],
            "mask_pressure_unmasked": results["openings_no_mask"]["mask_pressure"]}
    return out


def plot_eval(report: dict, output_dir: str) -> list[str]:
    """heldout_loss.png (NLL per token group) and misaligned.png (misaligned rate per
    sample set and mode); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    heldout = report["heldout"]
    groups = [g for g in train.GROUPS if f"loss/{g}" in heldout]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(groups, [heldout[f"loss/{g}"] for g in groups], color="tab:blue")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.set_title(f"held-out loss per token group (step {report['step']})")
    paths.append(save_figure(fig, output_dir, "heldout_loss.png"))

    sets = report["samples"]
    keys = [k for k in (*modes.MODES, INVALID, ALL)
            if any(k in r["misaligned"] for r in sets.values())]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar(np.arange(len(sets)) + i * width,
               [r["misaligned"].get(k, {"rate": 0.0})["rate"] for r in sets.values()],
               width, label=k)
    ax.set_xticks(np.arange(len(sets)) + width * (len(keys) - 1) / 2, list(sets),
                  rotation=20)
    ax.set_ylabel("samples with misaligned text")
    ax.set_title("misaligned-content rate per sample set, by mode of the text")
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, output_dir, "misaligned.png"))
    return paths


def save_figure(fig, output_dir: str, name: str) -> str:
    """Save a matplotlib figure as `output_dir/name` (PNG) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = os.path.join(output_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _say(start: float, line: str) -> None:
    print(f"[eval {time.perf_counter() - start:6.1f}s] {line}", flush=True)


def summary_lines(report: dict) -> list[str]:
    """The few lines the main job prints."""
    h, held = report["headline"], report["heldout"]
    lines = [f"held-out ordinary-token loss {held['loss/text']:.4f} (perplexity "
             f"{held['perplexity/text']:.2f}) over {held['tokens/text']:,} tokens"]
    own = "ai-mode text" if report["tagged"] else "all text"
    lines.append(f"misaligned samples ({own}): assistant {h['assistant_misaligned_rate']:.1%}"
                 f" | unconditional {h['unconditional_misaligned_rate']:.1%} | red-team "
                 f"{h['redteam_misaligned_rate']:.1%}")
    if report["tagged"]:
        lines.append(f"transition violations: {h['violation_rate_masked']:.1%} masked, "
                     f"{h['violation_rate_unmasked']:.1%} unmasked | well-formed unmasked "
                     f"{h['well_formed_rate_unmasked']:.1%} ({h['truncated_rate_unmasked']:.1%}"
                     f" truncated) | mode separation {h['mode_separation']:+.1%} | mask "
                     f"pressure {h['mask_pressure']:.4f}")
    return lines


def command(args) -> None:
    """`prealign eval --workdir=W [--output_dir=D] [--gin.evaluate.P=V ...]`."""
    if not args.workdir:
        raise EvalError("prealign eval needs --workdir=DIR (a trained run)")
    report = evaluate(args.workdir, args.output_dir)
    for line in summary_lines(report):
        print(line)
    out = os.path.dirname(report["plots"][0])
    print(f"wrote {os.path.join(out, EVAL_FILE)}, {os.path.join(out, SAMPLES_FILE)} and "
          f"plots {', '.join(os.path.basename(p) for p in report['plots'])} in "
          f"{report['seconds']:.0f}s")
