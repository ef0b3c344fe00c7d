"""The loop shared by tools/nvcc_check.py and tools/portable_check.py: compile each source with the command a checker
builds for it, a few at a time, print one line per file and a 'N passed, N failed' summary, exit 1 on any failure."""

import concurrent.futures
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_checks(label, sources, command_for, jobs, passed_line):
    """``command_for(source)`` is the compiler command of one source; ``passed_line`` says what a pass proves."""

    def check(source):
        start = time.time()
        result = subprocess.run(command_for(source), capture_output=True, text=True)
        return source, result, time.time() - start

    failed = 0
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for source, result, seconds in pool.map(check, sources):
            name = os.path.relpath(source, ROOT)
            if result.returncode == 0:
                print(f"{label}: {name} {passed_line} ({seconds:.0f} s)", flush=True)
            else:
                failed += 1
                print(f"{label}: {name} FAILED\n{result.stderr[-4000:]}", flush=True)
    print(f"{label}: {len(sources) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
