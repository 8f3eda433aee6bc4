"""Progress bars on stderr through rich (as mlx-lm's tools show theirs).

On a terminal every open bar is one line of one live display, so bars that run at the
same time (teach's sampling and top-k phases) never overwrite each other. Off a
terminal (CI, pipes, files) a bar prints its state as one plain line at most once a
minute while it runs (so a log of a long job shows rate and ETA) and one summary line
when it closes.

Time and rate are per phase: when phases interleave (sample shard 1, top-k shard 1,
sample shard 2, ...), each update is credited only the time since the last update of
*any* bar, so a bar's elapsed time is the time spent in its own work, not the wall
time since it was created.
"""

import sys
import time
from typing import Iterable, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

_live = {"progress": None, "console": None, "open": 0}
_clock = {"last": None}  # time of the most recent update of any bar


def _real(stream):
    return getattr(stream, "rich_proxied_file", stream)


def _isatty(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def _fmt_time(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Bar:
    """total, desc, unit; update(n, **figures), set(**figures), close(); a context manager."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it",
                 stream=None, disable: bool = False, width: int = 24, every: float = 60.0):
        self.total, self.desc, self.unit, self.width = total, desc, unit, width
        self.every = every  # off a terminal: seconds between the plain lines printed while running
        stream = stream or sys.stderr
        # while a display runs, sys.stderr is rich's proxy of the real stream: draw on the real one
        self.stream = getattr(stream, "rich_proxied_file", stream)
        self.disable = disable
        self.tty = _isatty(self.stream)
        self.n = 0
        self.postfix = {}
        self.created = time.perf_counter()
        self.printed = self.created  # when the last plain line went out (off a terminal)
        self.elapsed = 0.0  # time credited to this bar's own updates
        self.closed = False
        self.task = None
        if self.tty and not disable:
            self._open()

    # ---------------------------------------------------------------- the live display

    def _open(self) -> None:
        if _live["progress"] is None or _live["console"].file is not self.stream:
            if _live["progress"] is not None:
                _live["progress"].stop()
            console = Console(file=self.stream, force_terminal=True)
            _live["console"] = console
            _live["progress"] = Progress(TextColumn("{task.description}"), BarColumn(bar_width=self.width),
                                         TextColumn("{task.fields[stats]}"), console=console,
                                         # other output goes above the bars (stdout only when it is the
                                         # terminal too: a redirected stdout stays a clean file)
                                         redirect_stdout=_isatty(sys.stdout), redirect_stderr=self.stream is _real(sys.stderr),
                                         refresh_per_second=10)
            _live["progress"].start()
            _live["open"] = 0
        _live["open"] += 1
        self.task = _live["progress"].add_task(self._desc(), total=self.total, stats=self.stats())

    def _refresh(self) -> None:
        if self.task is not None:
            _live["progress"].update(self.task, completed=self.n, description=self._desc(), stats=self.stats())

    def _desc(self) -> str:
        return f"{self.desc}:" if self.desc else ""

    # ---------------------------------------------------------------- figures

    def update(self, n: int = 1, **postfix) -> None:
        now = time.perf_counter()
        since = max(self.created, _clock["last"] or self.created)
        self.elapsed += max(now - since, 0.0)
        _clock["last"] = now
        self.n += n
        self.postfix.update(postfix)
        self._refresh()
        if self.task is None and not self.disable and self.every and now - self.printed >= self.every:
            self.printed = now
            self._print()

    def set(self, **postfix) -> None:
        self.postfix.update(postfix)
        self._refresh()

    def rate(self) -> float:
        return self.n / self.elapsed if self.elapsed > 0 else 0.0

    def stats(self) -> str:
        rate = self.rate()
        figures = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            body = f"{self.n}/{self.total} [{_fmt_time(self.elapsed)}<{_fmt_time(eta)}, {rate:.3g} {self.unit}/s]"
        else:
            body = f"{self.n} {self.unit} [{_fmt_time(self.elapsed)}, {rate:.3g} {self.unit}/s]"
        return body + (f" {figures}" if figures else "")

    def line(self) -> str:
        """The bar's state as one plain line (what is printed off a terminal)."""
        return f"{self.desc + ': ' if self.desc else ''}{self.stats()}"

    def _print(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.disable:
            return
        if self.task is not None:
            self._refresh()
            _live["open"] -= 1
            if _live["open"] <= 0:
                _live["progress"].stop()  # the last frame stays on screen, one line per bar
                _live["progress"] = _live["console"] = None
        else:
            self._print()

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
