"""A one-line progress display for the CLI, fed by ``engine.run``'s ``on_progress``."""

from __future__ import annotations

import time
from typing import TextIO

from demo_app.loadtest.engine import Progress


def format_progress(progress: Progress) -> str:
    """``  12.5 s  sent 2304/11449  in flight 812  served 75.2/s  lag 3 ms``."""
    return (
        f"{progress.elapsed_s:6.1f} s  sent {progress.sent}/{progress.planned}"
        f"  in flight {progress.in_flight}  served {progress.served_per_s:.1f}/s"
        f"  lag {progress.max_lag_s * 1000:.0f} ms"
    )


class ProgressLine:
    """Shows progress on ``stream``: one line rewritten in place on a terminal,
    otherwise a new line every ``every_s`` seconds (logs stay readable)."""

    def __init__(self, stream: TextIO, *, tty: bool, every_s: float = 5.0) -> None:
        self.stream = stream
        self.tty = tty
        self.every_s = every_s
        self.last = -float("inf")
        self.written = False

    def __call__(self, progress: Progress) -> None:
        text = format_progress(progress)
        if self.tty:
            # \r back to the start of the line, \x1b[K clears what a longer line left.
            self.stream.write(f"\r{text}\x1b[K")
        else:
            now = time.monotonic()
            if now - self.last < self.every_s:
                return
            self.last = now
            self.stream.write(text + "\n")
        self.stream.flush()
        self.written = True

    def close(self) -> None:
        """End the in-place line so what follows starts on a fresh one."""
        if self.tty and self.written:
            self.stream.write("\n")
            self.stream.flush()
