"""Progress of a long command where it runs (torch-free, standard library only; tqdm imported on a TTY only).

On a terminal: a tqdm bar with its total and ETA. Anywhere else (a SLURM log, ``2> log``): one plain line
every N seconds on stderr, what a log file can hold::

    build en: 12.6/52.4 MB (24.1%), 6.2 MB/s, elapsed 0:00:02, ETA 0:00:06

and a last line at the end when the work took at least N seconds. N comes from ``--progress-every SECONDS``
(every long command has it: ``python -m data_tools build|tokenize``, ``launchers/eval.py``,
``launchers/sweep.py``), else from the environment variable ``MEGASLM_PROGRESS_EVERY``, else 30; 0 turns
progress off, bar and lines alike. The option sets the variable, so what a command starts (the sweep's data
builds and evaluations) reports at the same pace.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO

ENV = "MEGASLM_PROGRESS_EVERY"
DEFAULT_EVERY = 30.0


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0:      # negative or nan
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (0: no progress), got {text!r}")
    return v


def every_seconds() -> float:
    """Seconds between two progress lines: ``MEGASLM_PROGRESS_EVERY``, else 30 (a bad value: 30)."""
    try:
        return _seconds(os.environ.get(ENV, ""))
    except argparse.ArgumentTypeError:
        return DEFAULT_EVERY


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress-every", type=_seconds, default=None, metavar="SECONDS",
                        help=f"a progress line every SECONDS on stderr when it is not a terminal (a bar with "
                             f"ETA on one); 0: no progress (default: ${ENV}, else {DEFAULT_EVERY:g})")


def apply_progress_option(seconds: Optional[float]) -> None:
    """``--progress-every``'s value, for this process and the commands it starts."""
    if seconds is not None:
        os.environ[ENV] = repr(seconds)


def clock_text(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """``with Progress("build en", total=n, unit="B") as p: ... p.update(k)``.

    ``unit``: "B" (amounts shown in MB), or a noun ("records", "runs", "h"). ``enabled=False`` (e.g. on a rank
    other than the writing one) shows nothing. ``file``, ``every`` and ``clock`` are for tests; ``bar``: extra
    tqdm arguments."""

    def __init__(self, what: str, total: Optional[float] = None, unit: str = "", enabled: bool = True,
                 file: Optional[TextIO] = None, every: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, **bar):
        self.what, self.total, self.unit = what, total, unit
        self.file = file if file is not None else sys.stderr
        self.every = every_seconds() if every is None else every
        self.clock, self.n, self.lines = clock, 0, 0
        self.start = self.last = clock()
        self.on = enabled and self.every > 0
        self.bar, self.lock = None, threading.Lock()
        if self.on and _isatty(self.file):
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=what, unit=unit or "it", file=self.file, dynamic_ncols=True,
                            **({"unit_scale": True, "unit_divisor": 1000} if unit == "B" else {}), **bar)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close(ok=exc[0] is None)
        return False

    def update(self, n: float = 1) -> None:
        if not self.on:
            return
        with self.lock:      # the sweep's runs end in threads
            self.n += n
            if self.bar is not None:
                self.bar.update(n)
                return
            now = self.clock()
            if now - self.last >= self.every and not (self.total and self.n >= self.total):  # the end: close's line
                self.last = now
                self._line(now)

    def iterate(self, items: Iterable, size: Optional[Callable[[Any], float]] = None) -> Iterator:
        """Each of ``items``, counted (as 1, or ``size(item)``) once the loop's body is done with it; closed at
        the end (without its last line when the loop stopped early)."""
        ok = False
        try:
            for item in items:
                yield item
                self.update(1 if size is None else size(item))
            ok = True
        finally:
            self.close(ok)

    def close(self, ok: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.on and ok and self.clock() - self.start >= self.every:
            self._line(self.clock(), done=True)
        self.on = False

    def line(self, now: Optional[float] = None, done: bool = False) -> str:
        """The plain progress line at ``now`` (``done``: the last one, without an ETA)."""
        now = self.clock() if now is None else now
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        text = f"{self.what}: {self._amount(self.n)}"
        if self.total:
            text += f"/{self._amount(self.total)} {self._noun()} ({100.0 * self.n / self.total:.1f}%)"
        else:
            text += f" {self._noun()}"
        speed = f"{rate / 1e6:,.1f}" if self.unit == "B" else f"{rate:,.3g}" if rate < 1000 else f"{rate:,.0f}"
        text += f", {speed} {self._noun()}/s, elapsed {clock_text(elapsed)}"
        if done:
            text += ", done"
        elif self.total:
            text += ", ETA " + (clock_text((self.total - self.n) / rate) if rate > 0 else "?")
        return text

    def _line(self, now: float, done: bool = False) -> None:
        self.lines += 1
        print(self.line(now, done), file=self.file, flush=True)

    def _noun(self) -> str:
        return "MB" if self.unit == "B" else self.unit

    def _amount(self, x: float) -> str:
        if self.unit == "B":
            return f"{x / 1e6:,.1f}"
        if not isinstance(self.total, float) and isinstance(self.n, int):     # a count
            return f"{int(x):,}"
        return f"{x:,.3f}" if x < 100 else f"{x:,.1f}"


def _isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):    # no isatty, or a closed file
        return False
