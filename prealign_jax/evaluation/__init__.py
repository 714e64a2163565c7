"""Evaluation of a trained run: does the model keep its modes apart, and what does that
cost in language modelling?

    judging          one sample's verdict (violation, well-formedness, quote fidelity,
                     misaligned text per mode), a set's summary and the headline numbers;
                     the assistant's own words of an answer
    judges           the judges of misalignment (lexicon, learned, llm) behind one
                     interface, the labelled set and each judge's agreement with it
    teacher_forcing  packed teacher-forced scoring: NLL and forbidden mass per token
    decontamination  evaluation prompts against the run's training text (word 8-grams)
    heldout          held-out documents, their openings and the loss per token group; the
                     openings of the spec's held-out families (out of distribution)
    suite            the prompt sets, `evaluate` (writes eval.json), whether an eval.json
                     can be reused, and its summary lines
    plots            the evaluation's plots and the figure helpers the experiment shares

`evaluate` takes a loaded run and plain arguments; the CLI (`prealign eval`) resolves gin.
"""

from prealign_jax.evaluation.decontamination import decontaminate, training_reference
from prealign_jax.evaluation.heldout import (TEXT_GROUPS, held_out_family_openings,
                                             heldout_documents, heldout_loss, opening,
                                             text_labels)
from prealign_jax.evaluation.judging import (ALL, INVALID, UNFAITHFUL, Verdict, answer_texts,
                                             distinct_n, headline, judge, mode_texts,
                                             own_words, quotes, summarize)
from prealign_jax.evaluation.plots import plot_eval, save_figure
from prealign_jax.evaluation.suite import (EVAL_FILE, SAMPLES_FILE, EvalError, SampleSet,
                                           draw, evaluate, reusable, sample_sets,
                                           summary_lines)
from prealign_jax.evaluation.teacher_forcing import (Packed, forbidden_mass, pack,
                                                     teacher_forced)

__all__ = ["ALL", "EVAL_FILE", "INVALID", "SAMPLES_FILE", "TEXT_GROUPS", "UNFAITHFUL",
            "EvalError", "Packed", "SampleSet", "Verdict", "answer_texts", "decontaminate",
            "distinct_n", "draw", "evaluate", "forbidden_mass", "held_out_family_openings",
            "heldout_documents", "heldout_loss", "headline", "judge", "mode_texts", "opening",
            "own_words", "pack", "plot_eval", "quotes", "reusable", "sample_sets", "save_figure",
            "summarize", "summary_lines", "teacher_forced", "text_labels",
            "training_reference"]
