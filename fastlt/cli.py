"""The `fastlt` command: `fastlt bench ...`, `fastlt demo`, `fastlt doctor`, `fastlt train`, `fastlt eval`,
`fastlt stage2`, `fastlt data`, `fastlt methods`.

Building the parser imports no torch: a command's arguments are added, and its module imported, only when that
command runs, so `fastlt --help` and `fastlt train --help` answer at once. A `fastlt.errors.UserError` (a bad config
value, a missing file, no GPU, a missing optional package) ends the command with one line on stderr and exit code 2;
any other exception is a bug and keeps its traceback.
"""

import argparse
import importlib
import json
import os
import sys

from fastlt.errors import UserError

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


# The options of `fastlt bench` that each benchmark takes; --world-size runs fused-head's class-parallel variant.
BENCH_OPTIONS = {"ops": {"backend", "device"}, "losses": {"backend", "device"}, "fused-head": {"world_size"}}
CLASS_PARALLEL_BENCHMARKS = {"fused-head": "fastlt.bench.fused_head_parallel:run"}


def _world_size(text: str) -> int:
    """--world-size: a process count, at least 2 (one process is the plain fused-head benchmark)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (leave it out for one process), got {value}")
    return value


def _load(target):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def bench(names, quick=False, json_path=None, **options):
    """Run benchmarks by name, print a table per benchmark (under a header: machine, threads, problem sizes),
    optionally write all rows to JSON. ``options`` apply to the benchmarks BENCH_OPTIONS names: backend and device
    to the op and loss benchmarks, world_size to fused-head."""
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise UserError(f"unknown benchmark {unknown[0]!r}; choose from {sorted(BENCHMARKS)}")
    for name in names:
        refused = sorted(set(options) - BENCH_OPTIONS.get(name, set()))
        if refused:
            flags = " and ".join("--" + key.replace("_", "-") for key in refused)
            takers = " and ".join(f"`{taker}`" for taker, keys in BENCH_OPTIONS.items() if set(refused) <= keys)
            raise UserError(f"{flags} apply to {takers} only")
    from fastlt.bench.timing import format_table, table_header
    from fastlt.engine.run_folder import json_ready

    results = {}
    for name in names:
        run = _load(CLASS_PARALLEL_BENCHMARKS[name] if options.get("world_size") else BENCHMARKS[name])
        print(f"\n== fastlt bench {name}{' (quick)' if quick else ''} ==", flush=True)
        print(table_header(name, run, quick, **options), flush=True)
        rows = run(quick=quick, **options)
        print(format_table(rows), flush=True)
        results[name] = rows
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(json_ready(results), handle, indent=2, allow_nan=False)
        print(f"\nwrote {json_path}")
    return results


def demo(args):
    """The main job on the embedded default data; ends with the op benchmark summary."""
    _load("fastlt.demo:run")(args)
    bench(["ops"], quick=True, json_path=args.json)


def _bench_arguments(parser):
    parser.add_argument("names", nargs="*", default=["ops"], help=f"any of {sorted(BENCHMARKS)} (default: ops)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats, no torch.compile baseline")
    parser.add_argument("--json", help="write all rows to this JSON file")
    parser.add_argument("--backend", choices=("cpp", "triton", "reference"),
                        help="fused implementation for ops/losses (default: the compiled kernels if built)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="tensors' device for ops/losses (default: cpu)")
    parser.add_argument("--world-size", type=_world_size, metavar="W",
                        help="fused-head: the class-parallel head on W processes (gloo on CPU, nccl with W GPUs) vs "
                             "the replicated head under DDP")


def _demo_arguments(parser):
    parser.add_argument("--json", help="write the benchmark rows to this JSON file")
    parser.add_argument("--out", default="runs/demo", help="run folder of the training demo")


class _TrainHelp(argparse.Action):
    """`fastlt train --config R --help`: the usage, then every key of recipe R with its value, default and meaning."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show this help; after --config R, also every key of recipe R, its default and meaning")

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        if getattr(namespace, "config", None):
            try:
                recipe_help = _load("fastlt.methods.commands:recipe_help")
                print("\n" + recipe_help(namespace.config, getattr(namespace, "overrides", None) or []))
            except UserError as error:
                parser.exit(2, f"fastlt train: error: {' '.join(str(error).split())}\n")
        parser.exit()


def _train_arguments(parser):
    parser.add_argument("-h", "--help", action=_TrainHelp)
    parser.add_argument("--config", required=True, help="a YAML file or a packaged recipe name, e.g. mnist_lt_ride")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=5")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.set_defaults(handler="fastlt.methods.commands:train_command")


