"""Progress bars redraw on a terminal and write at most a line a minute to a log (a file or a pipe)."""

import io
import time

from fastlt.engine import RunFolder
from fastlt.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def slow_items(count=24, seconds=0.05):
    for item in range(count):
        time.sleep(seconds)
        yield item


def test_a_log_gets_one_line_per_minute_not_one_per_refresh(tmp_path, capsys):
    run = RunFolder(str(tmp_path))
    assert list(run.progress(slow_items(), desc="epoch 0", total=24)) == list(range(24))  # 1.2 s on stderr
    assert capsys.readouterr().err.count("epoch 0") == 1  # drawn once when it starts, cleared at the end
    log = io.StringIO()
    assert len(list(progress_bar(slow_items(), "fastlt bench ops", 24, file=log))) == 24
    assert log.getvalue().count("fastlt bench ops") == 1


def test_a_terminal_gets_a_live_bar(tmp_path):
    terminal = Terminal()
    assert len(list(progress_bar(slow_items(), "epoch 0", 24, file=terminal))) == 24
    assert terminal.getvalue().count("epoch 0") >= 2
    quiet = Terminal()
    list(progress_bar(range(3), "epoch 0", file=quiet, enabled=False))
    assert quiet.getvalue() == ""
