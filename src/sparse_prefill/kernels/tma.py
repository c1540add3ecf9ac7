"""When a tensor can be read through Hopper's TMA copies (Triton tensor descriptors built on the host).

A descriptor load brings a whole box of a tensor into shared memory without per-element address
arithmetic; on an H200 the sparse kernel's key blocks ran 12-20% faster that way and the Block-Coverage
scoring pass 9% (docs/BENCHMARKS.md, ninth session). TMA needs a 16-byte aligned base address and
16-byte multiples for every stride but the last (contiguous) one; a broadcast (stride 0) dimension
has no descriptor. Callers fall back to pointer loads where this says no.
"""

from __future__ import annotations

import torch


def tma_loadable(tensor: torch.Tensor) -> bool:
    """Whether a descriptor over ``tensor``'s own shape and strides is one TMA accepts."""
    size = tensor.element_size()
    if tensor.stride(-1) != 1 or tensor.data_ptr() % 16:
        return False
    return all(stride != 0 and stride * size % 16 == 0
               for stride, extent in zip(tensor.stride()[:-1], tensor.shape[:-1]) if extent > 1)
