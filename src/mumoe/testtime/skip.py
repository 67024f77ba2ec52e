"""Per-token expert skipping, training-free (MC#'s ODP, after MC-MoE's dynamic pruning).

For a token routed to its top-k experts with router probabilities p_1 ≥ … ≥ p_k (the softmax over all experts,
before any top-k renormalisation), routed slot j ≥ 2 is skipped when p_j < β_ℓ · p_1; β_ℓ is set per MoE layer
from calibration so that a target share of all expert calls (T·k per layer) is skipped. Important tokens keep
every expert: importance = attention received × ‖x‖₁ (x the MoE input; attention received = the column mean of the
layer's attention probabilities, averaged over heads, each key's column summed over the queries that see it and
divided by their number), the top `keep_share` of each sequence's tokens protected — in a prefill (several tokens),
as MC-MoE; a one-token decode step protects none. The kept slots' combine weights are renormalised over the kept
slots where the model renormalises over the top-k (`norm_topk_prob`), else left as the router gave them.

A skipped slot is handed to the experts as transformers' expert-parallel sentinel (index E, combine weight 0):
its eager and grouped_mm experts forwards do not compute it, batched_mm computes it with weight 0; an experts
module without that contract gets weight 0 only. Either way the output is that of not running the slot.

The rule is one score per routed slot j ≥ 2 ([T, k − 1]) and a threshold per layer: ODP's score is p_j / p_1;
OTP's (`testtime/otp.py`) is a learned keep probability. `calibrate` sets the thresholds for a target share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def drop_from_scores(scores: torch.Tensor, threshold: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """scores [T, k − 1] of slots j ≥ 2 -> [T, k] bool, True where the slot is skipped: score < threshold; the
    first slot and every slot of a protected token (`keep` [T]) run."""
    T = scores.shape[0]
    drop = torch.zeros(T, scores.shape[1] + 1, dtype=torch.bool, device=scores.device)
    drop[:, 1:] = scores < threshold
    if keep is not None:
        drop &= ~keep.reshape(-1, 1)
    return drop


def drop_mask(probs_top: torch.Tensor, beta: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """ODP: [T, k] -> [T, k] bool, True where the slot is skipped: p_j < β·p_1 for j ≥ 2, never for protected
    tokens."""
    return drop_from_scores(slot_ratios(probs_top), beta, keep)


# a skipper's score of the slots j ≥ 2: (layer, x [T, H] the MoE input, p [T, k] the chosen slots' probabilities)
Score = Callable[[MoELayer, torch.Tensor, torch.Tensor], torch.Tensor]


def odp_scores(layer: MoELayer, x: torch.Tensor, probs_top: torch.Tensor) -> torch.Tensor:
    """ODP's score: p_j / p_1 ([T, k − 1])."""
    return slot_ratios(probs_top)


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


def chosen_probs(layer: MoELayer, logits: torch.Tensor, indices: torch.Tensor,
           weights: torch.Tensor | None = None) -> torch.Tensor:
    """[T, k] the chosen slots' router probabilities, ordered as the router ordered them: the softmax over all
    experts for softmax routers; for other routers (sigmoid scores, DeepSeek-V3 style) the combine weights the
    router gave (their ratios are those of the scores: normalisation and scaling cancel in p_j / p_1)."""
    if layer.scoring != "softmax" and weights is not None:
        return weights.reshape(indices.reshape(-1, indices.shape[-1]).shape).float()
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    return probs.gather(-1, indices.reshape(probs.shape[0], -1))


@contextmanager
def route_hooks(model: nn.Module, keep_share: float, on_route) -> Iterator[list[MoELayer]]:
    """Attention probabilities captured per layer (eager attention for the forwards of several tokens while tokens
    are protected; a one-token decode step keeps the model's own attention) and `on_route(layer, x [T, H], output,
    keep [T] or None)` on every router call; -> the MoE layers."""
    layers = moe_adapter_for(model).moe_layers()
    odd = sorted({layer.scoring for layer in layers} - {"softmax", "sigmoid"})
    if odd:
        raise MumoeError(f"expert skipping compares the chosen experts' router scores; this model's routers score "
                         f"by {odd[0]} (not supported yet)")
    if any(layer.identity_experts for layer in layers):
        raise MumoeError(f"expert skipping is not supported yet on {model.config.model_type}: its routers also pick "
                         "zero-computation (identity) experts, which the skip rules do not weigh")
    attn: dict[int, torch.Tensor] = {}
    handles = []
    impl = getattr(model.config, "_attn_implementation", None)
    try:
        if keep_share > 0:
            def pick_attention(mod, args, kwargs):  # sdpa returns no attention probabilities
                x = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
                want = "eager" if x is None or x.shape[1] > 1 else impl
                if want is not None and model.config._attn_implementation != want:
                    model.set_attn_implementation(want)
            handles.append(model.register_forward_pre_hook(pick_attention, with_kwargs=True))
            for layer in layers:
                def grab(mod, args, out, j=layer.index):
                    attn[j] = out[1]
                handles.append(layer.decoder_layer.self_attn.register_forward_hook(grab))

        def router_hook(layer):
            def hook(mod, args, output):
                x = args[0]
                keep = None
                a = attn.pop(layer.index, None)
                if a is not None and a.shape[-2] == a.shape[-1] > 1:  # a prefill, no cached keys before it
                    B, L = a.shape[0], a.shape[-1]
                    keep = protected(importance(a.float(), x.reshape(B, L, -1).float()), keep_share).reshape(-1)
                return on_route(layer, x.reshape(-1, x.shape[-1]), output, keep)
            return hook

        for layer in layers:
            handles.append(layer.router.register_forward_hook(router_hook(layer)))
        yield layers
    finally:
        for h in handles:
            h.remove()
        if impl is not None and model.config._attn_implementation != impl:
            model.set_attn_implementation(impl)


