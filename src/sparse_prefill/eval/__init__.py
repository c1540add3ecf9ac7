"""Accuracy evaluation: needle in a haystack, RULER-style tasks and perplexity by position.

Run it as ``sparse-prefill eval needle|ruler|ppl``, or ``all`` for the three in turn (see
:mod:`sparse_prefill.cli`), or through :func:`run_eval` and :func:`run_evals`. Every result is appended to ``OUT/<task>.jsonl`` as soon as it exists, so an
interrupted run resumes where it stopped; the summary, markdown table and plots are rewritten from
all stored results at the end of each run.
"""

from .runner import EVAL_TASKS, EvalSpec, run_eval, run_evals

__all__ = ["EVAL_TASKS", "EvalSpec", "run_eval", "run_evals"]
