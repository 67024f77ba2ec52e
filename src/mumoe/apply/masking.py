"""Masking in place, undone exactly: zero the masked weights, keep the originals, put them back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..settings import TensorCache

_SWAPPED = TensorCache()  # parameters holding a masked copy (`swap_masked`)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero the masked weights in place; returns the original tensors so that `restore` can undo it."""
    params = dict(model.named_parameters())
    saved = {}
    for name, mask in masks.items():
        saved[name] = params[name].detach().clone()
        params[name].mul_(mask.to(params[name].dtype))
    return saved


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in saved.items():
        params[name].copy_(value)


@contextmanager
def masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """with masked(model, masks): ... — the masked weights are zero inside, restored on exit (also on error)."""
    saved = apply_masks(model, masks)
    try:
        yield saved
    finally:
        restore(model, saved)


@torch.no_grad()
def swap_masked(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each masked parameter's storage replaced by a masked copy (one pass; the original tensor is not written);
    returns the originals for `unswap`. params: name -> parameter. Until then `is_swapped` says so (the parameter's
    version does not change: what is kept for its values — int4 copies — must not be read meanwhile)."""
    saved = {}
    for name, mask in masks.items():
        p = params[name]
        saved[name] = p.data
        p.data = p.data * mask
        _SWAPPED.set(p, True)
    return saved


def is_swapped(p: torch.Tensor) -> bool:
    """Whether `p` holds a masked copy that `swap_masked` put in (until `unswap`)."""
    return bool(_SWAPPED) and _SWAPPED.get(p) is not None


def unswap(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Put back the storages `swap_masked` replaced."""
    for name, data in saved.items():
        params[name].data = data
        _SWAPPED.pop(params[name])
