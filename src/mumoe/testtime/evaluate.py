"""Test-time evaluation protocol: every window of L tokens is split into a prompt (first P tokens: dense
prefill, statistics, KV cache) and a continuation fed through the pruned model with the prompt's cache.
Perplexity counts only the tokens predicted by the pruned model (positions P+1 … L−1), the same tokens for
every method: dense, offline masks (e.g. Wanda calibrated on some text), and μ-MoE (masks from each prompt).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import MumoeError
from ..observe.collectors import input_norms
from ..select.weights import check_active, masks_from_norms
from ..progress import bar
from ..compat import cache_kwarg
from .prompt import PromptPruner


@torch.no_grad()
def continuation_perplexity(model: nn.Module, wins: torch.Tensor, prompt_len: int, active: float = 1.0,
                            structure: str = "row", masks: dict[str, torch.Tensor] | None = None,
                            per_prompt: bool = True, progress: bool = False, int8: bool = False) -> dict:
    """wins [N, L]. per_prompt=True: μ-MoE masks from each window's prompt; else `masks` (None = dense).
    int8 (column structure): the continuation is scored with the compacted matrices gathered from int8 copies of
    the weights, as `mumoe generate --int8` decodes."""
    check_active(active)
    N, L = wins.shape
    if not 1 <= prompt_len <= L - 2:
        raise MumoeError(f"prompt length {prompt_len} must leave at least 2 continuation tokens of {L}")
    nll, count = 0.0, 0
    pruner = PromptPruner(model, active, structure, compacted=per_prompt or masks is not None, int8=int8)
    dev = next(model.parameters()).device
    for w in bar(wins, desc="test-time windows", enabled=progress, unit="win"):
        w = w[None].to(dev)
        norms, cache = pruner.prefill(w[:, :prompt_len])
        with pruner.applied(pruner.select(norms) if per_prompt else masks):
            logits = model(w[:, prompt_len:], **{cache_kwarg(): cache}, use_cache=True).logits  # [1, L-P, V]
        logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
        target = w[0, prompt_len + 1:]
        nll -= float(logp.gather(-1, target[:, None]).sum())
        count += target.numel()
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": N, "prompt_len": prompt_len,
            "active": active, "structure": structure}


def offline_masks(model: nn.Module, calib: torch.Tensor, active: float, structure: str = "row",
                  batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Wanda masks calibrated once on windows [N, L] (the offline baseline)."""
    return masks_from_norms(model, input_norms(model, calib, batch_size=batch_size), active, structure)


@torch.no_grad()
def expert_continuation_perplexity(model: nn.Module, wins: torch.Tensor, prompt_len: int, choose,
                                   progress: bool = False, desc: str = "test-time windows") -> dict:
    """The test-time protocol at the expert grain: per window [L], the prompt (first P tokens) is prefilled
    densely with its router logits captured; `choose(router_logits, prompt_ids)` returns the experts kept for
    this window's continuation ({layer: kept} or None = every expert), which is then scored with only those
    experts and the prompt's dense KV cache. wins [N, L] -> {"ppl", "tokens", "windows", "prompt_len"}."""
    from ..compat import output_cache
    from .experts import capture_router_logits, experts_kept

    N, L = wins.shape
    if not 1 <= prompt_len <= L - 2:
        raise MumoeError(f"prompt length {prompt_len} must leave at least 2 continuation tokens of {L}")
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    kw = cache_kwarg()
    for w in bar(wins, desc=desc, enabled=progress, unit="win"):
        w = w[None].to(dev)
        with capture_router_logits(model) as router:
            cache = output_cache(model(input_ids=w[:, :prompt_len], use_cache=True))
        with experts_kept(model, choose(router, w[:, :prompt_len])):
            logits = model(w[:, prompt_len:], **{kw: cache}, use_cache=True).logits  # [1, L-P, V]
        logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
        target = w[0, prompt_len + 1:]
        nll -= float(logp.gather(-1, target[:, None]).sum())
        count += target.numel()
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": N, "prompt_len": prompt_len}


def offline_expert_keeps(model: nn.Module, methods: list[str], wins: torch.Tensor, groups, keep: int,
                         progress: bool = True) -> dict[str, dict[int, list[int]]]:
    """The offline baselines of the expert-grain test-time protocol: each method scored once on calibration
    windows [N, L] (one pass for all), its `keep` best experts per MoE layer -> {method: {layer: kept}}."""
    from ..criteria import get_method, score_methods
    from ..models import moe_adapter_for
    from ..select import rank

    scores = score_methods(model, methods, wins, groups, progress=progress)
    layers = moe_adapter_for(model).moe_layers()
    return {m: {layer.index: sorted(rank(s, get_method(m).prune_highest)[:keep].tolist())
                for layer, s in zip(layers, scores[m])} for m in methods}


def taer_chooser(lib):
    """`choose` for TAER inside the protocol: the prompt's key from its captured router logits (the library's
    key statistic and layers), the nearest task, that task's kept experts."""
    from ..retrieval.library import key_from_logits

    layers = sorted(lib.fingerprint["moe_layers"])
    wanted = layers[:1] if lib.key_mode == "first" else layers

    def choose(router: dict, ids: torch.Tensor) -> dict[int, list[int]]:
        task = lib.nearest(key_from_logits([router[i] for i in wanted], lib.key_stat)).task
        choose.matched.append(task)
        return lib.tasks[task]["kept"]

    choose.matched = []
    return choose
