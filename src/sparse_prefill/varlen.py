"""Several sequences of different lengths in one call: packed (FlashAttention's ``cu_seqlens``) or padded.

Each sequence is attended exactly as if it were alone (docs/semantics.md, "Several sequences in one
call"): its own index, estimated from its own queries and keys. :class:`Sequences` says where each
sequence lies in the batch's tensors; :func:`attention_of_sequences` runs them all, on the GPU in one
kernel launch for every sequence and head (each sequence's plan built alone, then combined), on a
CPU one sequence at a time through PyTorch. :func:`sparse_attention_varlen` is the packed layout's
entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .attention import _InferenceOnly, sparse_attention
from .checks import check_layer_patterns, check_scale
from .kinds.common import on_triton
from .patterns import Pattern

__all__ = ["Sequences", "attention_of_sequences", "sparse_attention_varlen"]


@dataclass(frozen=True)
class Sequences:
    """Where each sequence lies: sequence ``i`` is batch element ``i`` of Q/K/V/Out.

    Its keys are positions ``0 .. seq[i] - 1``, at rows ``key_offset[i] ..`` of K/V's sequence
    dimension; its queries are positions ``q_start[i] .. seq[i] - 1`` (the last ones, as in
    :func:`~sparse_prefill.sparse_attention`), at rows ``query_offset[i] ..`` of Q/Out's. A sequence
    without queries has ``seq = q_start = 0``.
    """

    seq: tuple[int, ...]
    q_start: tuple[int, ...]
    key_offset: tuple[int, ...]
    query_offset: tuple[int, ...]

    @classmethod
    def packed(cls, cu_seqlens: Sequence[int]) -> "Sequences":
        """Whole prompts packed one after another: sequence ``i`` is rows ``cu_seqlens[i] .. cu_seqlens[i + 1] - 1``."""
        starts, ends = list(cu_seqlens[:-1]), list(cu_seqlens[1:])
        return cls(tuple(e - s for s, e in zip(starts, ends)), (0,) * len(starts), tuple(starts), tuple(starts))

    @classmethod
    def padded(cls, spans: Sequence[tuple[int, int]], q_len: int, kv_len: int) -> "Sequences":
        """A padded batch: batch element ``i``'s real keys are rows ``spans[i] = (first, end)`` of ``kv_len``,
        its queries the real ones among the last ``q_len`` rows (a chunk on a cache: left padding)."""
        rows = []
        for first, end in spans:
            query_first = max(first, kv_len - q_len)  # row of the first real query among the keys
            if end <= query_first:
                rows.append((0, 0, 0, 0))
            else:
                rows.append((end - first, query_first - first, first, query_first - (kv_len - q_len)))
        return cls(*(tuple(column) for column in zip(*rows)))

    def __len__(self) -> int:
        return len(self.seq)

    def queries(self, i: int) -> slice:
        """Sequence ``i``'s rows of Q/Out."""
        return slice(self.query_offset[i], self.query_offset[i] + self.seq[i] - self.q_start[i])

    def keys(self, i: int) -> slice:
        """Sequence ``i``'s rows of K/V."""
        return slice(self.key_offset[i], self.key_offset[i] + self.seq[i])


