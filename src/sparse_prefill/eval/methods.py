"""The attention methods an evaluation compares: dense, sparse prefill, and a static A-shape window."""

from __future__ import annotations

from typing import Any

from ..integrations.transformers import SparsePrefillState, default_pattern, disable, enable
from ..patterns import AShape, PatternConfig

__all__ = ["METHODS", "a_shape_pattern", "apply_method"]

METHODS = ("dense", "sparse", "a-shape")


def a_shape_pattern(seq_len: int) -> AShape:
    """The static baseline at the sparse default's cost: 64 sink tokens plus a local window, together
    as many keys per row as :func:`default_pattern`'s columns plus slashes (block diagonals of 64
    tokens keep ``slash`` keys a row)."""
    pattern = default_pattern(seq_len)
    return AShape(sink=64, local=pattern.vertical + pattern.slash - 64)


def apply_method(
    model: Any, method: str, seq_len: int, config: PatternConfig | str | None = None
) -> SparsePrefillState | None:
    """Switch ``model`` to ``method`` for a prompt of ``seq_len`` tokens; returns the sparse state.

    ``config`` (sparse only) is passed to :func:`enable`: None for the model's shipped config, else
    ``"uniform"`` or a :class:`PatternConfig`. Sparse methods run on every prefill, however short
    (``min_seq_len=1``): an evaluation measures the method, not the short-prompt fallback to dense.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "dense":
        disable(model)
        return None
    if method == "a-shape":
        layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
        config = PatternConfig.uniform(layers, heads, a_shape_pattern(seq_len), source="a-shape baseline")
    return enable(model, config, min_seq_len=1)
