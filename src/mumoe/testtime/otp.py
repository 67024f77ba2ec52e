"""OTP (MC#'s online top-any pruning): a learned mask router per MoE layer over the routed top-k slots.

Per MoE layer a linear map reads the token's MoE input (RMS-normalised, x / rms(x)) and the log-probabilities of
its chosen slots (log p_1 … log p_k, router order) and gives a keep logit l_j for every slot j ≥ 2; the first slot
always runs, as in ODP. Training samples the relaxed mask m_j = softmax((log π_j + g) / τ)_keep, π_j = (σ(l_j),
1 − σ(l_j)), g Gumbel noise (for two classes: σ((l_j + g₁ − g₂) / τ)), and minimises

    Σ_t ‖Ŷ_t − Y_t‖² / Σ_t ‖Y_t‖²  +  λ · mean_t,j m_j

Y_t = Σ_j w_j f_j(x_t), the layer's routed output with the model's combine weights; Ŷ_t the same with w_j m_j
(renormalised over the slots where the model renormalises its top-k). Each layer learns on the unskipped model's
inputs (distillation to the unpruned layer output). The loss needs only the slots' Gram G_t[i, j] = ⟨f_i, f_j⟩
(k × k per token), not the outputs: ‖Σ_j d_j f_j‖² = dᵀ G d.

The map starts at ODP's order (l_j = a · log(p_j / p_1) + b, zero weights on x). At inference slot j is skipped
where l_j (the order of σ(l_j)) is under the layer's threshold, set by calibration for a target share of expert calls
(`skip.calibrate` with `otp_scores`), the same way as ODP's β.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import MumoeError
from ..models import MoELayer, moe_adapter_for
from ..progress import bar
from .skip import Score, chosen_probs, route_hooks


@dataclass(frozen=True)
class OTPConfig:
    """Training of the mask routers (module doc): λ the mask penalty, τ the Gumbel-softmax temperature."""

    lam: float = 0.2
    tau: float = 0.5
    steps: int = 1000
    lr: float = 5e-2
    batch_tokens: int = 2048
    seed: int = 0


class MaskRouter(nn.Module):
    """One MoE layer's mask router: [x / rms(x), log p_1 … log p_k] -> keep logits of slots 2..k."""

    def __init__(self, hidden: int, top_k: int, slope: float = 2.0, ratio: float = 0.3):
        super().__init__()
        self.hidden, self.top_k = hidden, top_k
        self.linear = nn.Linear(hidden + top_k, top_k - 1)
        with torch.no_grad():  # ODP's order: l_j = slope · log(p_j / p_1) − slope · log(ratio)
            self.linear.weight.zero_()
            for j in range(1, top_k):
                self.linear.weight[j - 1, hidden + j] = slope
                self.linear.weight[j - 1, hidden] = -slope
            self.linear.bias.fill_(-slope * math.log(ratio))

    def forward(self, x: torch.Tensor, probs_top: torch.Tensor) -> torch.Tensor:
        """x [T, H], probs_top [T, k] -> keep logits [T, k − 1]."""
        x = x.float()
        x = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        return self.linear(torch.cat([x, probs_top.float().clamp_min(1e-12).log()], dim=-1))


@dataclass
class LayerData:
    """What one layer's training reads, per calibration token."""

    x: torch.Tensor  # [T, H] the MoE input
    probs: torch.Tensor  # [T, k] router probabilities of the chosen slots
    weights: torch.Tensor  # [T, k] the model's combine weights
    gram: torch.Tensor  # [T, k, k] ⟨f_i(x), f_j(x)⟩ of the chosen slots' expert outputs


