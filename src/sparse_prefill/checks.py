"""Shared argument checks: every public entry point validates through these, so errors read alike.

Messages name the argument, the expected form and the value received.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .patterns import Pattern, PatternConfig, check_is_pattern

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.q_heads // self.kv_heads


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, check_finite: bool = True) -> AttentionShape:
    """Validate ``q`` [batch, q_heads, q_len, dim] and ``k``/``v`` [batch, kv_heads, kv_len, dim], ``q_len <= kv_len``.

    The queries are the last ``q_len`` positions of the ``kv_len`` keys (a whole prompt when equal;
    a chunk on top of the earlier keys otherwise).
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, heads, seq, head_dim], got shape {tuple(tensor.shape)}"
            )
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype={tensor.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}")
    batch, q_heads, q_len, head_dim = q.shape
    k_batch, kv_heads, kv_len, k_dim = k.shape
    if k_batch != batch:
        raise ValueError(f"q and k must have the same batch size, got q batch={batch}, k batch={k_batch}")
    if q_len > kv_len:
        raise ValueError(
            f"the queries are the last positions of the keys, so q_len <= kv_len is needed, got q seq={q_len}, "
            f"k seq={kv_len}"
        )
    if k_dim != head_dim:
        raise ValueError(f"q and k must have the same head_dim, got q head_dim={head_dim}, k head_dim={k_dim}")
    if min(batch, q_heads, kv_heads, q_len, head_dim) == 0:
        raise ValueError(f"q and k must have no empty dimension, got q={tuple(q.shape)}, k={tuple(k.shape)}")
    if q_heads % kv_heads:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of KV heads, "
            f"got q_heads={q_heads}, kv_heads={kv_heads}"
        )
    if check_finite:
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            # The extremes are NaN or infinite exactly when some element is (max/min propagate NaN);
            # unlike isfinite(tensor), this makes no tensor-sized temporaries (GBs at 1M tokens).
            if not bool(torch.isfinite(torch.stack([tensor.amax(), tensor.amin()])).all()):
                why = ("sparse index estimation needs finite inputs" if name != "v" else
                       "every query that keeps such a key would get a NaN output row")
                raise ValueError(f"{name} contains NaN or Inf; {why}")
    return AttentionShape(batch, q_heads, kv_heads, q_len, kv_len, head_dim)


def check_layer_patterns(patterns: Pattern | Sequence[Pattern], q_heads: int) -> tuple[Pattern, ...]:
    """One pattern for all heads, or a sequence with one pattern per query head."""
    if isinstance(patterns, (list, tuple)):
        if len(patterns) != q_heads:
            raise ValueError(
                f"patterns must hold one pattern per query head: got {len(patterns)} patterns for "
                f"q_heads={q_heads}"
            )
        return tuple(check_is_pattern(p, f"patterns[{h}]") for h, p in enumerate(patterns))
    return (check_is_pattern(patterns, "patterns"),) * q_heads


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a positive finite number or None (1/sqrt(head_dim)), got scale={scale!r}")
    return float(scale)


def read_text_file(path: str | os.PathLike, option: str) -> str:
    """The UTF-8 text of ``path``, or ``ValueError`` naming ``option`` (e.g. ``--prompt-file``) and what is wrong.

    Refused: a missing or unreadable file, a directory, bytes that are not UTF-8 (a Latin-1 or binary
    file), and NUL bytes (binary data that happens to decode).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{option} {os.fspath(path)!r} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}); convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    except OSError as error:  # missing, a directory, no permission
        raise ValueError(f"cannot read {option} {os.fspath(path)!r}: {error.strerror or error}") from None
    if "\x00" in text:
        raise ValueError(f"{option} {os.fspath(path)!r} holds NUL bytes: it looks like a binary file, not text")
    return text


def load_config_option(path: str | os.PathLike, option: str = "--config") -> PatternConfig:
    """The pattern config file ``path``, or ``ValueError`` naming ``option`` and what is wrong.

    A name that is not a file but a preset's (``--config fast``), or ``uniform`` (which ``eval
    --config`` once took), gets told that presets are chosen with ``--preset``.
    """
    from .presets import PRESETS

    try:
        return PatternConfig.load(path)
    except (ValueError, TypeError) as error:
        hint = ""
        if not os.path.exists(path) and os.fspath(path) in (*PRESETS, "uniform"):
            hint = f"; presets are chosen with --preset ({', '.join(PRESETS)}), --config takes a JSON file"
        raise ValueError(f"{option} {os.fspath(path)!r}: {error}{hint}") from None


def check_device(device: str | torch.device | None, name: str = "device") -> torch.device:
    """``device`` as a torch.device (None or ``"auto"``: CUDA when available), or ``ValueError`` naming ``name``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be auto, cpu, cuda or cuda:N, got {str(device)!r}") from None
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be auto, cpu, cuda or cuda:N, got {str(device)!r}")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {str(device)!r}: no CUDA GPU is visible")
    return chosen


def check_writable_directory(directory: str | os.PathLike, name: str) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, or ``ValueError`` naming ``name``."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{name} {os.fspath(path)!r} is not a writable directory: {error.strerror or error}") from None
    return path
