"""Progress bars on a terminal only: when stderr is a log file or a pipe, bars would write hundreds of
carriage-return lines into it, so they are off (the CLI still prints one line per stage)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


QUIET = [False]  # the CLI's --quiet: no bars at all


def show_progress() -> bool:
    """Bars are drawn when stderr is a terminal; MUMOE_PROGRESS=1/0 forces them on/off; never under --quiet."""
    if QUIET[0]:
        return False
    forced = os.environ.get("MUMOE_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def bar(iterable=None, *, enabled: bool = True, **kw) -> tqdm:
    """tqdm(iterable, **kw), disabled unless `enabled` and `show_progress()`."""
    return tqdm(iterable, disable=not (enabled and show_progress()), **kw)


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
