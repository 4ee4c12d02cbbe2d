"""Progress of long work on the console: a bar on a terminal, plain periodic lines in a log.

    p = Progress(total=1200, unit="steps", desc="ioffe_mnist")        # integer work: steps
    p = Progress(total=380.0, unit=None, desc="reproduce")        # work in estimated seconds
    p.update(60); p.write("a result line"); p.eta(); p.close()

Why this shape:
- On a terminal (``stream.isatty()``) a tqdm bar redraws in place. In a log (a pipe, a file, CI)
  redraws would be thousands of lines, so the same information is written as one plain line at
  most every ``interval`` seconds (and at the end), never with carriage returns.
- The time left is measured, never extrapolated from a guess or from start-up: the clock starts at
  the first update (worker processes, imports and data loading before it would make the first
  steps look 100x slower than they are: a seconds-long smoke run showed "12.9h left"). Until the
  measurement rests on at least ``MIN_SECONDS`` (2 s) after that first update, or ``MIN_UPDATES``
  (5) more updates, the time left is unknown and shown as "estimating…". Then the rate (work per
  second) is the average since the first update, and once samples ``sample_seconds`` (10 s) apart
  exist, an exponential moving average over them (alpha 0.3), so one slow evaluation or a burst of
  worker reports does not swing it.
- Integer work (steps) is counted and shown as integers; work measured in estimated seconds (one
  bar over runs whose steps cost 100x different amounts) is shown as a percentage only.
- Nothing to do, nothing shown: ``total <= 0`` draws no bar and prints no line.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from bnlab.train.cost import format_seconds

__all__ = ["Progress"]

EMA_ALPHA = 0.3
MIN_SECONDS = 2.0  # measured time after the first update before any time left is shown ...
MIN_UPDATES = 5  # ... or this many updates after the first one
ESTIMATING = "estimating…"


class Progress:
    def __init__(self, total: float, *, desc: str = "", unit: str | None = "steps", stream: TextIO | None = None,
                 interval: float = 30.0, sample_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, tty: bool | None = None) -> None:
        self.total = float(total)
        self.desc, self.unit = desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self.sample_seconds = interval, sample_seconds
        self.clock = clock
        self.done = 0.0
        self.rate: float | None = None  # measured work per second (None: not measured enough yet)
        self.start = clock()
        self._origin: tuple[float, float] | None = None  # (time, work done) at the first update
        self._updates = 0  # updates after the first one
        self._smoothed = False  # whether rate is the moving average (else the average since the origin)
        self._sample_t, self._sample_done = self.start, 0.0
        self._last_line = self.start
        self._closed = False
        self._drawn = float("-inf")
        self._printed = -1.0  # work done at the last plain line
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self._bar: Any = None
        if self.tty and self.total > 0:
            from tqdm import tqdm

            fmt = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} " + (unit or "") + " [{elapsed}{postfix}]"
                   if self.integer else "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]")
            self._bar = tqdm(total=int(self.total) if self.integer else self.total, desc=desc, file=self.stream,
                             dynamic_ncols=True, leave=False, mininterval=0.5, bar_format=fmt)

    @property
    def integer(self) -> bool:
        return self.unit is not None

    # --- measuring ----------------------------------------------------------------------------------
    def update(self, amount: float) -> None:
        if amount <= 0 or self._closed:
            return
        self.done = min(self.total, self.done + amount)
        if self.done > self.total * (1 - 1e-9):  # float sums of per-step weights: done is done
            self.done = self.total
        now = self.clock()
        self._measure(now)
        if self._bar is not None:
            self._bar.n = int(self.done) if self.integer else self.done
            self._bar.set_postfix_str(self.left_text(), refresh=False)
            if now - self._drawn >= 0.5:  # tqdm's own rate limit only applies to bar.update()
                self._bar.refresh()
                self._drawn = now
        elif self.total > 0 and now - self._last_line >= self.interval:
            self._line()
            self._last_line = now

    def _measure(self, now: float) -> None:
        if self._origin is None:  # the first update: start the clock here, after start-up
            self._origin = (now, self.done)
            self._sample_t, self._sample_done = now, self.done
            return
        self._updates += 1
        t0, done0 = self._origin
        if now - self._sample_t >= self.sample_seconds:  # a sample: smooth over samples from now on
            inst = (self.done - self._sample_done) / (now - self._sample_t)
            self.rate = inst if not self._smoothed or self.rate is None else EMA_ALPHA * inst + (1 - EMA_ALPHA) * self.rate
            self._smoothed = True
            self._sample_t, self._sample_done = now, self.done
        elif not self._smoothed and (now - t0 >= MIN_SECONDS or self._updates >= MIN_UPDATES) and now > t0:
            self.rate = (self.done - done0) / (now - t0)  # the average since the first update

    def eta(self) -> float | None:
        """Seconds left: remaining work / measured rate; None while the rate is not measured yet
        (see the module docstring) or is zero."""
        if not self.rate or self.rate <= 0:
            return None
        return max(0.0, self.total - self.done) / self.rate

    def left_text(self) -> str:
        """"about 3m left", "estimating…" before the rate is measured, "" when done."""
        if self.done >= self.total * (1 - 1e-9):
            return ""
        eta = self.eta()
        return f"about {format_seconds(eta)} left" if eta is not None else ESTIMATING

    def elapsed(self) -> float:
        return self.clock() - self.start

    # --- writing ------------------------------------------------------------------------------------
    def status(self) -> str:
        pct = 100.0 * self.done / self.total if self.total > 0 else 100.0
        amount = f" ({int(self.done)}/{int(self.total)} {self.unit})" if self.integer else ""
        left = self.left_text()
        left = f", {left}" if left else ""
        return f"{self.desc + ': ' if self.desc else ''}{pct:3.0f}%{amount}, elapsed {format_seconds(self.elapsed())}{left}"

    def _line(self) -> None:
        self._printed = self.done
        print(self.status(), file=self.stream, flush=True)

    def write(self, line: str, file: TextIO | None = None) -> None:
        """A line of output that does not break the bar."""
        if self._bar is not None:
            self._bar.write(line, file=file or sys.stdout)
        else:
            print(line, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.total > 0 and self.done > 0 and self.done != self._printed:
            self._line()  # the final state, once
