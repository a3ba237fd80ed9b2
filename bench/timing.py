"""Timing on the GPU for the benchmarks: the median of CUDA-event times after a warm-up.

The scripts import this module as a sibling (`python bench/NAME.py` puts bench/ on sys.path), like `provenance`.
"""

from __future__ import annotations

import statistics

import torch


def time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median CUDA-event time of fn() in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
