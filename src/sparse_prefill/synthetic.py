"""Planted attention inputs: Q/K/V whose attention has known sinks, heavy columns and diagonals.

Real long-context heads show attention that decays with distance (RoPE), a few sink tokens, some
heavy key columns and some far diagonals. ``planted_qkv`` builds inputs with exactly that structure
so tests can check that the estimators find what was planted, and demos and benchmarks have a
realistic workload without a model.

Construction, per KV head (its query heads share the plants):
- a shared base vector rotated by RoPE at every position, for queries and keys alike: the logit of
  (i, j) then depends on i - j only and decays, with ripples, as the distance grows;
- ``sinks`` first keys and ``columns`` random key positions (before the last 64) get a shared direction that every query
  also carries (a heavy column);
- key ``j`` carries a random unit vector ``u_j``, and for each planted diagonal offset ``o`` query
  ``i`` carries ``u_{i - o}``, so the pair (i, i - o) gets a large logit on that diagonal;
- Gaussian noise on everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PlantedQKV", "planted_qkv"]


@dataclass
class PlantedQKV:
    q: torch.Tensor  # [batch, q_heads, seq, head_dim]
    k: torch.Tensor  # [batch, kv_heads, seq, head_dim]
    v: torch.Tensor  # [batch, kv_heads, seq, head_dim]
    columns: torch.Tensor  # [kv_heads, n_columns] planted heavy key columns (sinks included)
    offsets: torch.Tensor  # [kv_heads, n_offsets] planted diagonal offsets


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate pairs of channels (x[..., :d/2], x[..., d/2:]) by position-dependent angles."""
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = positions.to(torch.float64)[:, None] * frequencies[None, :]  # [seq, half]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half : 2 * half]
    return torch.cat([first * cos - second * sin, first * sin + second * cos, x[..., 2 * half :]], dim=-1)


def planted_qkv(
    batch: int = 1,
    q_heads: int = 4,
    kv_heads: int = 2,
    seq: int = 2048,
    head_dim: int = 64,
    *,
    sinks: int = 2,
    columns: int = 3,
    offsets: tuple[int, ...] | None = None,
    local_strength: float = 5.0,
    column_strength: float = 10.0,
    slash_strength: float = 8.0,
    noise: float = 0.4,
    rope_base: float = 10000.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PlantedQKV:
    """Build planted Q/K/V (see the module docstring). Strengths are logit scales before 1/sqrt(d).

    Tensors are made on ``generator``'s device when one is given, else on ``device``.

    ``offsets`` defaults to three diagonals: one near (seq // 7), one mid (seq // 3), one far
    (seq // 2), so most planted slashes lie far from the main diagonal.
    """
    if offsets is None:
        offsets = (max(seq // 7, 1), max(seq // 3, 1), max(seq // 2, 1))
    if any(not 0 < o < seq for o in offsets):
        raise ValueError(f"offsets must lie in (0, seq={seq}), got offsets={offsets}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads must be a multiple of kv_heads, got q_heads={q_heads}, kv_heads={kv_heads}")
    group = q_heads // kv_heads
    # Generated where it is used: a 1M-token Llama-shaped input is tens of GB in float32.
    g = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
    device = g.device
    f = torch.float32
    root_d = head_dim**0.25  # the logit of two vectors of norm s*d^(1/4) is s^2 after the 1/sqrt(d) scale

    def unit(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, head_dim, generator=g, dtype=f, device=device)
        return x / x.norm(dim=-1, keepdim=True)

    positions = torch.arange(seq, device=device)
    q = noise * torch.randn(batch, q_heads, seq, head_dim, generator=g, dtype=f, device=device)
    k = noise * torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=f, device=device)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=f, device=device)
    planted_columns, planted_offsets = [], []
    for kv in range(kv_heads):
        heads = slice(kv * group, (kv + 1) * group)
        base = _rope(unit(1).expand(seq, -1) * local_strength**0.5 * root_d, positions, rope_base)
        q[:, heads] += base
        k[:, kv] += base
        # Heavy columns come before the last 64 positions, where every estimating query can see them.
        pool = max(seq - 64 - sinks, min(columns, seq - sinks))
        heavy = torch.cat([torch.arange(sinks, device=device), sinks + torch.randperm(pool, generator=g, device=device)[:columns]])
        direction = unit(1)[0] * column_strength**0.5 * root_d
        k[:, kv, heavy] += direction
        q[:, heads] += direction
        marks = unit(seq) * slash_strength**0.5 * root_d  # [seq, dim], u_j
        k[:, kv] += marks
        for offset in offsets:
            q[:, heads, offset:] += marks[: seq - offset]
        planted_columns.append(heavy.sort().values)
        planted_offsets.append(torch.tensor(sorted(offsets), device=device))
    return PlantedQKV(
        q=q.to(dtype),
        k=k.to(dtype),
        v=v.to(dtype),
        columns=torch.stack(planted_columns),
        offsets=torch.stack(planted_offsets),
    )
