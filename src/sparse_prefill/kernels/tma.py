"""When a tensor can be read through Hopper's TMA copies (Triton tensor descriptors built on the host).

A descriptor load brings a whole box of a tensor into shared memory without per-element address
arithmetic; on an H200 the sparse kernel's key blocks ran 12-20% faster that way and the Block-Coverage
scoring pass 9% (docs/BENCHMARKS.md, ninth session). TMA needs a 16-byte aligned base address and
16-byte multiples for every stride but the last (contiguous) one; a broadcast (stride 0) dimension
has no descriptor. Callers fall back to pointer loads where this says no.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _descriptors_available() -> bool:
    """Host-built tensor descriptors exist from Triton 3.4 on; the package allows any Triton 3."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _has_tma(device_index: int) -> bool:
    """TMA copies are Hopper's (compute capability 9) and later. Older GPUs keep pointer loads:
    Triton can emulate descriptors there, but that path was never measured here."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def tma_loadable(tensor: torch.Tensor) -> bool:
    """Whether a descriptor over ``tensor``'s own shape and strides is one TMA accepts, on a GPU
    that has TMA, with a Triton that builds descriptors (CPU and meta tensors: the interpreter's and
    the offline compile test's stand-ins, judged by layout alone)."""
    if not _descriptors_available():
        return False
    if tensor.is_cuda and not _has_tma(tensor.device.index if tensor.device.index is not None
                                       else torch.cuda.current_device()):
        return False
    size = tensor.element_size()
    if tensor.stride(-1) != 1 or tensor.data_ptr() % 16:
        return False
    return all(stride != 0 and stride * size % 16 == 0
               for stride, extent in zip(tensor.stride()[:-1], tensor.shape[:-1]) if extent > 1)


def descriptor(tensor: torch.Tensor, shape: list[int], strides: list[int], block: list[int]):
    """A host tensor descriptor of ``tensor`` seen as ``shape`` with ``strides`` (elements), loading
    boxes of ``block``; only where :func:`tma_loadable` said yes."""
    from triton.tools.tensor_descriptor import TensorDescriptor  # Triton >= 3.4 (checked by tma_loadable)

    return TensorDescriptor(tensor, shape, strides, block)
