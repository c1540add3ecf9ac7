"""Named operating points: which pattern every head gets, and from which length sparse pays.

A preset is what :func:`sparse_prefill.enable` uses when no per-head config is given. Each was
chosen on the accuracy-speed frontier (benchmarks/frontier.py, docs/BENCHMARKS.md) and checked on
the model-level evaluation (docs/ACCURACY.md):

- ``"default"``: the accurate operating point: output error 0.027 against dense attention on the
  real 128K workload (SmolLM2 on the King James Bible, H200, 2026-12-01), 3.7x faster than cuDNN;
  perplexity, needle and RULER-style scores equal to dense within their noise (docs/ACCURACY.md).
  Stride 32 scores half the antidiagonals of stride 16 (0.023 at 2.6x on 2026-11-30, the same
  model-level scores), and the saved index time is worth more than the 0.004 of error.
- ``"fast"``: the fastest measured budget under error 0.08 there (0.077, 6.2x cuDNN). For users
  who measured that their task tolerates it.
- ``"dense"``: exact attention on every call (transformers' SDPA), still through sparse_prefill's
  attention function: the baseline, and what a compressing KV cache (:mod:`sparse_prefill.kv_cache`)
  needs to get its scores from a dense prefill.

Below a preset's ``min_seq_len`` dense attention is faster than sparse attention with its index,
so the prefill stays dense there (``pattern_for`` returns :class:`~sparse_prefill.patterns.Dense`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .patterns import BlockCoverage, Dense, Pattern

__all__ = ["Preset", "PRESETS", "preset"]


@dataclass(frozen=True)
class Preset:
    """A named pattern for every head and the shortest prompt that runs it.

    name : str
    pattern : Pattern
        Every head's pattern; its budget adapts to the prompt, so it holds at every length.
    min_seq_len_cuda : int
        Shortest prefill that runs sparse on a CUDA GPU (the crossover with dense cuDNN attention).
    min_seq_len_cpu : int
        The same on the CPU path, where sparse attention is computed as masked dense attention
        (never faster); it is kept low so that accuracy can be measured anywhere.
    """

    name: str
    pattern: Pattern
    min_seq_len_cuda: int
    min_seq_len_cpu: int = 2048

    def min_seq_len(self, on_cuda: bool) -> int:
        return self.min_seq_len_cuda if on_cuda else self.min_seq_len_cpu

    def pattern_for(self, seq_len: int, on_cuda: bool = True) -> Pattern:
        """The pattern a prompt of ``seq_len`` tokens gets: :attr:`pattern`, or ``Dense()`` below the crossover."""
        return self.pattern if seq_len >= self.min_seq_len(on_cuda) else Dense()


# Below 64K tokens the index and the kernel together do not beat cuDNN on an H200 at SmolLM2's
# shapes (at 32K every Block-Coverage budget was 0.7-0.9x cuDNN: docs/BENCHMARKS.md).
PRESETS: dict[str, Preset] = {
    "default": Preset("default", BlockCoverage(0.99, stride=32), min_seq_len_cuda=65536),
    "fast": Preset("fast", BlockCoverage(0.95, stride=32), min_seq_len_cuda=65536),
    "dense": Preset("dense", Dense(), min_seq_len_cuda=1, min_seq_len_cpu=1),
}


def preset(name: str) -> Preset:
    """The preset called ``name`` (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got preset={name!r}")
    return PRESETS[name]
