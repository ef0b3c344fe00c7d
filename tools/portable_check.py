"""Compile every CPU kernel (csrc/cpu/*.cpp) on its portable path, as a build for aarch64 (Grace, Graviton, Apple
silicon) would take it: -DFASTLT_PORTABLE turns off the x86 intrinsics and the per-ISA target_clones
(csrc/cpu/per_isa.h). It type-checks the sources (-fsyntax-only), so it proves that the portable path compiles, not how
fast it runs. CI runs it with `make test`.
    python tools/portable_check.py [--jobs 2] [csrc/cpu/<op>.cpp ...]
"""

import argparse
import glob
import os
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_flags import CXX_FLAGS  # noqa: E402
from compile_check import ROOT, run_checks  # noqa: E402


def compile_command(source):
    """g++ as setup.py's CPU build runs it (torch's include paths and C++ standard, fastlt's flags), on the portable
    path and without code generation."""
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc"),
                                                os.path.join(ROOT, "csrc", "include")]
    return (["c++", "-fsyntax-only", "-std=c++20", "-DFASTLT_PORTABLE", "-Wall", "-Werror=unused-function",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", source] + CXX_FLAGS
            + [f"-I{path}" for path in includes])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("sources", nargs="*", help="the .cpp files to check (default: every csrc/cpu/*.cpp)")
    args = parser.parse_args()
    sources = [os.path.abspath(source) for source in args.sources] or sorted(
        glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if not sources:
        sys.exit("portable-check: no .cpp files found")

    run_checks("portable-check", sources, compile_command, args.jobs, "compiles on the portable path")


if __name__ == "__main__":
    main()
