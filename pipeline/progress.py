"""Progress of a run on the terminal: blocks and tiles done, throughput, time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Prints a line that updates in place on a terminal, or a line every few seconds."""

    def __init__(
        self,
        total_blocks: int,
        total_tiles: int,
        stream: TextIO | None = None,
        resumed_blocks: int = 0,
        resumed_tiles: int = 0,
        expected_skips: int = 0,
    ) -> None:
        """``resumed_*``: written by an interrupted run; counted as done, not in the rate.

        Skipped blocks (``tiling.skip``) count as done but not in the rate, which is of the
        pixels the model computed; ``expected_skips`` (the blocks the mask skips, cheap) are
        not in the time left.
        """
        self.total_blocks, self.total_tiles = total_blocks, total_tiles
        self.blocks, self.tiles, self.pixels = resumed_blocks, resumed_tiles, 0
        self.resumed = resumed_blocks
        self.skipped, self.expected_skips = 0, expected_skips
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.2 if self.tty else 5.0
        self.start = time.perf_counter()
        self._last = -float("inf")

    def update(self, tiles: int, pixels: int, skipped: bool = False) -> None:
        self.blocks += 1
        self.tiles += tiles
        if skipped:
            self.skipped += 1
        else:
            self.pixels += pixels
        now = time.perf_counter()
        if now - self._last >= self.interval or self.blocks == self.total_blocks:
            self._last = now
            self._emit(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.pixels / elapsed if elapsed > 0 else 0.0
        left = self.total_blocks - self.blocks - max(0, self.expected_skips - self.skipped)
        computed = self.blocks - self.resumed - self.skipped
        eta = elapsed / computed * left if computed else (0.0 if left <= 0 else float("nan"))
        skipped = f" ({self.skipped} skipped)" if self.skipped else ""
        return (
            f"blocks {self.blocks}/{self.total_blocks}{skipped} (tiles {self.tiles}/{self.total_tiles}) "
            f"{100 * self.blocks / max(1, self.total_blocks):3.0f}% | {rate / 1e6:.2f} MPx/s | "
            f"elapsed {format_seconds(elapsed)} | left {format_seconds(eta)}"
        )

    def _emit(self, now: float) -> None:
        end = "\n" if not self.tty or self.blocks == self.total_blocks else ""
        prefix = "\r\033[K" if self.tty else ""
        print(prefix + self.line(now), end=end, file=self.stream, flush=True)


def format_seconds(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing finished yet
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
