"""μ-MoE per prompt: every weight is a micro-expert and its Wanda score S_ij = |W_ij|·‖X_j‖₂ is its router; the
active-weight ratio ρ = 1 − sparsity is its top-k. The statistics come from the prompt's own dense prefill
(`observe.collectors.InputNorms`), the keep rules from `select.weights`, masking/compaction from `apply`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..apply.compact import Compaction, compact, prepare_columns, uncompact
from ..apply.int8 import int8_copy
from ..apply.masking import swap_masked, unswap
from ..errors import MumoeError
from ..observe.collectors import DeferredNorms, input_norms
from ..recipe import parse_structure
from ..select.weights import LazyColumns, check_active, keep_columns, kept_count, masks_from_norms
from .kvcache import refeed_cache


def prompt_masks(model: nn.Module, prompt_ids: torch.Tensor, active: float, structure: str = "row"
                 ) -> dict[str, torch.Tensor]:
    """μ-MoE: masks at active ratio ρ from the prompt's own dense prefill. prompt_ids [L] or [1, L]."""
    check_active(active)
    ids = prompt_ids.reshape(1, -1)
    if ids.numel() == 0:
        raise MumoeError("empty prompt")
    return masks_from_norms(model, input_norms(model, ids), active, structure)


class PromptPruner:
    """μ-MoE on one model, planned once: the ratio and structure (validated), the prunable parameters and —
    column structure, compacted — the column-major storage of every prunable weight (`prepare_columns`).
    Then per prompt: `prefill` (dense, with the statistics hooks; returns the KV cache), `select` (the masks),
    `applied` (masked or compacted for the decode, undone on exit, also on error)."""

    def __init__(self, model: nn.Module, active: float, structure: str = "row", compacted: bool = True,
                 int8: bool = False) -> None:
        """int8: the column structure decodes with matrices gathered from int8 copies of the weights (`apply.int8`;
        made here, once per model; the weights themselves and the prefill are unchanged)."""
        self.model = model
        self.active = check_active(active)
        parse_structure(structure)
        self.structure = structure
        self.compacted = structure == "column" and compacted
        if int8 and not self.compacted:
            raise MumoeError("int8 decoding needs the column structure, compacted (--structure column)")
        self.int8 = int8
        self.params = dict(model.named_parameters())
        # fused gate_up tensors of experts without a gate (Nemotron-H): half of them is a zero gate, not weights
        self.zero_halves = {f"{n}.gate_up_proj" for n, m in model.named_modules() if getattr(m, "gated", True) is False}
        if int8:
            from ..models.prunable import prunable_names

            for name in prunable_names(model):  # once per model: the int8 copies the compactions gather from
                int8_copy(self.params[name])
        elif self.compacted:
            prepare_columns(model)  # once per model: column gathers become row copies

    def prefill(self, ids: torch.Tensor, timing: dict | None = None):
        """Dense prefill of ids [1, L] with the statistics hooks. -> (norms, KV cache). Compacted: the down_proj
        statistics of the experts no prompt token routes to are deferred (`DeferredNorms`) — computed, and the
        expert compacted, only if the decode routes a token to it."""
        return input_norms(self.model, ids, return_cache=True, timing=timing, defer_unrouted=self.compacted,
                           cache_in=refeed_cache(self.model))  # (its last position is fed again, pruned)

    def select(self, norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The prompt's pruning of every weight named in `norms`: compacted column structure -> the kept input
        columns (LongTensor [..., k] ascending, `keep_columns`: no mask is built); otherwise keep masks of each weight's
        shape."""
        if self.compacted:  # ascending, as a mask's; deferred expert norms: `LazyColumns`, rows on first use
            return {name: LazyColumns(self.params[name], n, self.active) if isinstance(n, DeferredNorms)
                    else keep_columns(self.params[name], n, self.active) for name, n in norms.items()}
        return masks_from_norms(self.model, norms, self.active, self.structure, params=self.params)

    def counts(self, selection: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(kept, prunable) weights of a `select` result, from the rule (`kept_count`), not by counting masks."""
        kept = total = 0
        for name in selection:
            shape, share = self.params[name].shape, 2 if name in self.zero_halves else 1  # rows kept alike
            kept += kept_count(shape, self.active, self.structure) // share
            total += math.prod(shape) // share
        return kept, total

    @contextmanager
    def applied(self, masks: dict[str, torch.Tensor] | None) -> Iterator[Compaction | dict | None]:
        """The model masked (or compacted) by `masks` (or kept columns) inside the block; None = dense. Masking
        swaps in masked copies of the weights and puts the originals back untouched (no copy-back, and the
        weights' cached column norms stay valid)."""
        if masks is None:
            yield None
            return
        undo = compact(self.model, masks, int8=self.int8) if self.compacted else swap_masked(self.params, masks)
        try:
            yield undo
        finally:
            uncompact(undo) if self.compacted else unswap(self.params, undo)
