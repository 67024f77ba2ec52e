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
import time

import torch
from torch import nn

from ..errors import MumoeError
from ..models import adapter_for


def prunable_linears(model: nn.Module):
    """(dense linears [DenseLinear], MoE layers) whose weights are prunable: routers and the shared-expert
    gate are excluded, embeddings and lm_head are never among them."""
    adapter = adapter_for(model)
    layers = adapter.moe_layers()
    skip = {id(l.router) for l in layers} | {id(l.shared_gate) for l in layers}
    return [d for d in adapter.dense_linears() if id(d.module) not in skip], layers


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
    dense, moe_layers = prunable_linears(model)
    sq: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    valid = None if attention_mask is None else attention_mask.reshape(-1).bool()
    handles = []
    names = {id(m): n for n, m in model.named_modules()}

    last: list = [None, None, -1]  # (input tensor, its column sums, its version): q/k/v, gate/up share one input

    scratch: list = [None]  # x² of the largest input so far, reused: a fresh 2–12 MB temporary per call page-faults

    def col_sq(x: torch.Tensor) -> torch.Tensor:
        """Σ_t x_tj² per column of x [T, d]: fp32 within one pass (relative error ~1e-7), float64 across passes."""
        x = x.float()
        if scratch[0] is None or scratch[0].numel() < x.numel():
            scratch[0] = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
        return torch.mul(x, x, out=scratch[0][: x.numel()].view(x.shape)).sum(0).double()

    spent = [0.0]

    def timed(fn):
        def wrapper(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrapper

    def dense_hook(name):
        @timed
        def hook(module, args):
            inp = args[0]
            if last[0] is not inp or last[2] != inp._version:
                x = inp.reshape(-1, inp.shape[-1])  # [T, d_in]
                if valid is not None and x.shape[0] == valid.numel():
                    x = x[valid]
                last[0], last[1], last[2] = inp, col_sq(x), inp._version
            sq[name] = sq.get(name, 0) + last[1]
        return hook

    for lin in dense:
        handles.append(lin.module.register_forward_pre_hook(dense_hook(f"{lin.name}.weight")))

    def expert_hook(layer):
        prefix = names[id(layer.experts)]

        @timed
        def hook(module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, layer.hidden_size)  # [T, H]
            idx = (args[1] if len(args) > 1 else kwargs["top_k_index"]).reshape(x.shape[0], -1)  # [T, k]
            if valid is not None and x.shape[0] == valid.numel():
                x, idx = x[valid], idx[valid]
            E, I, H = layer.num_experts, layer.intermediate_size, layer.hidden_size
            acc = fused.setdefault(prefix, {"n": torch.zeros(E), "gu": torch.zeros(E, H, dtype=torch.float64),
                                            "dn": torch.zeros(E, I, dtype=torch.float64),
                                            "gu_all": torch.zeros(E, H, dtype=torch.float64),
                                            "dn_all": torch.zeros(E, I, dtype=torch.float64)})
            x_sq = None
            for e in range(E):
                tokens = torch.where((idx == e).any(-1))[0]
                if len(tokens):
                    xe = x[tokens]
                    acc["n"][e] += len(tokens)
                    acc["gu"][e] += col_sq(xe)
                    acc["dn"][e] += col_sq(layer.expert_hidden(e, xe))
                else:  # fallback material: the layer's input over all tokens of this pass
                    if x_sq is None:
                        x_sq = col_sq(x)  # the same for every unrouted expert
                    acc["gu_all"][e] += x_sq
                    acc["dn_all"][e] += col_sq(layer.expert_hidden(e, x))
        return hook

    for layer in moe_layers:
        handles.append(layer.experts.register_forward_hook(expert_hook(layer), with_kwargs=True))
    cache = None
    try:
        if return_cache:  # one prompt: keep its KV cache for decoding
            cache = model(input_ids=ids, attention_mask=attention_mask, use_cache=True).past_key_values
        else:  # calibration windows [N, L]: sums over every batch
            for i in range(0, ids.shape[0], batch_size):
                mask = None if attention_mask is None else attention_mask[i : i + batch_size]
                valid = None if mask is None else mask.reshape(-1).bool()
                model(input_ids=ids[i : i + batch_size], attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        last[0] = last[1] = None
        if timing is not None:
            timing["hooks_s"] = spent[0]
    for prefix, acc in fused.items():  # experts never routed over all passes use their fallback sums
        unrouted = (acc["n"] == 0)[:, None]
        sq[f"{prefix}.gate_up_proj"] = torch.where(unrouted, acc["gu_all"], acc["gu"])
        sq[f"{prefix}.down_proj"] = torch.where(unrouted, acc["dn_all"], acc["dn"])
    norms = {k: v.sqrt() for k, v in sq.items()}
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
