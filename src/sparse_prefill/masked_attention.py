"""Sparse attention off the GPU: PyTorch's fused SDPA with each head's kept set as a boolean mask.

Computes exactly what :func:`sparse_prefill.reference.attention_with_index` computes, about six times
faster on a CPU (SmolLM2's shapes at 8K: 1.2 s a layer against 7.4 s; dense SDPA takes 0.5 s): each
chunk of query rows attends only to its causal prefix, all heads in one fused call, with K/V shared
across a GQA group instead of copied. It still touches every causal pair, so on a CPU sparse prefill
is about twice as slow as dense; it exists so that accuracy can be measured anywhere.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .kinds import HeadIndex

__all__ = ["CHUNK_SIZE", "masked_attention"]

CHUNK_SIZE = 1024  # query rows per fused SDPA call: its temporaries are CHUNK_SIZE x seq per head


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: Sequence[HeadIndex],
    *,
    scale: float,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Attention of ``q`` [batch, q_heads, seq, dim] over each head's kept set; dtype of ``q``."""
    seq = q.shape[2]
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    for start in range(0, seq, chunk_size):
        end = min(start + chunk_size, seq)
        rows = torch.arange(start, end, device=q.device)
        # Keys beyond the last row are never kept (causal), so the chunk only sees its prefix.
        mask = torch.stack([index.kept_mask(rows, end) for index in indices], dim=1)  # [batch, heads, rows, end]
        out[:, :, start:end] = F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask, scale=scale, enable_gqa=True
        )
    return out
