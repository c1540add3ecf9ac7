"""What every pattern kind shares: the 64-token block, argument checks, kept-set helpers."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import torch

BLOCK = 64  # query blocks, key blocks and block diagonals: the tile of the GPU kernel
LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * LOG2E)


def check_positive_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
    # bool is an int subclass; AShape(True, 64) is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {name}={value}")


def check_fraction(owner: str, name: str, value: Any) -> float:
    """A number in (0, 1], returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{owner}.{name} must be a number in (0, 1], got {name}={value!r}")
    return float(value)


def scaled_count(value: int, factor: float) -> int:
    """A length-like budget times ``factor``, rounded, at least 1."""
    return max(1, round(value * factor))


def causal(rows: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Bool [rows, keys]: key ``j <= i``."""
    keys = torch.arange(n_keys, device=rows.device)
    return keys[None, :] <= rows[:, None]


def flags(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [batch, length] with True at each listed position; positions at or past ``length`` are
    dropped (a mask over a prefix of the keys)."""
    out = torch.zeros(positions.shape[0], length + 1, dtype=torch.bool, device=positions.device)
    return out.scatter_(1, positions.clamp(max=length), True)[:, :length]


def n_blocks(seq: int) -> int:
    return -(-seq // BLOCK)


def query_start(q: torch.Tensor, k: torch.Tensor) -> int:
    """Position of ``q``'s first row: the queries are the last ``q_len`` of the ``kv_len`` positions."""
    return k.shape[-2] - q.shape[-2]


def float_dtype(x: torch.Tensor) -> torch.dtype:
    """The estimators' arithmetic: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def on_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take this tensor (CUDA, half precision) rather than PyTorch."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def stack_padded(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    """Stack ``[batch, ..., n_i]`` tensors along a new dim 1, padding the last dimension with ``value``.

    One head's index per tensor: the GPU plan takes all heads of a kind as one tensor.
    """
    width = max(t.shape[-1] for t in tensors)
    return torch.stack([t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value)
                        for t in tensors], dim=1)


def device_values(values: Sequence, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small constant tensor (head ids, budgets) on ``device``, made once per distinct value list.

    Read-only: it is shared. A copy from pageable host memory to a GPU waits for the GPU to finish
    its queue; every layer asking for the same ids would stall the host there, so each distinct list
    crosses once and stays.
    """
    return _device_values(tuple(values), torch.device(device), dtype)


@lru_cache(maxsize=512)
def _device_values(values: tuple, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)
