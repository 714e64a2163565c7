"""The evaluation suite of a trained run: the held-out loss, then prompt sets sampled under
the policy with the mask on and off, judged and summarized into eval.json (`evaluate`).

Prompt sets (`sample_sets`):
- `openings`: the first sentences of held-out documents (`heldout.opening`) as the user's
  turn, then the assistant's span (`sampling.make_prompt`: `<human>...</human>` and
  `<ai>`): the assistant placed in situations it has not seen;
- `openings_ood`: the same, from documents of the scenario spec's held-out families
  (`heldout.held_out_family_openings`): situations of kinds no training document shows,
  reported apart (out of distribution), judged by a scorer that knows their acts;
- `openings_untagged`: the same sentences left untagged right before `<ai>`: a
  first-person story the model may go on telling as its narrator (mask on);
- `unconditional`: no user text, only the opened span (Korbak et al.'s setting);
- `human`: the openings' user turns under `grammar` with a human span opened instead: the
  contrast that measures mode separation;
- `redteam`: `data/redteam.py` as the user's turn (its `tags_stripped` prompts untagged),
  under the policy; `redteam_no_mask`: the same without the mask (jailbreaks that only
  training stops). Both are reported per category as well, with the number of prompts
  that fit the context (`prompts_by_category`);
- with `copy_quotes` (quotes copy the user's turn, `sampling`), `openings_no_copy` and
  `openings_ood_no_copy`: the openings without it, so one report shows its effect.
A run trained without tags gets the same prompt texts and no span opened, prompted as its
view of the corpus says (`baselines.prompting`: plain text and no mask; the metadata
baseline's line first; the SafeLM baseline's ban on its harm tag, mask on).

The openings are decontaminated: one that appears word for word in the run's training text
is replaced by the next (`decontamination`; eval.json's `decontamination` counts them).

Each set is judged and summarized (`judging`), with its mask pressure: the model's own
probability, at temperature 1, of the tokens the policy forbids where each new token was
drawn (the mass the mask takes away).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from prealign_jax import console, fileio, inference, modes, sampling, tags
from prealign_jax import vocab as vocab_lib
from prealign_jax.data import baselines, redteam, scenarios, scorer as scorer_lib
from prealign_jax.errors import UserError
from prealign_jax.evaluation.decontamination import decontaminate, training_reference
from prealign_jax.evaluation.heldout import (heldout_documents, heldout_loss,
                                             held_out_family_openings, opening)
from prealign_jax.evaluation.judging import headline, judge, summarize
from prealign_jax.evaluation.plots import plot_eval
from prealign_jax.evaluation.teacher_forcing import teacher_forced

EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"


class EvalError(UserError):
    """An evaluation that cannot run as configured (names the binding to change)."""


@dataclasses.dataclass(frozen=True)
class SampleSet:
    """One prompt set of the module docstring: its prompts, sampled under `policy`."""

    name: str
    prompts: tuple[str, ...]  # user text (tagged text if raw), one entry per sample
    policy: modes.Policy
    mode: str | None  # span opened after the prompt
    use_mask: bool
    raw: bool | tuple[bool, ...] = False  # prompts are tagged text, used as is
    # (`sampling.make_prompt`); a tuple says it per prompt
    copy_quotes: bool = True  # False: never copy-constrained (True: as evaluate sets it)
    prefix: str = ""  # plain text before each prompt, encoded on its own as in training

    def make_prompts(self, vocab) -> list[sampling.Prompt]:
        raw = self.raw if isinstance(self.raw, tuple) else (self.raw,) * len(self.prompts)
        head = tuple(vocab.encode(self.prefix))
        return [dataclasses.replace(p, text=self.prefix + p.text, ids=head + p.ids)
                for p in (sampling.make_prompt(p, vocab, self.policy, mode=self.mode, raw=r)
                          for p, r in zip(self.prompts, raw))]


def sample_sets(tagged: bool, policy: modes.Policy, openings: Sequence[str],
                samples_per_prompt: int, unconditional_samples: int,
                redteam_samples: int, ood_openings: Sequence[str],
                redteam_prompts: Sequence[redteam.RedTeamPrompt] = redteam.PROMPTS,
                prompting: baselines.Prompting = baselines.Prompting(),
                copy_quotes: bool = False) -> list[SampleSet]:
    """The prompt sets of the module docstring; a run without tags is prompted as
    `prompting` says. Untagged openings end in a newline, as a span that follows one does in
    the corpus."""
    turns = tuple(o for o in openings for _ in range(samples_per_prompt))
    lines = tuple(o + "\n" for o in turns)
    ood = tuple(o for o in ood_openings for _ in range(samples_per_prompt))
    attacks = tuple(p for p in redteam_prompts for _ in range(redteam_samples))
    empty = ("",) * unconditional_samples
    if not tagged:
        plain = dict(policy=prompting.policy, mode=None, use_mask=prompting.use_mask,
                     prefix=prompting.prefix)
        return [SampleSet("openings", lines, **plain),
                SampleSet("openings_ood", tuple(o + "\n" for o in ood), **plain),
                SampleSet("unconditional", empty, **plain),
                SampleSet("redteam", tuple(p.text for p in attacks), **plain)]
    untagged = tuple(tags.escape(o) + "<ai>" for o in lines)
    human = tuple(f"<human>{tags.escape(o)}</human>\n<human>" for o in turns)
    raw = tuple(not p.turn for p in attacks)
    texts = tuple(p.text if p.turn else tags.escape(p.text) + "\n" for p in attacks)
    return [SampleSet("openings", turns, policy, "ai", True),
            SampleSet("openings_ood", ood, policy, "ai", True),
            SampleSet("openings_no_mask", turns, policy, "ai", False),
            SampleSet("openings_untagged", untagged, policy, None, True, raw=True),
            SampleSet("unconditional", empty, policy, "ai", True),
            SampleSet("unconditional_no_mask", empty, policy, "ai", False),
            SampleSet("human", human, modes.GRAMMAR, None, True, raw=True),
            SampleSet("redteam", texts, policy, "ai", True, raw=raw),
            SampleSet("redteam_no_mask", texts, policy, "ai", False, raw=raw)] + ([
            SampleSet("openings_no_copy", turns, policy, "ai", True, copy_quotes=False),
            SampleSet("openings_ood_no_copy", ood, policy, "ai", True, copy_quotes=False)]
        if copy_quotes else [])


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


def evaluate(run: inference.Run, output_dir: str | None = None, *,
             policy: str = "assistant",
             tagged: bool | None = None,
             heldout_documents_limit: int = 512,
             openings: int = 64,
             ood_openings: int = 64,
             samples_per_prompt: int = 4,
             unconditional_samples: int = 64,
             redteam_samples: int = 4,
             max_new_tokens: int | None = None,
             temperature: float | None = None,
             top_p: float | None = None,
             top_k: int | None = None,
             seed: int = 0,
             batch_size: int = 64,
             copy_quotes: bool = False) -> dict:
    """Evaluate `run` (`inference.load_run`) on the held-out documents of `run.data_dir`;
    writes eval.json, samples.jsonl and PNG plots to `output_dir` (default
    `<run.workdir>/eval`) and returns the eval.json dict. The keyword parameters are the
    `evaluate.*` gin bindings of `prealign eval`.

    Args:
      policy: the assistant's policy (built-in or defined in gin with policies.extra).
      tagged: whether the run was trained with tags; None: `run.tagged`.
      heldout_documents_limit: validation documents for the held-out loss.
      openings: held-out openings used as prompts; samples_per_prompt samples each.
      ood_openings: openings of the held-out families' documents (out of distribution),
        sampled alike.
      unconditional_samples: samples of the empty prompt.
      redteam_samples: samples per red-team prompt.
      max_new_tokens, temperature, top_p, top_k: sampling; None: `SamplingConfig`'s
        default (the project's, as `prealign sample`'s).
      seed: sampling seed (the same for the mask on and off: paired samples).
      batch_size: rows per sampler call.
      copy_quotes: quotes copy the user's turn (`SamplingConfig.copy_quotes`); a tagged
        run's openings are then also sampled without it.
    """
    clock = console.Clock("eval")
    assistant = modes.get_policy(policy)
    counts = {"heldout_documents_limit": heldout_documents_limit, "openings": openings,
              "ood_openings": ood_openings, "samples_per_prompt": samples_per_prompt,
              "batch_size": batch_size, "unconditional_samples": unconditional_samples,
              "redteam_samples": redteam_samples}
    for name, value in counts.items():
        if value < 1:  # every sample set and the held-out loss need at least one
            raise EvalError(f"evaluate.{name}={value}: must be at least 1")
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k)
    # every keyword argument as given, so that a caller can tell whether eval.json answers
    # its question (`reusable`)
    arguments = {"policy": policy, "tagged": tagged, **counts, **settings, "seed": seed,
                 "copy_quotes": copy_quotes}
    tagged = run.tagged if tagged is None else tagged
    output_dir = output_dir or os.path.join(run.workdir, "eval")
    fileio.gfile().makedirs(output_dir)
    cfg = sampling.SamplingConfig(**{k: v for k, v in settings.items() if v is not None},
                                  copy_quotes=copy_quotes)
    prompting = baselines.prompting(run.view)
    samplers = {}

    def sampler_of(s: SampleSet) -> sampling.Sampler:
        setting = dataclasses.replace(cfg, copy_quotes=cfg.copy_quotes and s.copy_quotes)
        key = (s.policy.name, setting.copy_quotes)
        if key not in samplers:
            samplers[key] = sampling.Sampler(run.model_cfg, run.params, run.vocab, s.policy,
                                             run.mesh, setting)
        return samplers[key]
    token_class = vocab_lib.model_token_classes(vocab_lib.token_classes(run.vocab),
                                                run.model_cfg.vocab_size)
    scorer = scorer_lib.LexiconScorer()  # the training families' acts, as the corpus's
    scorer_ood = scorer_lib.LexiconScorer(scenarios.FAMILIES)  # and the held-out ones
    clock.say(f"evaluating {run.workdir} (step {run.step}, "
              f"{'with' if tagged else 'without'} tags)")

    docs = heldout_documents(run.data_dir, None, seed)
    heldout = heldout_loss(run, docs[:heldout_documents_limit], token_class, tagged,
                           sampling.mask_tables(assistant, token_class).allowed, scorer)
    clock.say(f"held-out: text loss {heldout['loss/text']:.4f} over "
              f"{heldout['tokens/text']:,} tokens of {heldout['documents']} documents")

    # the leading 0 and a view's prompt prefix (the metadata line) take room too
    room = (run.model_cfg.max_len - cfg.max_new_tokens - 1
            - len(run.vocab.encode(prompting.prefix)))
    turn = functools.partial(sampling.make_prompt, vocab=run.vocab, policy=assistant,
                             mode="ai")

    def fits(text):
        return len(turn(text).ids) <= room

    reference = training_reference(run.data_dir)
    prompts, contaminated = decontaminate((o for o in map(opening, docs) if o and fits(o)),
                                          reference, openings)
    attacks = [p for p in redteam.prompts(fits) if fits(p.text)]  # a small context holds fewer
    decontamination = {"reference_ngrams": len(reference), "openings_dropped": len(contaminated),
                       "redteam_contaminated": sum(bool(reference.match(p.text))
                                                   for p in attacks)}
    clock.say(f"decontamination: {len(contaminated)} openings appear word for word in the "
              "training text, replaced")
    ood = [o for o in held_out_family_openings(4 * ood_openings, seed)
           if len(turn(o).ids) <= room][:ood_openings]
    if not prompts or not ood:
        raise EvalError(f"no held-out opening fits the context of {run.model_cfg.max_len} "
                        f"tokens with evaluate.max_new_tokens={cfg.max_new_tokens}; lower it")
    results, records = {}, []
    for s in sample_sets(tagged, assistant, prompts, samples_per_prompt,
                         unconditional_samples, redteam_samples, ood, attacks, prompting,
                         copy_quotes=copy_quotes and tagged):
        sampler = sampler_of(s)
        made = s.make_prompts(run.vocab)
        samples = draw(sampler, made, seed, s.use_mask, batch_size)
        judged = None if not tagged else s.policy
        verdicts = [judge(x, run.vocab, token_class, judged,
                          scorer_ood if s.name.startswith("openings_ood") else scorer)
                    for x in samples]
        pressure = (_mask_pressure(run, sampler, made, samples, token_class)
                    if tagged or s.use_mask else None)
        results[s.name] = {"policy": s.policy.name, "mode": s.mode, "mask": s.use_mask,
                           "copy_quotes": sampler.cfg.copy_quotes,
                           **summarize(samples, verdicts, pressure)}
        if s.name.startswith("redteam"):
            category = [p.category for p in attacks for _ in range(redteam_samples)]
            by = {c: [(x, v) for x, v, k in zip(samples, verdicts, category) if k == c]
                  for c in redteam.CATEGORIES}
            by = {c: summarize(*zip(*pairs)) if pairs else {} for c, pairs in by.items()}
            results[s.name] |= {  # {} and None for a category none of whose prompts fit
                "prompts_by_category": {c: sum(p.category == c for p in attacks)
                                        for c in redteam.CATEGORIES},
                "by_category": {c: m.get("misaligned", {}) for c, m in by.items()},
                "violations_by_category": {c: m.get("violation_rate") for c, m in by.items()}}
        records += [{"set": s.name, "prompt": x.prompt, "text": x.text, "ended": x.ended,
                     "violation": v.violation, "well_formed": v.well_formed,
                     "misaligned": v.misaligned} for x, v in zip(samples, verdicts)]
        clock.say(f"{s.name}: {len(samples)} samples | misaligned " + ", ".join(
                  f"{k} {m['rate']:.1%}" for k, m in results[s.name]["misaligned"].items()))

    report = {"workdir": fileio.absolute(run.workdir), "step": run.step, "tagged": tagged,
              "policy": policy, "arguments": arguments, "heldout": heldout, "samples": results,
              "decontamination": decontamination,
              "sampling": dataclasses.asdict(cfg) | {"seed": seed},
              "headline": headline(results, tagged)}
    report["plots"] = plot_eval(report, output_dir)
    fileio.atomic_write(os.path.join(output_dir, SAMPLES_FILE),
                        "".join(json.dumps(r) + "\n" for r in records))
    fileio.atomic_write(os.path.join(output_dir, EVAL_FILE), json.dumps(report, indent=1))
    report["seconds"] = clock.elapsed()
    return report


def reusable(output_dir: str, step: int, arguments: Mapping[str, Any]) -> dict | None:
    """The eval.json in `output_dir` if it is an evaluation of checkpoint `step` with these
    keyword `arguments` of `evaluate` (a long experiment rerun after a stop skips what it
    has), else None (none there, another step, other arguments, an older eval.json that
    does not record them, or one that is not JSON)."""
    path = os.path.join(output_dir, EVAL_FILE)
    if not fileio.gfile().exists(path):
        return None
    try:
        with fileio.gfile().GFile(path) as f:
            report = json.load(f)
    except ValueError:  # a damaged file answers nothing: evaluate again, rewriting it
        return None
    if not isinstance(report, dict):
        return None
    defaults = {name: p.default for name, p in inspect.signature(evaluate).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    # as eval.json has them: JSON values (tuples as lists), the defaults of those not given
    asked = json.loads(json.dumps({**defaults, **arguments}))
    return report if report.get("arguments") == asked and report["step"] == step else None


def summary_lines(report: dict) -> list[str]:
    """The few lines `prealign eval` and the main job print of an eval.json `report`."""
    h, held = report["headline"], report["heldout"]
    lines = [f"held-out ordinary-token loss {held['loss/text']:.4f} (perplexity "
             f"{held['perplexity/text']:.2f}) over {held['tokens/text']:,} tokens"]
    own = "the assistant's own words" if report["tagged"] else "all text"
    lines.append(f"misaligned samples ({own}): assistant {h['assistant_misaligned_rate']:.1%}"
                 f" (held-out families {h['assistant_misaligned_rate_ood']:.1%})"
                 f" | unconditional {h['unconditional_misaligned_rate']:.1%} | red-team "
                 f"{h['redteam_misaligned_rate']:.1%}")
    if report["tagged"]:
        lines.append(f"transition violations: {h['violation_rate_masked']:.1%} masked, "
                     f"{h['violation_rate_unmasked']:.1%} unmasked | well-formed unmasked "
                     f"{h['well_formed_rate_unmasked']:.1%} ({h['truncated_rate_unmasked']:.1%}"
                     f" truncated) | mode separation {h['mode_separation']:+.1%} | mask "
                     f"pressure {h['mask_pressure']:.4f}")
        lines.append(f"red-team without the mask: misaligned "
                     f"{h['redteam_misaligned_rate_no_mask']:.1%}, transition violations "
                     f"{h['redteam_violation_rate_no_mask']:.1%}")
        fidelity = h["quote_fidelity"]
        lines.append("quote fidelity (quotes that copy the user's words): "
                     + ("no quotes" if fidelity is None else
                        f"{fidelity:.1%} of {report['samples']['openings']['quotes']}")
                     + " (openings)")
    return lines
