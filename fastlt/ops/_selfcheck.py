"""The op layer's self-check: every op on a backend against its eager reference, on small inputs.

- :data:`TOLERANCES` / :func:`tolerance`: the one dtype tolerance table, used by the tests (tests/op_helpers.py),
  the differential fuzz test and ``fastlt doctor``.
- :func:`case`: each op registers the inputs it is checked on (``fastlt/ops/<op>.py``, at the bottom), from the
  sample builders here (:func:`sample_counts`, :func:`loss_sample`).
- :func:`check_op`: one op on one backend and device against the reference, values and gradients, per dtype;
  ``fastlt doctor`` (fastlt/doctor.py, the command-line view of this module) runs it for every op and backend.
- :func:`verdict`: the first-use self-check. The first time a process would run an op's compiled kernel on a device
  type in ``SELFCHECK_DEVICE_TYPES`` (CUDA: those kernels are not tested on every GPU), ``_backend.resolve`` asks
  for its verdict: the op runs on tiny inputs against the reference; if they disagree, a warning (once) and the op
  uses Triton (CUDA) or the reference for the rest of the process. ``FASTLT_SELFCHECK=0`` turns it off.

This module sits below ``fastlt.ops._backend`` (which consults it) and below the op modules (which register their
cases): it imports neither. While :func:`check_op` runs an op it names the backend (:data:`running_backend`), which
``_backend`` then uses as is, with no self-check of its own.
"""

import contextlib
import os
import warnings

import torch

DTYPES = (torch.float32, torch.bfloat16)
# (atol, rtol) of a kernel's result against the eager reference run on the same inputs; atol is relative to the
# largest finite magnitude of the reference's result (at least 1): a sum that cancels keeps the rounding of its
# terms. Both accumulate in fp32 (fp64 for fp64) and round once, so the gap is the rounding of the final value and
# the order of the fp32 sums, which can move a value across a low-precision rounding boundary (a few ulps: 2^-8 for
# bf16, 2^-11 for fp16).
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-6, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

SELFCHECK = os.environ.get("FASTLT_SELFCHECK", "1") != "0"
SELFCHECK_DEVICE_TYPES = ("cuda",)

CASES = {}  # op name (without "fastlt.") -> case(device, dtype, tiny) -> (call, inputs); see :func:`case`
running_backend = None  # while check_op runs an op: the backend it runs on
_verdicts = {}  # (op, device type) -> None (agrees with the reference) or the backend used instead


def tolerance(dtype: torch.dtype, expected: torch.Tensor, magnitude=None):
    """(atol, rtol) for a result of ``dtype`` against the reference's ``expected`` (:data:`TOLERANCES`); the atol is
    the table's times ``magnitude``, the size of the values the result is computed from: by default the largest
    finite magnitude of ``expected``, at least 1."""
    atol, rtol = TOLERANCES[dtype]
    if magnitude is None:
        finite = expected[torch.isfinite(expected)] if expected.is_floating_point() else expected
        magnitude = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return atol * magnitude, rtol


def case(op: str):
    """Register the decorated ``case(device, dtype, tiny) -> (call, inputs)`` as the self-check of ``op``
    (``"fastlt.<op>"``): ``call(*inputs)`` runs the public op; the floating inputs that require grad get their
    gradients checked (with a random cotangent for a non-scalar output). ``tiny``: the first-use check's inputs."""

    def register(function):
        CASES[op.removeprefix("fastlt.")] = function
        return function

    return register


def sample_counts(num_classes, device):
    """Long-tailed class counts for the ops' cases."""
    return (100 * torch.exp(-torch.arange(num_classes, device=device) / num_classes * 5)).floor().clamp_min(1)


def loss_sample(device, dtype, tiny, scale):
    """(logits [K, B, C] requiring grad, target [B], counts [C]) for a fused loss's case."""
    K, B, C = (2, 3, 9) if tiny else (3, 6, 37)
    logits = (torch.randn(K, B, C, device=device) * scale).to(dtype).requires_grad_()
    target = torch.randint(0, C, (B,), device=device)
    return logits, target, sample_counts(C, device)


@contextlib.contextmanager
def _running(backend):
    global running_backend
    previous, running_backend = running_backend, backend
    try:
        yield
    finally:
        running_backend = previous