def attention_of_sequences(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sequences: Sequences, patterns: Sequence[Sequence[Pattern]], *,
    scale: float, out: torch.Tensor, lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sequence's queries over its own keys, with its own index, written into ``out`` (and ``lse``).

    Parameters
    ----------
    q : Tensor [n, q_heads, q_rows, head_dim]
    k, v : Tensor [n, kv_heads, kv_rows, head_dim]
        Batch element ``i`` holds sequence ``i`` at the rows ``sequences`` gives; a batch stride of 0
        (an expanded view) makes them one packed tensor.
    sequences : Sequences
    patterns : one sequence of ``q_heads`` patterns per sequence
        Budgets as given, clamped to each sequence's length as docs/semantics.md says.
    scale : float
    out : Tensor like q
        Written at each sequence's query rows only: rows of no sequence keep what they held.
    lse : Tensor [n, q_heads, q_rows] or None
        float32 (float64 for float64 inputs), written likewise: each row's natural log-sum-exp.

    CUDA float16/bfloat16 tensors run in one launch of the sparse kernel (the plans of all sequences
    combined); anything else runs :func:`~sparse_prefill.sparse_attention` on each sequence. Inference only.
    """
    if len(patterns) != len(sequences):
        raise ValueError(f"one tuple of patterns per sequence, got {len(patterns)} for {len(sequences)} sequences")
    if on_triton(q):
        from .kernels import triton_attention_of_sequences  # lazy: importing the package never imports Triton

        return triton_attention_of_sequences(q, k, v, sequences, patterns, scale=scale, out=out, lse=lse)
    for i in range(len(sequences)):
        rows, keys = sequences.queries(i), sequences.keys(i)
        if rows.stop == rows.start:
            continue
        one = slice(i, i + 1)
        result = sparse_attention(q[one, :, rows], k[one, :, keys], v[one, :, keys], patterns[i], scale=scale,
                                  return_lse=lse is not None)
        if lse is None:
            out[one, :, rows] = result
        else:
            out[one, :, rows], lse[one, :, rows] = result
    return out


def sparse_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    patterns: Pattern | Sequence[Pattern],
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse causal attention of packed whole prompts, each with its own index: FlashAttention's varlen layout.

    Parameters
    ----------
    q : Tensor [total, q_heads, head_dim]
    k, v : Tensor [total, kv_heads, head_dim]
        The prompts one after another; ``q_heads`` a multiple of ``kv_heads`` (GQA, never repeated).
    cu_seqlens : int Tensor or sequence of ints [n + 1]
        Prompt ``i`` is rows ``cu_seqlens[i] .. cu_seqlens[i + 1] - 1``: ``0``, then increasing, ending
        at ``total``. Read on the host (one synchronisation for a GPU tensor).
    patterns : Pattern or sequence of q_heads Patterns
        The same for every prompt; budgets are clamped to each prompt's length.
    scale : float, optional
        Softmax scale, ``1/sqrt(head_dim)`` when None.
    return_lse : bool
        Also return each row's natural log-sum-exp over its kept logits, float32 (float64 for
        float64 inputs) [q_heads, total].

    Returns
    -------
    Tensor [total, q_heads, head_dim]; with ``return_lse``, ``(out, lse)``. Each prompt's rows equal
    :func:`~sparse_prefill.sparse_attention` on that prompt alone. On CUDA float16/bfloat16 every
    prompt and head runs in one kernel launch. Inference only, as :func:`~sparse_prefill.sparse_attention`.
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            raise ValueError(f"{name} must be a [total, heads, head_dim] tensor, got "
                             f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k and v must hold the same tokens, got total={q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    if (len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q.shape[0]
            or any(end <= start for start, end in zip(bounds, bounds[1:]))):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to total={q.shape[0]} (no empty prompt), got {bounds}")
    head_patterns = check_layer_patterns(patterns, q.shape[1])
    softmax_scale = check_scale(scale, q.shape[2])
    sequences = Sequences.packed(bounds)
    n = len(sequences)

    def batched(x: torch.Tensor) -> torch.Tensor:  # [total, heads, dim] -> [n, heads, total, dim], batch stride 0
        return x.transpose(0, 1).unsqueeze(0).expand(n, -1, -1, -1)

    def attend(q, k, v):
        out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)  # [total, q_heads, dim]
        lse = None
        if return_lse:
            lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            lse = torch.empty(q.shape[1], q.shape[0], dtype=lse_dtype, device=q.device)  # [q_heads, total]
        attention_of_sequences(batched(q), batched(k), batched(v), sequences, [head_patterns] * n, scale=softmax_scale,
                               out=batched(out), lse=None if lse is None else lse.unsqueeze(0).expand(n, -1, -1))
        return (out, lse) if return_lse else out

    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _InferenceOnly.apply(attend, q, k, v)
    return attend(q, k, v)
