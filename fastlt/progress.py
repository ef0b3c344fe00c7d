"""Progress bars that do not flood a log: on a terminal a tqdm bar redrawn twice a second; on a file or a pipe
(`make run > log 2>&1`, CI) the same bar written at most once a minute, so a log gets a line per minute of a long
loop instead of one per refresh.

It imports tqdm only, so that every layer (fastlt.engine, fastlt.bench) can use it.
"""

import sys

from tqdm import tqdm

TERMINAL_REFRESH_S = 0.5
LOG_REFRESH_S = 60.0


def progress_bar(iterable=None, desc="", total=None, *, enabled=True, file=None) -> tqdm:
    """A tqdm bar on `file` (default stderr), left on screen only while it runs; `enabled=False` shows nothing."""
    file = sys.stderr if file is None else file
    on_terminal = bool(getattr(file, "isatty", lambda: False)())
    refresh_s = TERMINAL_REFRESH_S if on_terminal else LOG_REFRESH_S
    # maxinterval too: tqdm's monitor thread would otherwise force a redraw every 10 s
    return tqdm(iterable, desc=desc, total=total, leave=False, file=file, disable=not enabled,
                dynamic_ncols=on_terminal, mininterval=refresh_s, maxinterval=max(refresh_s, 10.0))
