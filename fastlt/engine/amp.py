"""Mixed precision: bf16 autocast on CPU; fp16 autocast with a GradScaler, or bf16, on CUDA.

>>> with autocast("cpu", "bf16"):
...     y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
>>> y.dtype
torch.bfloat16
"""

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(device_type: str, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"amp: precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(f"amp: fp16 needs a CUDA device (got {device_type!r}); use bf16 on CPU")


def autocast(device_type: str, precision: str = "fp32"):
    """torch.autocast for bf16 / fp16, a no-op context for fp32. Losses should run outside it, in fp32."""
    check_precision(device_type, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=_DTYPES[precision])


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire
    Rapids and later). oneDNN then runs bf16 convolutions and matmuls at up to twice the fp32 rate; without them
    bf16 is converted to fp32 around each product and is usually slower than fp32. From torch's cpuinfo queries."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def bf16_advice() -> str:
    """One line for `fastlt doctor`: whether `train.precision: bf16` is recommended on this machine."""
    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
        return (f"bf16 on the GPU: {'supported, train.precision=bf16 recommended' if supported else 'not supported'}"
                "; the CPU is not used for training")
    if cpu_has_bf16_instructions():
        return ("bf16: this CPU has AVX512-BF16 or AMX: train.precision=bf16 is recommended (bf16 convolutions, the "
                "losses still in fp32)")
    return "bf16: this CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated): keep train.precision=fp32"


def grad_scaler(device_type: str, precision: str = "fp32") -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 (bf16 has fp32's range and needs no loss scaling).

    A disabled scaler passes `scale(loss)` and `step(optimizer)` straight through, so the training step is the same
    code for every precision, and its (empty) state still round-trips through a checkpoint.
    """
    check_precision(device_type, precision)
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")
