"""μ-MoE building blocks: per-input-feature activation norms of every prunable linear, and Wanda masks.

Every weight is a micro-expert and its Wanda score S_ij = |W_ij|·‖X_j‖₂ is its router; the active-weight
ratio ρ = 1 − sparsity is its top-k. The same statistics serve offline Wanda (calibration windows) and μ-MoE
(the prompt's own dense prefill).

Prunable linears: every nn.Linear of the decoder layers (attention projections, dense MLPs, shared experts)
and the fused routed experts, per expert, from that expert's routed tokens only (an expert the text never
routes to falls back to the layer's input over all tokens). Embeddings and lm_head are never pruned.
Masks are keyed by parameter name; fused experts get one mask per fused tensor ([E, 2I, H] and [E, H, I]).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import MumoeError
from ..observe.collectors import InputNorms, prunable_linears
from ..observe.runner import Observation, run


def prunable_names(model: nn.Module) -> list[str]:
    """Parameter names of every prunable weight: dense `*.weight` and fused `*.experts.{gate_up,down}_proj`."""
    dense, layers = prunable_linears(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{d.name}.weight" for d in dense] + [f"{names[id(l.experts)]}.{k}" for l in layers
                                                  for k in ("gate_up_proj", "down_proj")]


def check_active(active: float) -> float:
    if not (0.0 < active <= 1.0):
        raise MumoeError(f"active ratio ρ must be in (0, 1], got {active}")
    return float(active)


@torch.no_grad()
def input_norms(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                batch_size: int = 8, return_cache: bool = False, timing: dict | None = None):
    """‖X_j‖₂ per input feature of every prunable weight, from dense forwards of `ids` [B, L] (in batches;
    with return_cache, one forward whose KV cache is returned too: -> (norms, cache)). `timing`: a dict that
    receives "hooks_s", the seconds spent computing the statistics inside the forward.

    -> {param name: [d_in]} for dense linears; {"...experts.gate_up_proj": [E, H], "...experts.down_proj": [E, I]}
    for fused experts (per expert, over its routed tokens; unrouted experts use all tokens)."""
    col = InputNorms(model)
    cache = None
    try:
        if return_cache:  # one prompt: keep its KV cache for decoding
            with Observation(model, [col]) as obs:
                obs.attention_mask = attention_mask
                cache = model(input_ids=ids, attention_mask=attention_mask, use_cache=True).past_key_values
        else:  # calibration windows [N, L]: sums over every batch
            run(model, ids, [col], batch_size=batch_size, attention_mask=attention_mask)
    finally:
        if timing is not None:
            timing["hooks_s"] = col.seconds
    norms = col.result()
    return (norms, cache) if return_cache else norms


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W[:, j]‖₂ per input column ([..., d_in], float64), cached per weight tensor until it is modified:
    they do not depend on the prompt, so μ-MoE computes them once per model, not per prompt."""
    hit = getattr(weight, "_mumoe_column_norms", None)
    if hit is not None and hit[0] == weight._version:
        return hit[1]
    col = weight.detach().float().pow(2).sum(-2).double().sqrt()
    weight._mumoe_column_norms = (weight._version, col)
    return col


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, active: float, structure: str = "row") -> torch.Tensor:
    """Keep-mask of one weight [d_out, d_in] (or a stack [E, d_out, d_in] with norms [E, d_in]).

    row     per output row, remove exactly floor((1 − ρ)·d_in) lowest |W|·‖X‖ (Wanda, unstructured)
    N:M     in every block of M consecutive input columns keep the N highest per row (ρ = N/M)
    column  keep the top ⌈ρ·d_in⌉ input columns by ‖X_j‖·‖W[:, j]‖ (same columns for every row)
    """
    check_active(active)
    d_in = weight.shape[-1]
    if structure == "column":  # only ‖W[:, j]‖ (static, cached per weight) and the prompt's ‖X_j‖ are needed
        keep = math.ceil(active * d_in - 1e-9)
        col = column_norms(weight) * norms.double()  # [..., d_in]
        top = torch.argsort(-col, dim=-1, stable=True)[..., :keep]
        cols = torch.zeros_like(col, dtype=torch.bool).scatter(-1, top, True)
        return cols.unsqueeze(-2).expand(weight.shape)
    w = weight.detach().abs().double()
    score = w * norms.double().unsqueeze(-2)  # [..., d_out, d_in]
    if structure == "row":
        drop = math.floor((1 - active) * d_in + 1e-9)
        if drop == 0:
            return torch.ones_like(w, dtype=torch.bool)
        lowest = torch.topk(score, drop, dim=-1, largest=False, sorted=False).indices  # ties: unspecified order
        return torch.ones_like(w, dtype=torch.bool).scatter(-1, lowest, False)
    if ":" in structure:
        n, m = (int(v) for v in structure.split(":"))
        if not (0 < n <= m) or d_in % m:
            raise MumoeError(f"N:M structure {structure} needs 0 < N <= M and M dividing d_in={d_in}")
        blocks = score.reshape(*score.shape[:-1], d_in // m, m)
        top = torch.argsort(-blocks, dim=-1, stable=True)[..., :n]
        return torch.zeros_like(blocks, dtype=torch.bool).scatter(-1, top, True).reshape(w.shape)
    raise MumoeError(f"unknown structure {structure!r}; use row, column or N:M (e.g. 2:4)")


def masks_from_norms(model: nn.Module, norms: dict[str, torch.Tensor], active: float, structure: str = "row"
                     ) -> dict[str, torch.Tensor]:
    """Wanda masks for every weight named in `norms`. Fused gate_up [E, 2I, H] uses the expert-input norms
    [E, H]; fused down [E, H, I] the intermediate norms [E, I]."""
    params = dict(model.named_parameters())
    return {name: wanda_mask(params[name], n, active, structure) for name, n in norms.items()}


def prompt_masks(model: nn.Module, prompt_ids: torch.Tensor, active: float, structure: str = "row"
                 ) -> dict[str, torch.Tensor]:
    """μ-MoE: masks at active ratio ρ from the prompt's own dense prefill. prompt_ids [L] or [1, L]."""
    check_active(active)
    ids = prompt_ids.reshape(1, -1)
    if ids.numel() == 0:
        raise MumoeError("empty prompt")
    return masks_from_norms(model, input_norms(model, ids), active, structure)


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


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Magnitude baseline: one threshold per matrix (per expert for fused [E, d_out, d_in]); drops exactly
    floor(sparsity · numel) lowest |W| of each matrix (ties: lower flat index first)."""
    w = weight.detach().abs().double()
    flat = w.reshape(-1, w.shape[-2] * w.shape[-1]) if w.dim() == 3 else w.reshape(1, -1)
    drop = math.floor(sparsity * flat.shape[-1] + 1e-9)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        mask.scatter_(-1, torch.argsort(flat, dim=-1, stable=True)[:, :drop], False)
    return mask.reshape(w.shape)
