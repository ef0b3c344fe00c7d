"""Timing and bandwidth helpers shared by fastlt's benchmarks (CPU timings: report ratios measured in one run)."""

import os
import platform
import statistics
import sys
import time

import torch

from fastlt.progress import progress_bar


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
    """Rows (dicts) as an aligned text table: a column per key, in the order the rows first use them."""
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_fmt(row.get(key)) for key in keys] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) for i, key in enumerate(keys)]
    lines = ["  ".join(key.ljust(w) for key, w in zip(keys, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device="cpu"):
    """Where the figures come from: CPU model and cores, torch and its thread count, the GPU for CUDA runs."""
    line = (f"CPU {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__} with {torch.get_num_threads()} "
            "intra-op threads")
    if torch.device(device).type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return line


def table_header(name, run, quick=False, **options):
    """The lines printed above a benchmark's table: machine, and the problem sizes of its module's ``problem()``."""
    module = sys.modules.get(run.__module__)
    describe = getattr(module, f"problem_{run.__name__}", None) or getattr(module, "problem", None)
    lines = [machine_line(options.get("device", "cpu"))]
    if describe is not None:
        lines.append("problem: " + describe(quick=quick, **options))
    return "\n".join(lines)


def progress(iterable, description, total=None):
    """A progress bar on stderr (the table goes to stdout) while a benchmark runs its cases (`fastlt.progress`)."""
    return progress_bar(iterable, description, total, file=sys.stderr)
