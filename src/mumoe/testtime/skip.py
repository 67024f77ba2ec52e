"""Per-token expert skipping, training-free (MC#'s ODP, after MC-MoE's dynamic pruning).

For a token routed to its top-k experts with router probabilities p_1 ≥ … ≥ p_k (the softmax over all experts,
before any top-k renormalisation), routed slot j ≥ 2 is skipped when p_j < β_ℓ · p_1; β_ℓ is set per MoE layer
from calibration so that a target share of all expert calls (T·k per layer) is skipped. Important tokens keep
every expert: importance = attention received × ‖x‖₁ (x the MoE input; attention received = the column mean of the
layer's attention probabilities, averaged over heads, each key's column summed over the queries that see it and
divided by their number), the top `keep_share` of each sequence's tokens protected — in a prefill (several tokens),
as MC-MoE; a one-token decode step protects none. The kept slots' combine weights are renormalised over the kept
slots where the model renormalises over the top-k (`norm_topk_prob`), else left as the router gave them.

Skipping here zeroes the skipped slots' combine weights (the output is that of not running them); the transformers
experts loop still computes them, so this measures quality and the skipped share, not speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import MumoeError
from ..models import MoELayer, moe_adapter_for


def importance(attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """attn [B, heads, L, L] causal attention probabilities, x [B, L, H] -> [B, L] attention received × ‖x‖₁."""
    L = attn.shape[-1]
    seen_by = torch.arange(L, 0, -1, device=attn.device, dtype=attn.dtype)  # queries that can attend key j: L − j
    received = attn.mean(1).sum(1) / seen_by  # [B, L]
    return received * x.abs().sum(-1)


def protected(score: torch.Tensor, share: float) -> torch.Tensor:
    """[B, L] importance -> [B, L] bool: the int(share·L) most important tokens of each sequence."""
    B, L = score.shape
    n = int(share * L)
    out = torch.zeros(B, L, dtype=torch.bool, device=score.device)
    if n > 0 and L > 1:
        out.scatter_(1, score.topk(n, dim=1).indices, True)
    return out


def slot_ratios(probs_top: torch.Tensor) -> torch.Tensor:
    """[T, k] probabilities of the chosen slots (slot 0 the highest) -> [T, k − 1] p_j / p_1 for j ≥ 2."""
    return probs_top[:, 1:] / probs_top[:, :1]


def drop_mask(probs_top: torch.Tensor, beta: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[T, k] -> [T, k] bool, True where the slot is skipped: p_j < β·p_1 for j ≥ 2, never for protected tokens."""
    drop = torch.zeros_like(probs_top, dtype=torch.bool)
    drop[:, 1:] = slot_ratios(probs_top) < beta
    if keep is not None:
        drop &= ~keep.reshape(-1, 1)
    return drop


def calibrate_beta(ratios: torch.Tensor, calls: int, share: float) -> float:
    """β such that exactly round(share·calls) of the candidate slots (`ratios`: p_j / p_1 of every unprotected
    slot j ≥ 2 in calibration) fall below it: halfway between the n-th and (n+1)-th smallest ratio."""
    n = round(share * calls)
    r = torch.sort(ratios.reshape(-1).double()).values
    if n > r.numel():
        raise MumoeError(f"--skip {share:g} asks to skip {n} of {calls} expert calls, but only {r.numel()} can be "
                         "skipped (every token runs its top expert; protected tokens run all of theirs)")
    if n == 0:
        return 0.0
    return float(r[n - 1] + (r[n] if n < r.numel() else r[n - 1] + 1)) / 2


@dataclass
class SkipCount:
    """Expert calls routed and skipped, per MoE layer, while a `skipping` block ran."""

    calls: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, int] = field(default_factory=dict)

    def share(self) -> float:
        total = sum(self.calls.values())
        return sum(self.skipped.values()) / total if total else 0.0


