"""The per-prompt protocol that `mumoe generate` and the server's engine share: each prompt [1, L] is prefilled,
its pruning chosen from that prefill, and decoding runs on what it chose.

    dense      the model as it is
    mu-moe     μ-MoE: Wanda masks at active ratio ρ from the prompt's own dense prefill (`PromptPruner`)
    experts    the K experts per layer the prompt's prefill routes to most (prompt TCESS)
    task       PreMoe TAER: the prompt matched to a task of a library ("auto") or a named task, decoded by that
               task's model (loaded with only its experts; `retrieval.partial.TaskModels`)

`prefill(x)` returns a `Prefilled`: the model that decodes, the prompt's KV cache, the prefill's logits (None
when the last prompt token must be fed again through the pruned weights: the statistics came from the dense
prefill), the pruning as a context manager, and what was chosen. `ready_to_decode` crops the cache for that
feed. The caller decodes (HF's `generate`, or the server's own loop) inside `with prefilled.applied() as undo`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compat import cache_kwarg, last_logits, output_cache
from ..models import stored_weights
from .experts import capture_router_logits, experts_kept, prompt_keep
from .kvcache import check_refeed, grow_in_place, refeed_cache, stop_recording
from .prompt import PromptPruner


@dataclass
class Prefilled:
    """One prompt after its prefill, with its pruning chosen."""

    model: nn.Module  # what decodes: the model, or a task's model
    cache: object  # the prompt's KV cache
    logits: torch.Tensor | None  # [1, L', V] of the prefill (L' = 1 where the model computes the last position
    # only); None: the last prompt token is fed again (refeed)
    pruning: Callable[[], object]  # () -> a context manager applying the pruning for the decode (undone on exit)
    info: dict = field(default_factory=dict)  # kind, and what was chosen (active ratio, experts, task, ...)
    overhead_s: float = 0.0  # statistics + selection (+ matching and loading for a task); after the decode, +
    # the apply and what was done lazily inside the decode (μ-MoE's experts compacted on first use)
    on_applied: Callable[[object, dict], None] | None = None  # (undo, stats): what is known once applied
    stats: dict = field(default_factory=dict)  # counts (kept / removed weights) and seconds (statistics_s,
    # select_s, apply_s, lazy_s, undo_s) for the caller, not reported to clients

    @property
    def refeed(self) -> bool:
        return self.logits is None

    @contextmanager
    def applied(self) -> Iterator[object]:
        """The pruning applied for the decode (timed into overhead_s, with what the decode did lazily: `lazy_s`);
        undone on exit, also on error."""
        t0 = time.perf_counter()
        with self.pruning() as undo:
            self.stats["apply_s"] = time.perf_counter() - t0
            self.overhead_s += self.stats["apply_s"]
            if self.on_applied is not None:
                self.on_applied(undo, self.stats)
            try:
                yield undo
            finally:
                if hasattr(undo, "lazy_s"):  # a compaction: its experts compacted on first use
                    self.stats.update(lazy_s=undo.lazy_s, experts_compacted=undo.experts_made)
                    self.overhead_s += undo.lazy_s
                t1 = time.perf_counter()
        self.stats["undo_s"] = time.perf_counter() - t1


def ready_to_decode(prefilled: Prefilled) -> None:
    """The cache grows in place from now on (HF's appends copy the whole cache per token); for a refeed it loses
    its last position, which the pruned model computes again."""
    grow_in_place(prefilled.cache)
    if prefilled.refeed:
        prefilled.cache.crop(-1)  # (sliding-window layers: possible because the prefill recorded them, `refeed_cache`)
        stop_recording(prefilled.cache)


class PerPrompt:
    """One way of pruning each prompt for itself."""

    kind: str = "dense"

    def prefill(self, model: nn.Module, x: torch.Tensor) -> Prefilled:
        out = model(input_ids=x, use_cache=True, **last_logits(model))  # logits [1, 1, V]: the next token's
        return Prefilled(model, output_cache(out), out.logits, nullcontext, {"kind": self.kind})


Dense = PerPrompt


class MuMoE(PerPrompt):
    """μ-MoE at active ratio ρ with `structure` (row, N:M, column; column decodes compacted)."""

    kind = "mu-moe"

    def __init__(self, model: nn.Module, active: float, structure: str = "row", compacted: bool = True,
                 int8: bool = False) -> None:
        check_refeed(model, "per-prompt μ-MoE")
        self.pruner = PromptPruner(model, active, structure, compacted, int8)

    def prefill(self, model: nn.Module, x: torch.Tensor) -> Prefilled:
        timing: dict = {}
        norms, cache = self.pruner.prefill(x, timing)
        t1 = time.perf_counter()
        masks = self.pruner.select(norms)  # kept columns (column, compacted) or masks
        kept, total = self.pruner.counts(masks)
        info = {"kind": self.kind, "active": self.pruner.active, "structure": self.pruner.structure}
        if self.pruner.int8:
            info["int8"] = True
        stats = {"removed_weights": total - kept, "kept_weights": kept, "prunable_weights": total,
                 "statistics_s": timing["hooks_s"], "select_s": time.perf_counter() - t1}

        def read(undo, stats):
            if self.pruner.compacted:
                stats["read_weights"] = undo.weights

        return Prefilled(model, cache, None, lambda: self.pruner.applied(masks), info,
                         timing["hooks_s"] + stats["select_s"], read, stats)


class Experts(PerPrompt):
    """The `k` experts per MoE layer that the prompt's prefill routes to most."""

    kind = "experts"

    def __init__(self, k: int) -> None:
        self.k = k

    def prefill(self, model: nn.Module, x: torch.Tensor) -> Prefilled:
        check_refeed(model, "per-prompt experts")
        cache = refeed_cache(model)
        with capture_router_logits(model) as logits:
            out = model(input_ids=x, use_cache=True, **({} if cache is None else {cache_kwarg(): cache}),
                        **last_logits(model))  # (refed: its logits are not read)
        t1 = time.perf_counter()
        keep = prompt_keep(logits, self.k)

        def removed(undo, stats):
            stats["removed_weights"] = undo

        select_s = time.perf_counter() - t1
        return Prefilled(model, output_cache(out), None, lambda: experts_kept(model, keep),
                         {"kind": self.kind, "experts": self.k}, select_s, removed, {"select_s": select_s})


class Task(PerPrompt):
    """TAER: `task` ("auto": the prompt's nearest task in `library`, matched with `matcher`) decoded by its
    task's model from `models` (`retrieval.partial.TaskModels`)."""

    kind = "task"

    def __init__(self, library, models, task: str = "auto", matcher: nn.Module | None = None) -> None:
        self.library, self.models, self.task, self.matcher = library, models, task, matcher

    def prefill(self, model: nn.Module, x: torch.Tensor) -> Prefilled:
        from ..retrieval.library import match

        t0 = time.perf_counter()
        task, info = self.task, {"kind": self.kind}
        if task == "auto":
            m = match(self.matcher if self.matcher is not None else model, self.library, x)
            task = m.task
            info["distance"] = round(m.distance, 4)
        decoder, cached, _ = self.models.get(task)
        overhead = time.perf_counter() - t0
        out = decoder(input_ids=x, use_cache=True, **last_logits(decoder))
        info.update(task=task, matched=self.task == "auto", cached=cached,
                    active_weights=stored_weights(decoder))
        return Prefilled(decoder, output_cache(out), out.logits, nullcontext, info, overhead)
