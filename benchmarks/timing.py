"""The one timing helper the benchmarks share: median milliseconds of a call, after warm-up."""

from __future__ import annotations

import statistics
import time

import torch


def cuda_ms(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    On a GPU each call is timed with CUDA events (the work queued on the current stream, not the
    Python overhead of queuing it); without one, with the wall clock.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)
