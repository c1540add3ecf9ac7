"""The one entry point: sparse causal attention of a whole layer, every head with its own pattern."""

from __future__ import annotations

from typing import Sequence

import torch

from .checks import check_layer_patterns, check_qkv, check_scale
from .kinds import estimate_layer
from .masked_attention import masked_attention
from .patterns import Pattern

__all__ = ["INFERENCE_ONLY", "attention_over_indices", "sparse_attention"]


INFERENCE_ONLY = (
    "sparse attention is for inference (prefill) and has no backward: run the model under torch.no_grad() or "
    "torch.inference_mode() (generate() does), or sparse_prefill.disable(model) to train through dense attention"
)


class _InferenceOnly(torch.autograd.Function):
    """Sparse attention of inputs that require grad (a model called without ``torch.no_grad()``: its
    weights require grad, so its queries do).

    The forward runs with autograd off, so nothing is kept for a backward: under autograd the CPU
    path kept every chunk's mask and attention probabilities, twice dense's memory (12.9 vs 6.5 GB
    at 3K tokens on SmolLM2). A backward is refused with :data:`INFERENCE_ONLY` rather than silently
    treating attention as a constant, which an output detached from q, k and v would do. Refusing
    such inputs outright would break a plain ``model(input_ids)``, which dense attention runs.
    """

    @staticmethod
    def forward(ctx, attend, q, k, v):
        return attend(q, k, v)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(INFERENCE_ONLY)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patterns: Pattern | Sequence[Pattern],
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal prefill attention where each query head attends only to its pattern's kept set.

    Parameters
    ----------
    q : Tensor [batch, q_heads, q_len, head_dim]
        The queries of the last ``q_len`` positions: the whole prompt (``q_len == kv_len``), or a
        chunk prefilled on top of the earlier keys (docs/semantics.md says what each pattern keeps
        then).
    k, v : Tensor [batch, kv_heads, kv_len, head_dim]
        Same dtype and device as ``q``; ``q_heads`` a multiple of ``kv_heads`` (GQA, never repeated);
        ``kv_len >= q_len``.
    patterns : Pattern or sequence of q_heads Patterns
    scale : float, optional
        Softmax scale, ``1/sqrt(head_dim)`` when None.
    return_lse : bool
        Also return each row's natural log-sum-exp over its kept logits, float32 (float64 for
        float64 inputs) [batch, q_heads, q_len]: attentions of the same queries over disjoint keys merge exactly
        with it (docs/semantics.md).

    Returns
    -------
    Tensor [batch, q_heads, q_len, head_dim], dtype of ``q``; with ``return_lse``, ``(out, lse)``.

    CUDA tensors in float16/bfloat16 run the Triton kernels; anything else runs PyTorch's SDPA with
    each head's kept set as a mask: the same kept sets (docs/semantics.md), at dense cost.

    Inference only: inputs that require grad are attended with autograd off (nothing is kept for
    a backward), and a backward through the output raises :data:`INFERENCE_ONLY`.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__} {return_lse!r}")

    def attend(q, k, v):
        if isinstance(q, torch.Tensor) and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from .kernels import triton_sparse_attention  # lazy: importing the package never imports Triton

            return triton_sparse_attention(q, k, v, patterns, scale=scale, return_lse=return_lse)
        shape = check_qkv(q, k, v)
        head_patterns = check_layer_patterns(patterns, shape.q_heads)
        softmax_scale = check_scale(scale, shape.head_dim)
        indices = estimate_layer(q, k, head_patterns, softmax_scale)
        return masked_attention(q, k, v, indices, scale=softmax_scale, return_lse=return_lse)

    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v)):
        return _InferenceOnly.apply(attend, q, k, v)
    return attend(q, k, v)


def attention_over_indices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: Sequence, *,
                           scale: float) -> torch.Tensor:
    """Causal attention of ``q`` (the last ``q_len`` positions of ``k``/``v``) over given kept sets, one
    index per query head (from :func:`sparse_prefill.kinds.estimate_layer`), without estimating anything:
    the Triton kernels on CUDA float16/bfloat16, SDPA with each head's kept set as a mask otherwise.
    Inference only, as :func:`sparse_attention`, and unchecked: the caller validated the inputs."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from .kernels import plan_from_indices, run_plan  # lazy: importing the package never imports Triton

        plan = plan_from_indices(indices, q.shape[0], k.shape[2], q.device, k.shape[2] - q.shape[2])
        return run_plan(q, k, v, plan, scale)
    return masked_attention(q, k, v, indices, scale=scale)
