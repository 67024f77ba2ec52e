"""HEAPr: second-order importance of atomic experts (one neuron k of expert i).

    S_{i,k} = E_{t∈T_i}[h_{i,k}(t)²] · E_{t∈T_i}[(∂L/∂h_{i,k}(t))²]          (METHODS.md)

h is the down-projection input of expert i on its routed tokens; the gradient comes from one backward pass
of the LM loss (labels = inputs, summed over tokens so that per-token gradients do not depend on the batch
size). Parameters stay frozen: gradients flow to activations only (the input embeddings are the one leaf).
State per expert: a few length-I vectors, never an H×H matrix — O(layers·E·I) floats.

Variants: "heapr" (the product of means above), "heapr-token" (E[h²·(∂L/∂h)²], per token), and the two
baselines at the same grain: "atom-magnitude" (‖[gate_i[k], up_i[k], down_i[:, k]]‖₂) and "atom-act"
(E[h²]·‖down_i[:, k]‖²). Experts that no calibration token routes to score −1 (pruned first).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import MoELayer

ATOM_METHODS = ("heapr", "heapr-token", "atom-magnitude", "atom-act")


@dataclass
class AtomStats:
    """Per-expert sums over routed tokens: each [E, I] float64, plus token counts [E]."""

    count: torch.Tensor
    h2: torch.Tensor  # Σ h²
    g2: torch.Tensor  # Σ (∂L/∂h)²
    hg2: torch.Tensor  # Σ h²·(∂L/∂h)²


def _observing_forward(layer: MoELayer, st: AtomStats):
    """An experts forward that computes exactly what the model computes, exposing h to autograd hooks."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)  # [T, H]
        for i in torch.unique(top_k_index).tolist():
            tok, slot = torch.where(top_k_index == i)  # routed tokens of expert i
            h = layer.expert_hidden(i, hidden_states[tok])  # [n, I]
            hd = h.detach().double()
            st.count[i] += len(tok)
            st.h2[i] += (hd**2).sum(0)
            if h.requires_grad:
                def grab(g, i=i, hd=hd):
                    gd = g.double()
                    st.g2[i] += (gd**2).sum(0)
                    st.hg2[i] += (hd**2 * gd**2).sum(0)
                h.register_hook(grab)
            y = nn.functional.linear(h, self.down_proj[i]) * top_k_weights[tok, slot, None]  # [n, H]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    return forward


def collect_atom_stats(model: nn.Module, layers: list[MoELayer], calib: torch.Tensor, batch_size: int = 4,
                       backward: bool = True, progress: bool = True) -> list[AtomStats]:
    """One forward (+ backward with the summed LM loss) pass over calib [N, L]. Parameters are not updated
    and get no .grad; the caller's requires_grad flags are restored."""
    stats = []
    saved_forward = []
    for layer in layers:
        E, I = layer.num_experts, layer.intermediate_size
        st = AtomStats(torch.zeros(E, dtype=torch.float64), *(torch.zeros(E, I, dtype=torch.float64) for _ in range(3)))
        stats.append(st)
        saved_forward.append(layer.experts.__dict__.get("forward"))
        layer.experts.forward = types.MethodType(_observing_forward(layer, st), layer.experts)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        embed = model.get_input_embeddings()
        for i in tqdm(range(0, len(calib), batch_size), desc="atom statistics", disable=not progress, unit="batch"):
            ids = calib[i : i + batch_size].to(embed.weight.device)
            with torch.set_grad_enabled(backward):
                x = embed(ids).detach().requires_grad_(backward)  # the only leaf: grads reach activations only
                logits = model(inputs_embeds=x).logits  # [B, L, V]
                if backward:
                    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                       reduction="sum")
                    loss.backward()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        for layer, fwd in zip(layers, saved_forward):
            if fwd is None:
                del layer.experts.forward
            else:
                layer.experts.forward = fwd
    return stats


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp(min=1)[:, None]


def atom_scores(method: str, layer: MoELayer, st: AtomStats | None) -> torch.Tensor:
    """[E, I] scores of one layer (higher = keep). Experts with no routed tokens score −1."""
    if method == "atom-magnitude":
        with torch.no_grad():
            I = layer.intermediate_size
            gu = layer.experts.gate_up_proj.double()  # [E, 2I, H]
            sq = gu[:, :I].pow(2).sum(-1) + gu[:, I:].pow(2).sum(-1) + layer.experts.down_proj.double().pow(2).sum(1)
        return sq.sqrt()
    if method == "heapr":
        s = _mean(st.h2, st.count) * _mean(st.g2, st.count)
    elif method == "heapr-token":
        s = _mean(st.hg2, st.count)
    elif method == "atom-act":
        with torch.no_grad():
            s = _mean(st.h2, st.count) * layer.experts.down_proj.double().pow(2).sum(1)  # ‖down[:, k]‖²
    else:
        raise ValueError(method)
    return torch.where(st.count[:, None] > 0, s, torch.full_like(s, -1.0))