@torch.no_grad()
def calibrate(model: nn.Module, windows: torch.Tensor, share: float, keep_share: float = 0.1,
              batch_size: int = 8, score: Score = odp_scores) -> dict[int, float]:
    """The threshold per MoE layer (ODP's β by default) so that `share` of the expert calls over `windows` [N, L]
    are skipped, each layer on the unskipped model's inputs (the model unchanged)."""
    if not 0 <= share < 1:
        raise MumoeError(f"--skip must be in [0, 1), got {share}")
    ratios: dict[int, list[torch.Tensor]] = {}
    calls: dict[int, int] = {}

    def on_route(layer, x, output, keep):
        logits, weights, indices = output[0], output[1], output[2]
        r = score(layer, x, chosen_probs(layer, logits, indices, weights)).float()  # [T, k − 1]
        if keep is not None:
            r = r[~keep]
        ratios.setdefault(layer.index, []).append(r.reshape(-1).cpu())
        calls[layer.index] = calls.get(layer.index, 0) + indices.numel()
        return None

    device = next(model.parameters()).device  # the windows go where the model is
    with route_hooks(model, keep_share, on_route):
        for b in range(0, windows.shape[0], batch_size):
            model(windows[b:b + batch_size].to(device))
    return {j: calibrate_beta(torch.cat(ratios[j]), calls[j], share) for j in sorted(ratios)}


def sentinel_of(layer: MoELayer) -> int | None:
    """The index that makes this layer's experts module pass a slot over (transformers' expert-parallel sentinel,
    = its expert count), or None where the module does not follow that contract."""
    experts = layer.experts
    if not hasattr(experts, "_is_expert_parallel") or getattr(experts, "num_experts", None) != layer.num_experts:
        return None
    return layer.num_experts


@contextmanager
def _sentinels(layers: list[MoELayer]) -> Iterator[dict[int, int]]:
    """Switch on the experts' sentinel handling (their expert-parallel flag) inside the block -> {layer: index}."""
    found = {layer.index: e for layer in layers if (e := sentinel_of(layer)) is not None}
    saved = {layer.index: layer.experts._is_expert_parallel for layer in layers if layer.index in found}
    try:
        for layer in layers:
            if layer.index in found:
                layer.experts._is_expert_parallel = True
        yield found
    finally:
        for layer in layers:
            if layer.index in saved:
                layer.experts._is_expert_parallel = saved[layer.index]


@contextmanager
def skipping(model: nn.Module, betas: dict[int, float], keep_share: float = 0.1,
             score: Score = odp_scores) -> Iterator[SkipCount]:
    """Inside the block every MoE layer skips the slots whose score is under its threshold (`betas`; ODP's rule by
    default, module doc); the skipped slots are not computed where the experts allow it; yields the running
    count."""
    count = SkipCount()
    sentinel: dict[int, int] = {}

    def on_route(layer, x, output, keep):
        logits, weights, indices = output[0], output[1], output[2]
        probs = chosen_probs(layer, logits, indices, weights)
        drop = drop_from_scores(score(layer, x, probs), betas.get(layer.index, 0.0), keep)  # [T, k]
        full = weights.reshape(drop.shape)
        w = full.masked_fill(drop, 0)
        if layer.norm_topk_prob:  # only the rows that lost a slot (the others stay bit for bit)
            # renormalised over the kept slots to the sum the router gave (1 for softmax routers; a sigmoid
            # router's routed_scaling_factor)
            total = 1.0 if layer.scoring == "softmax" else full.sum(-1, keepdim=True)
            w = torch.where(drop.any(-1, keepdim=True), w / w.sum(-1, keepdim=True) * total, w)
        count.calls[layer.index] = count.calls.get(layer.index, 0) + drop.numel()
        count.skipped[layer.index] = count.skipped.get(layer.index, 0) + int(drop.sum())
        if layer.index in sentinel:
            indices = indices.masked_fill(drop.reshape(indices.shape), sentinel[layer.index])
        return (logits, w.reshape(weights.shape).to(weights.dtype), indices, *output[3:])

    with route_hooks(model, keep_share, on_route) as layers, _sentinels(layers) as found:
        sentinel.update(found)
        yield count


@dataclass
class SkipSetup:
    """What a skipping run skips by: the thresholds per MoE layer, the score they apply to, the protected share of
    a prefill's tokens, and a line that says so."""

    betas: dict[int, float]
    score: Score
    keep_share: float
    line: str


@contextmanager
def skipping_with(model: nn.Module, setup: SkipSetup | None) -> Iterator[SkipCount | None]:
    """`skipping` as `setup` says inside the block (yields the count), or nothing (yields None)."""
    if setup is None:
        yield None
        return
    with skipping(model, setup.betas, setup.keep_share, setup.score) as count:
        yield count
