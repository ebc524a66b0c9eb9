"""Per-device progress of a start on the terminal: one bar per worker (bytes of weights received, then
tensors loaded, with the rate), and one line per worker when it is done.

On a terminal the bars are redrawn in place; elsewhere (a log file, a pipe) only the done lines are
written, since the log lines already tell the rest.
"""

from __future__ import annotations

import time
from typing import TextIO

from meshllm.transport.stage import LoadUpdate

BAR_WIDTH = 24


def bar_line(device: str, update: LoadUpdate, seconds: float) -> str:
    """e.g. 'w1     [#########---------------]  38%  12.0/31.5 MB  9.8 MB/s  receiving weights'."""
    filled = int(round(BAR_WIDTH * min(max(update.fraction, 0.0), 1.0)))
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    if update.phase == "fetch":
        rate = update.bytes_done / seconds / 1e6 if seconds > 0 else 0.0
        detail = f"{update.bytes_done / 1e6:.1f}/{update.bytes_total / 1e6:.1f} MB  {rate:.1f} MB/s  receiving weights"
    else:
        detail = "loading tensors"
    return f"{device:<10} [{bar}] {update.fraction:4.0%}  {detail}"


class LoadBoard:
    """The bars of every device whose load is under way, and their done lines."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.live = stream.isatty()
        self.bars: dict[str, str] = {}
        self.started: dict[tuple[str, str], float] = {}  # (device, phase) -> when the phase began
        self.drawn = 0  # bar lines on screen below the cursor's line

    def update(self, device: str, update: LoadUpdate) -> None:
        now = time.monotonic()
        started = self.started.setdefault((device, update.phase), now)
        if update.done:
            self.bars.pop(device, None)
            self._draw(done=f"{device}: {update.message}")
            return
        if update.phase == "fetch" and update.bytes_total == 0:
            return  # the cache held everything: nothing to show until it is done
        self.bars[device] = bar_line(device, update, now - started)
        if self.live:
            self._draw()

    def _draw(self, done: str | None = None) -> None:
        if not self.live:
            if done:
                print(done, file=self.stream, flush=True)
            return
        out = ""
        if self.drawn:
            out += f"\x1b[{self.drawn}F"  # back to the first bar line
        out += "\x1b[J"  # clear below
        if done:
            out += done + "\n"
        out += "".join(line + "\n" for line in self.bars.values())
        self.drawn = len(self.bars)
        self.stream.write(out)
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.stream.flush()
        self.bars.clear()
        self.drawn = 0
