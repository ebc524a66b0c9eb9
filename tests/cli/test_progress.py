"""The per-device bars of a start: redrawn in place on a terminal, only the done lines elsewhere."""

from __future__ import annotations

import io

from meshllm.cli.progress import LoadBoard, bar_line
from meshllm.transport.stage import LoadUpdate


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fetch(done: int, total: int) -> LoadUpdate:
    return LoadUpdate("", phase="fetch", fraction=done / total, bytes_done=done, bytes_total=total)


def test_a_bar_shows_bytes_received_of_the_total_and_the_rate() -> None:
    line = bar_line("w1", fetch(25_000_000, 100_000_000), seconds=2.0)
    assert line.startswith("w1         [######------------------]  25%")
    assert "25.0/100.0 MB  12.5 MB/s  receiving weights" in line


def test_on_a_terminal_each_device_has_a_bar_redrawn_in_place_and_a_done_line() -> None:
    screen = Terminal()
    board = LoadBoard(screen)
    board.update("w1", fetch(10, 100))
    board.update("w2", fetch(50, 100))
    board.update("w1", fetch(100, 100))
    board.update("w1", LoadUpdate("layers [2, 4) loaded in 1.0 s; 100 bytes received", done=True))
    board.close()
    output = screen.getvalue()
    assert output.count("\x1b[2F") >= 1  # moved back over both bars to redraw them
    assert "w1: layers [2, 4) loaded in 1.0 s; 100 bytes received\n" in output
    assert output.endswith("\x1b[1F\x1b[J")  # w2's bar cleared at the end


def test_elsewhere_only_the_done_lines_are_written() -> None:
    log = io.StringIO()
    board = LoadBoard(log)
    board.update("w1", fetch(10, 100))
    board.update("w1", LoadUpdate("layers [2, 4) loaded in 1.0 s", done=True))
    board.close()
    assert log.getvalue() == "w1: layers [2, 4) loaded in 1.0 s\n"
