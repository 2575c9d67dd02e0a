"""One progress display for every long stage. On a terminal: a tqdm bar. When stderr is not a terminal (a Slurm
log, a pipe, a file): a plain line every `every_s` seconds and, for a stage that printed one, a last line at the
end, so a log shows how far a job got without carriage-return noise (a short stage prints nothing).
`enabled=False` (other ranks, quiet callers) shows nothing."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

from tqdm import tqdm

EVERY_S = 30.0  # seconds between two progress lines in a log


class ProgressLines:
    """The subset of tqdm the stages use (iteration, update, set_postfix, close, with), written as lines."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", initial=0, every_s=EVERY_S, out=None):
        self.iterable, self.desc, self.unit, self.every_s = iterable, desc, unit, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start = initial
        self.postfix, self.out = "", out or sys.stdout
        self.t0 = self.last = time.monotonic()
        self.closed, self.lines = False, 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **kw):
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, n: int = 1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def close(self):
        if not self.closed:
            self.closed = True
            if self.lines:
                self._line(time.monotonic())

    def _line(self, now: float):
        self.lines += 1
        done = self.n - self.start
        rate = done / max(now - self.t0, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = ""
        if self.total and rate > 0 and self.n < self.total:
            left = f", ~{(self.total - self.n) / rate:.0f} s left"
        extra = f", {self.postfix}" if self.postfix else ""
        took = f"in {now - self.t0:.0f} s, {rate:.3g} {self.unit}/s"
        print(f"{self.desc}: {self.n}{of} {self.unit}{pct} {took}{left}{extra}", file=self.out, flush=True)


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    initial: int = 0,
    **bar_kw,
):
    """A tqdm bar on a terminal, ProgressLines in a log, nothing when not enabled."""
    if not enabled:
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, **bar_kw)
    return ProgressLines(iterable, total, desc, unit, initial)
