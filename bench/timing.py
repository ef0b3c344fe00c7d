"""Timing and bandwidth helpers shared by fastlt's benchmarks (CPU timings: report ratios measured in one run)."""

import statistics
import time

import torch


def measure(fn, *, warmup=2, repeats=10, min_seconds=0.0):
    """Median and min wall time of ``fn()`` in milliseconds (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start) < min_seconds:
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def copy_bandwidth_gbs(num_bytes=256 * 2**20, device="cpu"):
    """This machine's copy bandwidth (GB/s, read + write) from the best of 20 large ``Tensor.copy_`` calls."""
    source = torch.ones(num_bytes // 4, device=device)
    target = torch.empty_like(source)
    _, best_ms = measure(lambda: target.copy_(source), warmup=2, repeats=20)
    return 2 * num_bytes / (best_ms * 1e-3) / 1e9


def format_table(rows):
    """Rows (dicts with the same keys) as an aligned text table."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    cells = [[_fmt(row.get(key)) for key in keys] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) for i, key in enumerate(keys)]
    lines = ["  ".join(key.ljust(w) for key, w in zip(keys, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)
