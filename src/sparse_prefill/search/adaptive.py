"""Turn a searched config's Vertical-Slash heads adaptive: a coverage target instead of a fixed budget.

The search measures, for the index it picked, how much of the last queries' attention that index
keeps (``metadata["coverage"]``): the quantity an :class:`~sparse_prefill.patterns.AdaptiveVerticalSlash`
head measures at run time. Asking each head for that coverage, between a floor and a cap around its
searched budget, keeps the searched operating point on prompts like the calibration ones, and
moves the budget where a prompt's attention is more or less concentrated than theirs.
"""

from __future__ import annotations

from ..patterns import AdaptiveVerticalSlash, PatternConfig, VerticalSlash

__all__ = ["adaptive_config"]


def adaptive_config(config: PatternConfig, floor: float = 0.5, cap: float = 2.0,
                    coverage: float | None = None) -> PatternConfig:
    """``config`` with every block-diagonal Vertical-Slash head of its searched layers made adaptive.

    Parameters
    ----------
    config : PatternConfig
        Written by :func:`sparse_prefill.search.run.search` (its metadata holds ``coverage`` and
        ``searched_layers``).
    floor, cap : float
        The adaptive head keeps between ``floor`` and ``cap`` times its searched column and slash
        budgets (0 < floor <= 1 <= cap).
    coverage : float, optional
        One target for every head instead of each head's calibrated coverage.
    """
    if not 0 < floor <= 1 <= cap:
        raise ValueError(f"need 0 < floor <= 1 <= cap, got floor={floor}, cap={cap}")
    metadata = config.metadata
    if coverage is None and "coverage" not in metadata:
        raise ValueError("config has no per-head 'coverage' in its metadata (not written by the search): pass coverage")
    searched = metadata.get("searched_layers", list(range(config.n_layers)))
    layers = [list(heads) for heads in config.layers]
    for row, layer in enumerate(searched):
        for head, pattern in enumerate(layers[layer]):
            if not isinstance(pattern, VerticalSlash) or pattern.slash_block != 64:
                continue
            target = coverage if coverage is not None else metadata["coverage"][row][head]
            if target is None:
                continue
            layers[layer][head] = AdaptiveVerticalSlash(
                coverage=min(1.0, float(target)),
                min_vertical=max(1, round(pattern.vertical * floor)), max_vertical=max(1, round(pattern.vertical * cap)),
                min_slash=max(1, round(pattern.slash * floor)), max_slash=max(1, round(pattern.slash * cap)),
                last_q=pattern.last_q,
            )
    return PatternConfig(tuple(tuple(heads) for heads in layers), {**metadata, "adaptive": {"floor": floor, "cap": cap,
                         "coverage": coverage if coverage is not None else "per head (calibrated)"}},
                         reference_length=config.reference_length, scaling=config.scaling,
                         scaling_limit=config.scaling_limit)