def slot_gram(layer: MoELayer, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x [T, H], indices [T, k] -> [T, k, k] Gram of the chosen experts' outputs f_{e_tj}(x_t)."""
    T, k = indices.shape
    out = torch.zeros(T, k, x.shape[-1], dtype=torch.float32, device=x.device)
    for e in indices.unique().tolist():
        rows, slots = torch.where(indices == e)
        out[rows, slots] = layer.expert_forward(e, x[rows]).float()
    return out @ out.transpose(1, 2)


@torch.no_grad()
def gather(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict[int, LayerData]:
    """Run `windows` [N, L] through the unchanged model; per MoE layer the training data of its mask router (held
    for every layer at once: T·4·(H + 2k + k²) bytes per layer for T calibration tokens — on a large model, fewer
    --nsamples)."""
    parts: dict[int, list[tuple[torch.Tensor, ...]]] = {}

    def on_route(layer, x, output, keep):
        logits, weights, indices = output[0], output[1], output[2]
        idx = indices.reshape(x.shape[0], -1)
        parts.setdefault(layer.index, []).append(
            (x.float().cpu(), chosen_probs(layer, logits, indices, weights).cpu(),
             weights.reshape(idx.shape).float().cpu(), slot_gram(layer, x, idx).cpu()))
        return None

    device = next(model.parameters()).device  # the windows go where the model is
    with route_hooks(model, 0.0, on_route):
        for b in bar(range(0, windows.shape[0], batch_size), desc="OTP: layer inputs and slot outputs",
                     unit="batch"):
            model(windows[b:b + batch_size].to(device))
    return {j: LayerData(*(torch.cat(t) for t in zip(*p))) for j, p in sorted(parts.items())}


def masked_weights(weights: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor, renormalise: bool,
                   keep_sum: bool = False) -> torch.Tensor:
    """Combine weights [T, k] with slot j ≥ 2 scaled by mask [T, k − 1] (the first slot kept), renormalised over
    the slots as the model renormalises its top-k (keep_sum: to the sum the router gave — a sigmoid router's
    scaling factor — rather than 1)."""
    m = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=-1)
    if renormalise:
        w = m * probs
        w = w / w.sum(-1, keepdim=True)
        return w * weights.sum(-1, keepdim=True) if keep_sum else w
    return m * weights


def relative_error(data: LayerData, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t ‖Ŷ_t − Y_t‖² / Σ_t ‖Y_t‖² from the slots' Gram: d = ŵ − w, dᵀ G d over wᵀ G w."""
    d = weights - data.weights
    err = torch.einsum("ti,tij,tj->", d, data.gram, d)
    return err / torch.einsum("ti,tij,tj->", data.weights, data.gram, data.weights)


def _sample(data: LayerData, rows: torch.Tensor) -> LayerData:
    return LayerData(data.x[rows], data.probs[rows], data.weights[rows], data.gram[rows])


def train_layer(data: LayerData, renormalise: bool, cfg: OTPConfig, keep_sum: bool = False
                ) -> tuple[MaskRouter, dict]:
    """Fit one layer's mask router (module doc) -> (router, {loss, error, kept} at the last step)."""
    T, k = data.probs.shape
    router = MaskRouter(data.x.shape[-1], k)
    opt = torch.optim.Adam(router.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    stats = {}
    for _ in range(cfg.steps):
        batch = _sample(data, torch.randint(0, T, (min(cfg.batch_tokens, T),), generator=gen))
        logits = router(batch.x, batch.probs)  # [B, k − 1]
        u = torch.rand(2, *logits.shape, generator=gen).clamp(1e-9, 1 - 1e-9)
        gumbel = -torch.log(-torch.log(u))  # [2, B, k − 1]
        mask = torch.sigmoid((logits + gumbel[0] - gumbel[1]) / cfg.tau)
        err = relative_error(batch, masked_weights(batch.weights, batch.probs, mask, renormalise, keep_sum))
        loss = err + cfg.lam * mask.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = {"loss": loss.item(), "error": err.item(), "kept": mask.mean().item()}
    return router.eval(), stats


def train(model: nn.Module, windows: torch.Tensor, cfg: OTPConfig = OTPConfig(),
          batch_size: int = 8) -> tuple[dict[int, MaskRouter], dict[int, dict]]:
    """OTP's mask routers of every MoE layer, trained on `windows` [N, L] -> (routers, last-step stats)."""
    layers = {layer.index: layer for layer in moe_adapter_for(model).moe_layers()}
    if any(layer.input_scaled for layer in layers.values()):
        raise MumoeError("OTP's loss weighs each expert's output by its router weight; this model's router scales "
                         "the experts' inputs (Llama 4): not supported yet (ODP is)")
    small = sorted(j for j, layer in layers.items() if layer.top_k < 2)
    if small:
        raise MumoeError(f"OTP skips among the top-k slots; layer {small[0]} routes to {layers[small[0]].top_k}")
    data = gather(model, windows, batch_size)
    routers, stats = {}, {}
    for j in bar(sorted(data), desc="OTP: mask routers", unit="layer"):
        with torch.enable_grad():
            routers[j], stats[j] = train_layer(data[j], layers[j].norm_topk_prob, cfg,
                                               keep_sum=layers[j].scoring != "softmax")
    return routers, stats


def otp_scores(routers: dict[int, MaskRouter]) -> Score:
    """The skipping score of OTP: the keep logit l_j of slots j ≥ 2 ([T, k − 1]; the order of σ(l_j), without
    its float32 ties at saturation)."""

    def score(layer: MoELayer, x: torch.Tensor, probs_top: torch.Tensor) -> torch.Tensor:
        if layer.index not in routers:
            return torch.ones(probs_top.shape[0], probs_top.shape[1] - 1, device=probs_top.device)
        router = routers[layer.index]
        with torch.no_grad():
            return router.to(x.device)(x, probs_top)

    return score


def to_bytes(routers: dict[int, MaskRouter], cfg: OTPConfig, source: str) -> bytes:
    """The mask routers as one safetensors file's bytes (tensors `layers.<j>.weight/bias`; the training settings
    and the model it was trained on in its metadata); `load` reads it back."""
    from safetensors.torch import save

    tensors = {}
    for j, r in routers.items():
        tensors[f"layers.{j}.weight"] = r.linear.weight.detach().contiguous()
        tensors[f"layers.{j}.bias"] = r.linear.bias.detach().contiguous()
    meta = {"format": "mumoe-otp", "config": json.dumps(asdict(cfg)), "source": source}
    return save(tensors, metadata=meta)


def load(path: str | Path, model: nn.Module) -> dict[int, MaskRouter]:
    """Mask routers written from `to_bytes`, checked against `model`'s MoE layers (one-line errors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MumoeError(f"--skipper {path}: no such file (train one with `mumoe train-skipper`)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - not a safetensors file
        raise MumoeError(f"--skipper {path}: not a skipper file ({type(e).__name__}: {e})") from None
    if meta.get("format") != "mumoe-otp":
        raise MumoeError(f"--skipper {path}: not a skipper written by `mumoe train-skipper`")
    layers = {layer.index: layer for layer in moe_adapter_for(model).moe_layers()}
    routers = {}
    for j, layer in layers.items():
        w, b = tensors.get(f"layers.{j}.weight"), tensors.get(f"layers.{j}.bias")
        want = (layer.top_k - 1, layer.hidden_size + layer.top_k)
        if w is None or b is None or tuple(w.shape) != want:
            raise MumoeError(f"--skipper {path} does not fit this model: MoE layer {j} needs a mask router of shape "
                             f"{list(want)}, the file has {None if w is None else list(w.shape)} (trained on "
                             f"{meta.get('source', '?')})")
        r = MaskRouter(layer.hidden_size, layer.top_k)
        with torch.no_grad():
            r.linear.weight.copy_(w)
            r.linear.bias.copy_(b)
        routers[j] = r.eval()
    return routers
