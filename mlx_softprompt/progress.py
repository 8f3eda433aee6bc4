"""A small progress bar (rate, ETA, live figures) on stderr, with no dependency.

On a terminal it redraws one line; otherwise (CI, pipes) it prints a line at
most every 10 seconds and a final one, so logs stay readable.
"""

import sys
import time
from typing import Iterable, Optional


def _fmt_time(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Bar:
    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it",
                 stream=None, disable: bool = False, width: int = 24):
        self.total, self.desc, self.unit, self.width = total, desc, unit, width
        self.stream = stream or sys.stderr
        self.disable = disable
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.n = 0
        self.postfix = {}
        self.start = self.last_print = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        self.postfix.update(postfix)
        now = time.perf_counter()
        if self.tty and now - self.last_print >= 0.1:
            self._draw(end="\r")
        elif not self.tty and now - self.last_print >= 10.0:
            self._draw(end="\n")

    def set(self, **postfix) -> None:
        self.postfix.update(postfix)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        fig = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items())
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            body = f"|{bar}| {self.n}/{self.total} [{_fmt_time(elapsed)}<{_fmt_time(eta)}, {rate:.3g} {self.unit}/s]"
        else:
            body = f"{self.n} {self.unit} [{_fmt_time(elapsed)}, {rate:.3g} {self.unit}/s]"
        return f"{self.desc + ': ' if self.desc else ''}{body}{' ' + fig if fig else ''}"

    def _draw(self, end: str) -> None:
        if self.disable:
            return
        self.last_print = time.perf_counter()
        self.stream.write(("\x1b[2K" if self.tty else "") + self.line() + end)
        self.stream.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._draw(end="\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "", unit: str = "it", **kw):
    """Wrap an iterable with a Bar."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    bar = Bar(total=total, desc=desc, unit=unit, **kw)
    try:
        for x in iterable:
            yield x
            bar.update(1)
    finally:
        bar.close()