def _eval_arguments(parser):
    parser.add_argument("--run", required=True)
    parser.add_argument("--checkpoint", help="a stage-1 checkpoint (default: best.pt with val, else last.pt)")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.set_defaults(handler="fastlt.methods.commands:eval_command")


def _stage2_arguments(parser):
    from fastlt.methods.registry import method_names  # the registered ones; `fastlt stage2` imports them anyway

    parser.add_argument("method", choices=method_names(2))
    # the run folder as a positional (before any overrides) or as --run (argparse cannot put overrides after it)
    parser.add_argument("run", nargs="?", help="the stage-1 run folder")
    parser.add_argument("--run", dest="run_option", help="the stage-1 run folder (when no overrides follow)")
    parser.add_argument("overrides", nargs="*", help="e.g. stage2.epochs=5 stage2.freeze_bn=true")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler="fastlt.methods.commands:stage2_command")


def _data_arguments(parser):
    parser.add_argument("dataset", choices=("fashion-mnist",))
    parser.add_argument("--dest", help="folder for the files (default $FASTLT_DATA/fashion-mnist, else "
                                       "~/.cache/fastlt/fashion-mnist: where the fmnist_lt_* recipes look)")
    parser.set_defaults(handler="fastlt.data.commands:data_command")


def _methods_arguments(parser):
    parser.add_argument("name", nargs="?", help="a method, e.g. ride: its options with their defaults and meaning")
    parser.set_defaults(handler="fastlt.methods.commands:methods_command")


# name -> (help, the function adding its arguments; fastlt.doctor parses its own)
COMMANDS = {
    "bench": ("run benchmarks and print a table", _bench_arguments),
    "demo": ("the main job on the embedded data (MNIST-LT), then a quick op benchmark", _demo_arguments),
    "doctor": ("versions, how the extension was built, every kernel vs the reference here", None),
    "train": ("train a recipe (and its stage 2), report many/medium/few on test", _train_arguments),
    "eval": ("evaluate a run folder (stage 1 or stage2_<name>)", _eval_arguments),
    "stage2": ("Decoupling classifiers, RIDE's router, post-hoc logit adjustment or SADE's test-time expert "
               "aggregation on a stage-1 run", _stage2_arguments),
    "data": ("put a data set's files in fastlt's cache (Fashion-MNIST: from Debian's dataset-fashion-mnist "
             "package, no root)", _data_arguments),
    "methods": ("the stage-1 and stage-2 methods, or one method's options with their defaults", _methods_arguments),
}


def build_parser(command=None):
    """The `fastlt` parser with the arguments of `command` only (adding another's may import its modules)."""
    parser = argparse.ArgumentParser(prog="fastlt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments) in COMMANDS.items():
        # "resolve": a command may replace the default -h (train's also lists a recipe's keys)
        subparser = subparsers.add_parser(name, help=help_text, description=help_text, conflict_handler="resolve")
        if name == command and add_arguments is not None:
            add_arguments(subparser)
    return parser


def _rerun_with_bench_allocator(argv):
    """Re-execute this command with BENCH_MALLOC_ENV set (glibc reads it only at process start)."""
    if os.environ.get("FASTLT_BENCH_DEFAULT_MALLOC") == "1" or all(os.environ.get(k) for k in BENCH_MALLOC_ENV):
        return
    os.environ.update(BENCH_MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, "-m", "fastlt.cli"] + list(argv))


def _run(args):
    if args.command == "bench":
        options = {key: value for key, value in (("backend", args.backend), ("device", args.device),
                                                 ("world_size", args.world_size)) if value}
        bench(args.names, quick=args.quick, json_path=args.json, **options)
    elif args.command == "demo":
        demo(args)
    else:
        _load(args.handler)(args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere on the line, also after the subcommand
    argv = [item for item in argv if item != "--debug"]
    if argv[:1] == ["doctor"]:  # before the training commands are imported: they import triton (see fastlt.doctor)
        return _load("fastlt.doctor:main")(argv[1:])
    parser = build_parser(argv[0] if argv else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after an option (`--no-progress train.epochs=2`) land here
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command in ("bench", "demo"):
        _rerun_with_bench_allocator(argv)
    try:
        _run(args)
    except UserError as error:  # what the user can fix: say what, not where in fastlt
        if debug:
            raise
        message = " ".join(str(error).split())
        print(f"fastlt {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
