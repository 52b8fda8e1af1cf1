"""Progress of long command-line runs on stderr, only when it is a terminal
(a pipe or a log file gets no carriage-return noise). The nodes drive
ComfyUI's own bar instead."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

_EVERY_S = 0.2


def terminal_progress(label: str, stream: TextIO | None = None) -> Callable[[int, int], None] | None:
    """A ``progress(done, total)`` callback that redraws one line on ``stream``
    (default stderr) at most every 0.2 s and ends it at the last step; None
    when the stream is not a terminal."""
    stream = stream or sys.stderr
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        final = done >= total
        if not final and now - last[0] < _EVERY_S:
            return
        last[0] = now
        pct = 100.0 * done / total if total else 100.0
        stream.write(f"\r{label}: {done}/{total} modules ({pct:3.0f} %)" + ("\n" if final else ""))
        stream.flush()
    return progress
