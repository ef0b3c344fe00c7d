"""Fault injection for the crash-consistency tests: named points in the checkpoint and epoch-end writes where a
test can make the process SIGKILL itself.

With FASTLT_CRASH_AT=N in the environment, the N-th crash point this process reaches (counting from 1) kills it
with SIGKILL, as a power cut or the OOM killer would; with FASTLT_CRASH_LOG=<file>, every point reached is
appended to that file by name. Unset (the normal case), `crash_point` only increments a counter.
"""

import os
import signal

_reached = 0


def crash_point(name: str) -> None:
    global _reached
    _reached += 1
    log = os.environ.get("FASTLT_CRASH_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(f"{name}\n")
    if os.environ.get("FASTLT_CRASH_AT") == str(_reached):
        os.kill(os.getpid(), signal.SIGKILL)