def _run(op, backend, device, dtype, tiny, seed):
    """(output, gradients of the inputs that require grad) of ``op`` on ``backend``, from inputs made by ``seed``."""
    torch.manual_seed(seed)
    call, inputs = CASES[op](device, dtype, tiny)
    with _running(backend):
        output = call(*inputs)
        leaves = [x for x in inputs if x.requires_grad]
        grads = ()
        if leaves:
            torch.manual_seed(seed + 1)
            cotangent = torch.randn(output.shape, device=output.device).to(output.dtype)
            grads = torch.autograd.grad(output, leaves, cotangent)
    return output.detach(), [g.detach() for g in grads]


def compare(actual, expected, dtype):
    """(max |actual - expected| over finite values, within :func:`tolerance`); exact equality for integer results
    (tau_sweep's predictions)."""
    if actual.shape != expected.shape:
        return float("inf"), False
    if not expected.is_floating_point():
        mismatches = int((actual != expected).sum())
        return float(mismatches), mismatches == 0
    actual, expected = actual.double().cpu(), expected.double().cpu()
    atol, rtol = tolerance(dtype, expected)
    ok = bool(torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True).all())
    finite = torch.isfinite(expected) & torch.isfinite(actual)
    return float((actual - expected)[finite].abs().max()) if bool(finite.any()) else 0.0, ok


def check_op(op, device, backend, dtypes=DTYPES, tiny=False, seed=0):
    """Rows comparing ``op`` (``"<op>"`` or ``"fastlt.<op>"``) on ``backend`` with the reference on ``device``: one
    per dtype, with the max errors of the output and of the gradients and ``ok``. An exception in the kernel is a
    failed row."""
    op = op.removeprefix("fastlt.")
    device = torch.device(device)
    rows = []
    for dtype in dtypes:
        row = dict(op=op, device=device.type, backend=backend, dtype=str(dtype).replace("torch.", ""))
        try:
            expected, expected_grads = _run(op, "reference", device, dtype, tiny, seed)
            actual, actual_grads = _run(op, backend, device, dtype, tiny, seed)
        except Exception as error:  # a kernel that raises on valid input is as broken as a wrong one
            rows.append(dict(row, forward_err=None, grad_err=None, ok=False, note=f"raised {type(error).__name__}: "
                             f"{str(error).splitlines()[0][:80] if str(error) else ''}"))
            continue
        forward_err, forward_ok = compare(actual, expected, dtype)
        grad_checks = [compare(a, e, dtype) for a, e in zip(actual_grads, expected_grads)]
        grad_err = max((err for err, _ in grad_checks), default=None)
        grads_ok = all(ok for _, ok in grad_checks)
        note = "" if forward_ok and grads_ok else "wrong " + " and ".join(
            name for name, ok in (("values", forward_ok), ("gradients", grads_ok)) if not ok)
        rows.append(dict(row, forward_err=forward_err, grad_err=grad_err, ok=forward_ok and grads_ok, note=note))
    return rows


def verdict(op: str, device: torch.device):
    """The first-use self-check of ``op``'s compiled kernel on ``device`` (once per process and device type): None
    when it agrees with the reference (or is not checked here), else the backend to use instead."""
    if not SELFCHECK or running_backend is not None or device.type not in SELFCHECK_DEVICE_TYPES:
        return None
    key = (op, device.type)
    if key not in _verdicts:
        if torch.compiler.is_compiling():  # checked at the first eager call
            return None
        _verdicts[key] = _first_use_check(op, device)
    return _verdicts[key]


def _first_use_check(op, device):
    from fastlt import kernels

    failures = [row for row in check_op(op, device, "cpp", dtypes=(torch.float32,), tiny=True) if not row["ok"]]
    if not failures:
        return None
    fallback = "triton" if device.type == "cuda" and kernels.AVAILABLE else "reference"
    warnings.warn(
        f"fastlt: the compiled {device.type} kernel of {op} disagrees with the reference on this machine "
        f"({failures[0]['note']}); {op} uses the {fallback} backend in this process. `fastlt doctor` checks every "
        "kernel; FASTLT_SELFCHECK=0 turns this check off.",
        RuntimeWarning,
        stacklevel=4,
    )
    return fallback
