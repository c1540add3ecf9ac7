"""The attention methods an evaluation compares: dense, sparse prefill, and a static A-shape window."""

from __future__ import annotations

from typing import Any

from ..integrations.transformers import SparsePrefillState, disable, enable
from ..kinds.vertical_slash import minference_budget
from ..patterns import AShape, PatternConfig

__all__ = ["METHODS", "a_shape_pattern", "apply_method"]

METHODS = ("dense", "sparse", "a-shape")


def a_shape_pattern(seq_len: int) -> AShape:
    """The static baseline: 64 sink tokens plus a local window, together as many keys per row as
    MInference's budget for the length (:func:`~sparse_prefill.kinds.vertical_slash.minference_budget`:
    its columns plus slash keys)."""
    pattern = minference_budget(seq_len)
    return AShape(sink=64, local=pattern.vertical + pattern.slash - 64)


def apply_method(
    model: Any, method: str, seq_len: int, config: PatternConfig | None = None, preset: str = "default",
    decode: Any = "dense",
) -> SparsePrefillState | None:
    """Switch ``model`` to ``method`` for a prompt of ``seq_len`` tokens; returns the sparse state.

    ``config`` and ``preset`` (sparse only) are passed to :func:`enable`: a :class:`PatternConfig`,
    or None for the preset on every head. Sparse methods run on every prefill, however short
    (``min_seq_len=1``): an evaluation measures the method, not the short-prompt fallback to dense.
    ``decode`` (sparse methods) is :func:`enable`'s: ``"dense"`` or a ``SparseDecoding``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "dense":
        disable(model)
        return None
    if method == "a-shape":
        layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
        config = PatternConfig.uniform(layers, heads, a_shape_pattern(seq_len), source="a-shape baseline")
    return enable(model, config, preset=preset, min_seq_len=1, decode=decode)
