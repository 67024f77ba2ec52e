"""Swapping a module's forward for an instance function, and putting the class's own back: the one way the
runner (observing experts), the layer-sequential sweep (recording each layer's inputs) and compaction (decoding
with compacted experts) replace a forward."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import nn


def set_forward(module: nn.Module, forward: Callable) -> Callable | None:
    """Install `forward` on this instance; -> what the instance had before (None: the class's own)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    return previous


def restore_forward(module: nn.Module, previous: Callable | None) -> None:
    """Undo `set_forward`: the instance forward it returned, or the class's own when that was None."""
    if previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


@contextmanager
def forwards_swapped(swaps: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Every (module, forward) installed for the block, every original back after it (also on an error)."""
    done: list[tuple[nn.Module, Callable | None]] = []
    try:
        for module, forward in swaps:
            done.append((module, set_forward(module, forward)))
        yield
    finally:
        for module, previous in reversed(done):
            restore_forward(module, previous)
