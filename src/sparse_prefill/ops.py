"""``sparse_attention`` as a PyTorch custom operator: ``torch.ops.sparse_prefill.sparse_attention``
(and a padded batch's :func:`~sparse_prefill.varlen.attention_of_sequences`:
``torch.ops.sparse_prefill.attention_of_sequences``).

``torch.compile`` cannot trace the sparse path itself (estimation reads the data: top-k, thresholds,
list widths), so the transformers integration calls it through this operator, which the compiler
treats as one opaque call with a known output shape (its ``register_fake``): a model with sparse
prefill enabled compiles with ``fullgraph=True``.

An operator takes tensors and plain numbers, not pattern objects, so each distinct tuple of
patterns is registered once and passed by its number. The registry only grows (a compiled graph
keeps the numbers it saw): by one small tuple per distinct layer config, and so per prompt length
and layer for a config whose budgets scale with the length.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .attention import INFERENCE_ONLY, sparse_attention
from .patterns import Pattern
from .varlen import Sequences, attention_of_sequences

__all__ = ["attention_of_sequences_op", "sparse_attention_op"]

_REGISTERED: list[tuple[Pattern, ...]] = []
_NUMBERS: dict[tuple[Pattern, ...], int] = {}


def _number(patterns: tuple[Pattern, ...]) -> int:
    """The number under which ``patterns`` is registered (registered on first sight)."""
    number = _NUMBERS.get(patterns)
    if number is None:
        number = _NUMBERS[patterns] = len(_REGISTERED)
        _REGISTERED.append(patterns)
    return number


def _output_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # The Triton path writes into torch.empty_like(q): q's memory layout, which for transformers'
    # [batch, heads, seq, dim] views of [batch, seq, heads, dim] tensors makes the caller's transpose free.
    return torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("sparse_prefill::sparse_attention", mutates_args=())
def _sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patterns: int, scale: float) -> torch.Tensor:
    out = sparse_attention(q, k, v, _REGISTERED[patterns], scale=scale)
    layout = _output_like(q, v)
    if out.stride() == layout.stride():
        return out
    return layout.copy_(out)  # the CPU path's output is contiguous: give it the layout the fake promised


@_sparse_attention.register_fake
def _(q, k, v, patterns, scale):
    return _output_like(q, v)


def _refuse_backward(ctx, grad):
    # Registered so that a backward says why: without it torch's message asks the user to register one.
    raise RuntimeError(INFERENCE_ONLY)


_sparse_attention.register_autograd(_refuse_backward, setup_context=lambda ctx, inputs, output: None)


def sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patterns: Sequence[Pattern],
                        scale: float) -> torch.Tensor:
    """:func:`sparse_prefill.sparse_attention` (one pattern per query head, an explicit scale) through
    the custom operator: the same result, and one opaque node under ``torch.compile``."""
    return torch.ops.sparse_prefill.sparse_attention(q, k, v, _number(tuple(patterns)), float(scale))


@torch.library.custom_op("sparse_prefill::attention_of_sequences", mutates_args=())
def _attention_of_sequences(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: list[int], patterns: list[int],
                            scale: float) -> torch.Tensor:
    sequences = Sequences(*(tuple(layout[column::4]) for column in range(4)))
    out = _output_like(q, v).zero_()  # rows of no sequence (padding) stay zeros
    return attention_of_sequences(q, k, v, sequences, [_REGISTERED[number] for number in patterns], scale=scale, out=out)


@_attention_of_sequences.register_fake
def _(q, k, v, layout, patterns, scale):
    return _output_like(q, v)


_attention_of_sequences.register_autograd(_refuse_backward, setup_context=lambda ctx, inputs, output: None)


def attention_of_sequences_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sequences: Sequences,
                              patterns: Sequence[Sequence[Pattern]], scale: float) -> torch.Tensor:
    """:func:`sparse_prefill.varlen.attention_of_sequences` into a zeroed output (padding rows stay
    zeros; no log-sum-exp) through a custom operator: one opaque node under ``torch.compile``."""
    layout = [value for row in zip(sequences.seq, sequences.q_start, sequences.key_offset, sequences.query_offset)
              for value in row]
    return torch.ops.sparse_prefill.attention_of_sequences(q, k, v, layout, [_number(tuple(p)) for p in patterns],
                                                           float(scale))
