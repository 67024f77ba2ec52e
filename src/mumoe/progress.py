"""Progress: a tqdm bar on a terminal; in a log file or a pipe, where a bar would write hundreds of
carriage-return lines, a plain line every `LINE_EVERY` seconds instead (none for a stage shorter than that), so a
job's log never goes quiet for minutes. `--quiet` turns both off."""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm

from .settings import SETTINGS




def show_progress() -> bool:
    """Bars are drawn when stderr is a terminal; MUMOE_PROGRESS=1/0 forces them on/off; never under --quiet."""
    if SETTINGS.quiet:
        return False
    forced = os.environ.get("MUMOE_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get("MUMOE_PROGRESS_EVERY", "10")))
    except ValueError:
        return 10.0


LINE_EVERY = _every()  # seconds between progress lines when stderr is not a terminal (MUMOE_PROGRESS_EVERY)


def bar(iterable=None, *, enabled: bool = True, **kw):
    """tqdm(iterable, **kw) on a terminal; elsewhere a `LineProgress` (a line every ~10 s); a silent tqdm when
    not `enabled`, under --quiet or with MUMOE_PROGRESS=0."""
    if enabled and show_progress():
        return tqdm(iterable, **kw)
    if enabled and not SETTINGS.quiet and os.environ.get("MUMOE_PROGRESS") != "0":
        return LineProgress(iterable, desc=kw.get("desc"), total=kw.get("total"), unit=kw.get("unit", "it"))
    return tqdm(iterable, disable=True, **kw)


class LineProgress:
    """The non-terminal form of a bar: iterate over it or call `update(n)`; a line on stderr —
    "  DESC: N/TOTAL UNITs, 0:42 elapsed, ~1:10 left" — at most every `every` seconds, the first after
    `every` seconds (a short stage prints nothing)."""

    def __init__(self, iterable=None, desc: str | None = None, total: int | None = None, unit: str = "it",
                 every: float | None = None, file=None) -> None:
        self.iterable, self.desc, self.unit = iterable, desc or "working", unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n = total, 0
        self.every = LINE_EVERY if every is None else every
        self.file = file
        self.start = self.last = time.monotonic()

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.write(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.start
        plural = self.unit + ("es" if self.unit.endswith(("ch", "sh", "s", "x")) else "s")  # batches, tokens
        text = f"  {self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {plural}, "
        text += f"{_clock(elapsed)} elapsed"
        if self.total and self.n:
            text += f", ~{_clock(elapsed * (self.total - self.n) / self.n)} left"
        return text

    def write(self, text: str) -> None:
        f = self.file or sys.stderr
        try:
            f.write(text + "\n")
            f.flush()
        except (OSError, ValueError):
            pass

    def set_postfix(self, *a, **k) -> None:
        pass

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class hf_bars:
    """Within the block, transformers' own bars ("Loading weights", "Writing model shards") follow
    `show_progress()`; the previous setting is restored after."""

    def __enter__(self) -> "hf_bars":
        from transformers.utils import logging as hf_logging

        self.was = hf_logging.is_progress_bar_enabled()
        if self.was and not show_progress():
            hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc) -> None:
        from transformers.utils import logging as hf_logging

        if self.was:
            hf_logging.enable_progress_bar()