def _route(layer: MoELayer, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[T, k] softmax probabilities (over all experts) of the chosen slots, ordered as the router ordered them."""
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    return probs.gather(-1, indices.reshape(probs.shape[0], -1))


@contextmanager
def _hooks(model: nn.Module, keep_share: float, on_route) -> Iterator[list[MoELayer]]:
    """Attention probabilities captured per layer (eager attention inside the block when tokens are protected)
    and `on_route(layer, args, output, keep [T] or None)` on every router call; -> the MoE layers."""
    layers = moe_adapter_for(model).moe_layers()
    odd = sorted({layer.scoring for layer in layers} - {"softmax"})
    if odd:
        raise MumoeError(f"expert skipping compares softmax router probabilities; this model's routers score by "
                         f"{odd[0]} (not supported yet)")
    attn: dict[int, torch.Tensor] = {}
    handles = []
    impl = getattr(model.config, "_attn_implementation", None)
    try:
        if keep_share > 0:
            model.set_attn_implementation("eager")  # sdpa returns no attention probabilities
            for layer in layers:
                def grab(mod, args, out, j=layer.index):
                    attn[j] = out[1]
                handles.append(layer.decoder_layer.self_attn.register_forward_hook(grab))

        def router_hook(layer):
            def hook(mod, args, output):
                x = args[0]
                keep = None
                a = attn.pop(layer.index, None)
                if a is not None and a.shape[-1] > 1:
                    B, L = a.shape[0], a.shape[-1]
                    keep = protected(importance(a.float(), x.reshape(B, L, -1).float()), keep_share).reshape(-1)
                return on_route(layer, output, keep)
            return hook

        for layer in layers:
            handles.append(layer.router.register_forward_hook(router_hook(layer)))
        yield layers
    finally:
        for h in handles:
            h.remove()
        if keep_share > 0 and impl is not None:
            model.set_attn_implementation(impl)


@torch.no_grad()
def calibrate(model: nn.Module, windows: torch.Tensor, share: float, keep_share: float = 0.1,
              batch_size: int = 8) -> dict[int, float]:
    """β per MoE layer so that `share` of the expert calls over `windows` [N, L] are skipped (the model unchanged)."""
    if not 0 <= share < 1:
        raise MumoeError(f"--skip must be in [0, 1), got {share}")
    ratios: dict[int, list[torch.Tensor]] = {}
    calls: dict[int, int] = {}

    def on_route(layer, output, keep):
        logits, _, indices = output[0], output[1], output[2]
        r = slot_ratios(_route(layer, logits, indices))  # [T, k − 1]
        if keep is not None:
            r = r[~keep]
        ratios.setdefault(layer.index, []).append(r.reshape(-1).cpu())
        calls[layer.index] = calls.get(layer.index, 0) + indices.numel()
        return None

    with _hooks(model, keep_share, on_route):
        for b in range(0, windows.shape[0], batch_size):
            model(windows[b:b + batch_size])
    return {j: calibrate_beta(torch.cat(ratios[j]), calls[j], share) for j in sorted(ratios)}


@contextmanager
def skipping(model: nn.Module, betas: dict[int, float], keep_share: float = 0.1) -> Iterator[SkipCount]:
    """Inside the block every MoE layer skips as ODP says (module doc); yields the running count."""
    count = SkipCount()

    def on_route(layer, output, keep):
        logits, weights, indices = output[0], output[1], output[2]
        drop = drop_mask(_route(layer, logits, indices), betas.get(layer.index, 0.0), keep)  # [T, k]
        w = weights.reshape(drop.shape).masked_fill(drop, 0)
        if layer.norm_topk_prob:  # only the rows that lost a slot (the others stay bit for bit)
            w = torch.where(drop.any(-1, keepdim=True), w / w.sum(-1, keepdim=True), w)
        count.calls[layer.index] = count.calls.get(layer.index, 0) + drop.numel()
        count.skipped[layer.index] = count.skipped.get(layer.index, 0) + int(drop.sum())
        return (logits, w.reshape(weights.shape).to(weights.dtype), indices, *output[3:])

    with _hooks(model, keep_share, on_route):
        yield count
