"""PMQ (MC-MoE / MC#): per-expert bit widths from calibration — the statistics, the allocation per layer, and the
experts quantized in memory (round-to-nearest, `apply.quant`).

Per MoE layer, over the calibration batches (one forward each):
    φ_i       tokens routed to expert i
    w_i       Σ over those tokens of the router's softmax probability of i (before any top-k renormalisation)
    L_{i,b}   Σ over batches of ‖Y − Y_{i@b}‖_F, the layer output's error with only expert i quantized to b bits;
              only expert i's routed tokens change, each by g_i(t)·(f_i(t) − f_i^b(t)), so
              ‖Y − Y_{i@b}‖_F = sqrt(Σ_{t routed to i} ‖g_i(t)·(f_i(t) − f_i^b(t))‖²).
The allocation is `select.bits.allocate` on φ, w normalised to sum 1 per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..apply.quant import Quantized, rtn
from ..models import MoELayer
from ..observe.runner import Collector, RouteEvent, Routed
from ..select.bits import ALPHA, BETA, BITS, allocate, expert_costs, layer_budget, normalised

F64 = torch.float64


def rtn_expert(layer: MoELayer, i: int, bits: int, group: int = 128) -> tuple[Quantized, Quantized]:
    """Expert i's gate_up [2I, H] and down [H, I] quantized to `bits`, groups of `group` along each matrix's input
    dimension (gate and up rows are quantized row by row: fusing them changes nothing)."""
    return rtn(layer.experts.gate_up_proj[i], bits, group), rtn(layer.experts.down_proj[i], bits, group)


def expert_forward_with(layer: MoELayer, i: int, x: torch.Tensor, gu: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """f_i(x) with the given weights in place of expert i's own (its biases kept). x [T, H] -> [T, H] float32."""
    gb, db = layer.gate_up_bias, layer.down_bias
    gate_up = torch.nn.functional.linear(x.float(), gu, None if gb is None else gb[i].float())
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.linear(layer.activate(gate, up), down, None if db is None else db[i].float())


@dataclass
class PMQLayerStats:
    layer: MoELayer
    bits: tuple[int, ...]
    phi: torch.Tensor = None  # [E] routed tokens
    w: torch.Tensor = None  # [E] summed softmax probabilities of the routed tokens
    loss: torch.Tensor = None  # [E, len(bits)] Σ over batches of ‖Y − Y_{i@b}‖_F
    _cache: dict = field(default_factory=dict, repr=False)  # (expert, bits) -> its `rtn_expert` (uint8 integers)

    def __post_init__(self) -> None:
        E = self.layer.num_experts
        self.phi = torch.zeros(E, dtype=F64)
        self.w = torch.zeros(E, dtype=F64)
        self.loss = torch.zeros(E, len(self.bits), dtype=F64)


class PMQStats(Collector):
    """φ, w and L_{i,b} of every MoE layer (see the module doc). Each expert's quantized integers are made once per
    width and kept until the layer's `result` (one byte per weight and width: ≈ len(bits)/4 of the layer's experts
    in float32), dequantized when used."""

    needs_experts = True

    def __init__(self, layers: list[MoELayer], bits=BITS, group: int = 128, cache: bool = True) -> None:
        """cache False: each expert quantized again in every batch (no copies kept; the layer-sequential sweep,
        where one resident layer and its activations are all the memory there is)."""
        self.layers = layers
        self.bits = tuple(bits)
        self.group = group
        self.cache = cache
        self.stats = {layer.index: PMQLayerStats(layer, self.bits) for layer in layers}

    def on_route(self, ev: RouteEvent) -> None:
        st = self.stats[ev.layer.index]
        probs = torch.softmax(ev.logits.double(), dim=-1)  # [T, E]
        token, expert, _ = ev.picks()  # [S] routed-expert picks (identity experts' left out)
        flat = expert.cpu()
        st.phi += torch.bincount(flat, minlength=len(st.phi)).double()
        st.w.index_add_(0, flat, probs[token, expert].cpu())

    @torch.no_grad()
    def on_routed(self, r: Routed) -> None:
        st = self.stats[r.layer.index]
        start = 0
        for i, n in enumerate(r.counts):
            if n == 0:
                continue
            sel = slice(start, start + n)
            start += n
            x, f, g = r.x[sel], r.f[sel].float(), r.weight[sel].float()[:, None]  # [n, H], [n, H], [n, 1]
            for j, b in enumerate(self.bits):
                key = (i, b)
                if key in st._cache:
                    gu, down = st._cache[key]
                else:
                    gu, down = rtn_expert(r.layer, i, b, self.group)
                    if self.cache:
                        st._cache[key] = gu, down
                fb = expert_forward_with(r.layer, i, x, gu.dequantize(), down.dequantize())
                st.loss[i, j] += float((g * (f - fb)).double().pow(2).sum().sqrt())

    def result(self) -> list[PMQLayerStats]:
        for st in self.stats.values():
            st._cache.clear()
        return [self.stats[layer.index] for layer in self.layers]


def allocate_layer(st: PMQLayerStats, avg_bits: float, alpha: float = ALPHA, beta: float = BETA) -> list[int]:
    """One width per expert of the layer: budget floor(avg_bits · E) bits (`select.bits.allocate`)."""
    E = len(st.phi)
    losses = [{b: float(st.loss[i, j]) for j, b in enumerate(st.bits)} for i in range(E)]
    costs = expert_costs(normalised(st.phi.tolist()), normalised(st.w.tolist()), losses, alpha, beta)
    return allocate(costs, layer_budget(avg_bits, E), st.bits)


@torch.no_grad()
def quantize_layer(layer: MoELayer, widths: list[int], group: int = 128) -> list[tuple[Quantized, Quantized]]:
    """Each expert's weights replaced in place by their round-to-nearest values at its width (in the layer's
    dtype): what the packed export dequantizes to. -> per expert (gate_up, down) as quantized integers."""
    out = []
    for i, b in enumerate(widths):
        gu, down = rtn_expert(layer, i, b, group)
        layer.experts.gate_up_proj[i].copy_(gu.dequantize())
        layer.experts.down_proj[i].copy_(down.dequantize())
        out.append((gu, down))
    return out
