"""The `fastlt` command: `fastlt bench ...`, `fastlt demo`, `fastlt train`, `fastlt eval`, `fastlt stage2`."""

import argparse
import importlib
import json
import os
import sys

# glibc returns large freed blocks to the OS and every new large tensor then pays page faults (first-touch zeroing
# of the whole buffer), which would dominate a memory-bound kernel's time. Benchmarks run with freed memory kept in
# the heap, as a tuned PyTorch CPU deployment does (jemalloc/tcmalloc or these settings).
BENCH_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**40), "MALLOC_TRIM_THRESHOLD_": str(2**40)}

# name -> "module:function" returning a list of row dicts
BENCHMARKS = {
    "ops": "fastlt.bench.ops:run",
    "losses": "fastlt.bench.losses:run",
    "sampler": "fastlt.bench.data:run_sampler",
    "loader": "fastlt.bench.data:run_loader",
    "step": "fastlt.bench.step:run",
    "fused-head": "fastlt.bench.fused_head:run",
}


def _load(target):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def bench(names, quick=False, json_path=None, **options):
    """Run benchmarks by name, print a table per benchmark (under a header: machine, threads, problem sizes),
    optionally write all rows to JSON. ``options`` (backend, device) apply to the op and loss benchmarks."""
    from fastlt.bench.timing import format_table, table_header

    results = {}
    for name in names:
        if name not in BENCHMARKS:
            raise SystemExit(f"fastlt bench: unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
        try:
            run = _load(BENCHMARKS[name])
        except (ImportError, AttributeError) as error:
            raise SystemExit(f"fastlt bench {name}: not available in this install ({error})") from error
        if options and name not in ("ops", "losses"):
            raise SystemExit(f"fastlt bench {name}: --backend and --device apply to `ops` and `losses` only")
        print(f"\n== fastlt bench {name}{' (quick)' if quick else ''} ==", flush=True)
        print(table_header(name, run, quick, **options), flush=True)
        rows = run(quick=quick, **options)
        print(format_table(rows), flush=True)
        results[name] = rows
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"\nwrote {json_path}")
    return results


def demo(args):
    """The main job on the embedded default data; ends with the op benchmark summary."""
    try:
        run_demo = _load("fastlt.demo:run")
    except (ImportError, AttributeError):
        run_demo = None
    if run_demo is not None:
        run_demo(args)
    bench(["ops"], quick=True, json_path=args.json)


def _rerun_with_bench_allocator(argv):
    """Re-execute this command with BENCH_MALLOC_ENV set (glibc reads it only at process start)."""
    if os.environ.get("FASTLT_BENCH_DEFAULT_MALLOC") == "1" or all(os.environ.get(k) for k in BENCH_MALLOC_ENV):
        return
    os.environ.update(BENCH_MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, "-m", "fastlt.cli"] + list(argv))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere on the line, also after the subcommand
    argv = [item for item in argv if item != "--debug"]
    if argv[:1] == ["doctor"]:  # before the training commands are imported: they import triton (see fastlt.doctor)
        return _load("fastlt.doctor:main")(argv[1:])
    parser = argparse.ArgumentParser(prog="fastlt", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    commands = parser.add_subparsers(dest="command", required=True)
    p_bench = commands.add_parser("bench", help="run benchmarks and print a table")
    p_bench.add_argument("names", nargs="*", default=["ops"], help=f"any of {sorted(BENCHMARKS)} (default: ops)")
    p_bench.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats, no torch.compile baseline")
    p_bench.add_argument("--json", help="write all rows to this JSON file")
    p_bench.add_argument("--backend", choices=("cpp", "triton", "reference"),
                         help="fused implementation for ops/losses (default: the compiled kernels if built)")
    p_bench.add_argument("--device", choices=("cpu", "cuda"), help="tensors' device for ops/losses (default: cpu)")
    p_demo = commands.add_parser("demo", help="the main job on the embedded data (MNIST-LT), then a quick op benchmark")
    p_demo.add_argument("--json", help="write the benchmark rows to this JSON file")
    p_demo.add_argument("--out", default="runs/demo", help="run folder of the training demo")
    commands.add_parser("doctor", help="versions, how the extension was built, every kernel vs the reference here")
    _load("fastlt.methods.commands:add_subcommands")(commands)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after an option (`--no-progress train.epochs=2`) land here
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command in ("bench", "demo"):
        _rerun_with_bench_allocator(argv)
    if args.command == "bench":
        options = {key: value for key, value in (("backend", args.backend), ("device", args.device)) if value}
        bench(args.names, quick=args.quick, json_path=args.json, **options)
    elif args.command == "demo":
        demo(args)
    else:
        try:
            args.handler(args)
        except (ValueError, OSError) as error:  # bad config, data or run folder: say what, not where in fastlt
            if debug:
                raise
            message = " ".join(str(error).split())
            print(f"fastlt {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
            raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
