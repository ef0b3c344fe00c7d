"""Compile every CPU kernel (csrc/cpu/*.cpp) on its portable path, as a build for aarch64 (Grace, Graviton, Apple
silicon) would take it: -DFASTLT_PORTABLE turns off the x86 intrinsics and the per-ISA target_clones
(csrc/cpu/per_isa.h). It type-checks the sources (-fsyntax-only), so it proves that the portable path compiles, not how
fast it runs. CI runs it with `make test`.
    python tools/portable_check.py [--jobs 2] [csrc/cpu/<op>.cpp ...]
"""

import argparse
import concurrent.futures
import glob
import os
import subprocess
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_flags import CXX_FLAGS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

    def check(source):
        start = time.time()
        result = subprocess.run(compile_command(source), capture_output=True, text=True)
        return source, result, time.time() - start

    failed = 0
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for source, result, seconds in pool.map(check, sources):
            name = os.path.relpath(source, ROOT)
            if result.returncode == 0:
                print(f"portable-check: {name} compiles on the portable path ({seconds:.0f} s)", flush=True)
            else:
                failed += 1
                print(f"portable-check: {name} FAILED\n{result.stderr[-4000:]}", flush=True)
    print(f"portable-check: {len(sources) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
