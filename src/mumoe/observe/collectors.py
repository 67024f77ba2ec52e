"""Collectors for the observation runner: what each family of methods gathers in a calibration pass.

    ExpertStats   per-expert sums for the expert criteria (frequency, gate, EAN, REAP, EASY-EP, TCESS, PEU)
    AtomStats     per-neuron sums for HEAPr and the atom baselines (forward, + backward for gradients)
    InputNorms    per-input-feature Σx² of every prunable linear (Wanda offline, μ-MoE per prompt)
    MergeStats    per-layer merge statistics: routed counts, router-logit Gram, every expert's outputs on
                  every token (means, pairwise cosines, REAM's gated means and saliency), a sample of
                  neuron activations (REAM's alignment) for the merge grain
    OnRoute       any callable on the route events (TAER keys, routing counts)

All sums are float64 whatever the weights' dtype (fp32 within one forward where marked), so the statistics do
not depend on the batch size. Accumulators live on the model's device; results are moved to the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import MoELayer, adapter_for
from ..models.prunable import prunable_linears
from ..compat import cache_kwarg, last_logits, output_cache
from .runner import Collector, Observation, Routed, RouteEvent, run

F64 = torch.float64


# -- expert criteria ---------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Sums over calibration tokens for one MoE layer (each [E], float64)."""

    layer: MoELayer
    n_tokens: int = 0
    freq: torch.Tensor = None  # Σ_t 1[i ∈ TopK(t)]
    soft: torch.Tensor = None  # Σ_t g_i(t)
    ean: torch.Tensor = None  # Σ_{t∈T_i} ‖f_i(t)‖
    ean_sq: torch.Tensor = None  # Σ_{t∈T_i} ‖f_i(t)‖²
    reap_sum: torch.Tensor = None  # Σ_{t∈T_i} g_i(t)‖f_i(t)‖
    easy: torch.Tensor = None  # Σ_{t∈T_i} g_i(t)‖f_i(t)‖ · max(0, 1 − cos(h_t, h_t + Σ_j g_j f_j))
    tcess_sum: torch.Tensor = None  # Σ_t s_i(t) · 1[i = argmax_j s_j(t)]
    pool_logits: list[torch.Tensor] = field(default_factory=list)  # per batch [T, k] top-k raw logits
    pool_index: list[torch.Tensor] = field(default_factory=list)  # per batch [T, k] their expert ids
    easy_groups: torch.Tensor | None = None  # [G, E] the EASY-EP sums per calibration source (G > 1 sources)

    SUMS = ("freq", "soft", "ean", "ean_sq", "reap_sum", "easy", "tcess_sum")

    def __post_init__(self) -> None:
        E = self.layer.num_experts
        for name in self.SUMS:
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(E, dtype=F64))

    def to(self, device) -> LayerStats:
        for name in self.SUMS:
            setattr(self, name, getattr(self, name).to(device))
        self.pool_logits = [t.to(device) for t in self.pool_logits]
        self.pool_index = [t.to(device) for t in self.pool_index]
        if self.easy_groups is not None:
            self.easy_groups = self.easy_groups.to(device)
        return self


@dataclass
class MergeLayerStats:
    """One MoE layer's merge statistics (float64): the routed counts and the router logits' Gram matrix always;
    the summed outputs of every expert on every token (HC-SMoE), the summed per-token cosine similarity of
    every pair of experts' outputs (Sub-MoE), and REAM's gated outputs, saliency sums and a sample of neuron
    activations, when asked for."""

    layer: MoELayer
    freq: torch.Tensor  # [E] routed count: top-k selections of each expert
    gram: torch.Tensor  # [E, E] Σ_t l_t l_tᵀ over the raw router logits l_t [E] (column dot products)
    sum: torch.Tensor | None = None  # [E, H] Σ_t f_i(x_t), every expert on every token
    cos: torch.Tensor | None = None  # [E, E] Σ_t f_i·f_j / (‖f_i‖‖f_j‖ + 1e-8), every expert on every token
    gated: torch.Tensor | None = None  # [E, H] Σ_t p_i(t) f_i(x_t), p = softmax of the raw logits over all E
    sal: torch.Tensor | None = None  # [E] Σ over tokens routed to i of p_i(t)² ‖f_i(x_t)‖ (REAM's REAP saliency)
    acts: torch.Tensor | None = None  # [N_max, E, I] in h's dtype: h_i of the first tokens, rows [:n_acts] filled
    n_acts: int = 0
    n_tokens: int = 0

    def mean(self) -> torch.Tensor:
        """[E, H] the mean output of each expert over all tokens."""
        return self.sum / max(self.n_tokens, 1)

    def mean_cosine(self) -> torch.Tensor:
        """[E, E] the mean over tokens of the cosine similarity of two experts' outputs."""
        return self.cos / max(self.n_tokens, 1)

    def activations(self) -> torch.Tensor:
        """[N, E, I] the neuron activations h_i of every expert on the same first N calibration tokens (tokens
        first: one rank's sample joins another's without a transposed copy; a view, no copy)."""
        if self.acts is None:  # no token reached this layer (on this rank)
            down = self.layer.experts.down_proj
            return torch.zeros(0, self.layer.num_experts, self.layer.intermediate_size, dtype=down.dtype)
        return self.acts[:self.n_acts]


COS_EPS = 1e-8  # added to the norm product (the Sub-MoE re-implementation's epsilon)
ACT_TOKENS = 2048  # REAM: neuron activations kept for the alignment, per layer (the same tokens for every expert)


class MergeStats(Collector):
    """The merge grain's statistics per MoE layer: routed counts and router-logit Gram always (cheap);
    outputs=True: every expert run on every token (not only its routed ones) and its outputs summed;
    pairwise=True: the per-token cosine of every pair of experts' outputs, summed; ream=True: every expert's
    outputs times its router probability summed, the REAP saliency sums over routed tokens, and the neuron
    activations of the first `act_tokens` tokens. Expert outputs are computed in row chunks (at most `chunk`
    tokens, and at most `budget` bytes of stacked outputs: never E × T × H at once)."""

    def __init__(self, layers: list[MoELayer], outputs: bool = True, pairwise: bool = False, chunk: int = 1024,
                 budget: int = 256 << 20, ream: bool = False, act_tokens: int = ACT_TOKENS) -> None:
        self.layers, self.chunk, self.budget = layers, chunk, budget
        self.outputs, self.pairwise, self.ream, self.act_tokens = outputs, pairwise, ream, act_tokens
        self.stats: dict[int, MergeLayerStats] = {}

    def _layer(self, index: int) -> MoELayer:
        return next(layer for layer in self.layers if layer.index == index)

    def _new(self, layer: MoELayer, H: int, dev) -> MergeLayerStats:
        E = layer.num_experts
        z = lambda *shape: torch.zeros(*shape, dtype=F64, device=dev)  # noqa: E731
        return MergeLayerStats(layer, z(E), z(E, E), z(E, H) if self.outputs else None,
                               z(E, E) if self.pairwise else None, z(E, H) if self.ream else None,
                               z(E) if self.ream else None)

    def on_route(self, ev: RouteEvent) -> None:
        layer = ev.layer
        E, (T, H) = layer.num_experts, ev.hidden.shape
        st = self.stats.get(layer.index)
        if st is None:
            st = self.stats[layer.index] = self._new(layer, H, ev.hidden.device)
        seen = st.n_tokens
        st.n_tokens += T
        picked_token, picked, _ = ev.picks()  # [S] routed-expert picks (identity experts' left out)
        st.freq += torch.bincount(picked, minlength=E).double()
        logits = ev.logits.double()  # [T, E]
        st.gram += logits.T @ logits
        if not (self.outputs or self.pairwise or self.ream):
            return
        if self.ream:
            probs = torch.softmax(ev.logits.float(), dim=-1)  # [T, E] over all E (REAM's gated similarity)
            routed = torch.zeros(T, E, dtype=torch.bool, device=ev.indices.device)
            routed[picked_token, picked] = True  # [T, E] the token picked the expert
        # pairwise: one buffer of a chunk's outputs [c, E, H] (fp32) and its Gram [c, E, E] (fp64, twice) stay
        # under the budget; otherwise: one expert's output at a time, `chunk` tokens
        c = self.chunk if not self.pairwise else max(1, min(self.chunk, self.budget // (E * H * 4 + E * E * 16)))
        with torch.no_grad():
            for start in range(0, T, c):
                x = ev.hidden[start:start + c]  # [c, H]
                n = x.shape[0]
                keep = max(0, min(n, self.act_tokens - (seen + start))) if self.ream else 0  # rows sampled here
                out = torch.empty(n, E, H, dtype=torch.float32, device=x.device) if self.pairwise else None
                for e in range(E):
                    h = layer.expert_hidden(e, x)  # [c, I]
                    f = layer.expert_output(e, h)  # [c, H]
                    if out is not None:
                        out[:, e] = f
                    elif st.sum is not None:
                        st.sum[e] += f.double().sum(0)
                    if self.ream:
                        p = probs[start:start + n, e]  # [c]
                        g = f.float() * p[:, None]  # [c, H] the output scaled by its probability
                        st.gated[e] += g.double().sum(0)
                        mask = routed[start:start + n, e]
                        st.sal[e] += (g.norm(dim=-1) * p)[mask].double().sum()
                        if keep:
                            if st.acts is None:  # one buffer, filled in place: no list of chunks joined later
                                st.acts = torch.empty(self.act_tokens, E, h.shape[1], dtype=h.dtype)
                            st.acts[st.n_acts:st.n_acts + keep, e] = h[:keep].cpu()
                st.n_acts += keep
                if out is None:
                    continue
                if st.sum is not None:
                    st.sum += out.sum(0, dtype=torch.float64)
                dots = torch.bmm(out, out.transpose(1, 2)).double()  # [c, E, E], no copy of out
                norms = out.norm(dim=-1).double()  # [c, E]
                st.cos += (dots / (norms[:, :, None] * norms[:, None, :] + COS_EPS)).sum(0)
                del out, dots

    def reduce(self, index: int, total: Callable, cat: Callable | None = None) -> None:
        """Sum one layer's statistics over data-parallel ranks (a rank no token reached adds zeros); the
        activation samples are joined in rank order (`cat`) and cut to `act_tokens`."""
        if index not in self.stats:
            layer = self._layer(index)
            self.stats[index] = self._new(layer, layer.hidden_size, layer.experts.down_proj.device)
        st = self.stats[index]
        st.freq, st.gram = total(st.freq), total(st.gram)
        for name in ("sum", "cos", "gated", "sal"):
            if getattr(st, name) is not None:
                setattr(st, name, total(getattr(st, name)))
        from .sequential import dist_world

        if self.ream and cat is not None and dist_world()[1] > 1:  # every rank joins, one no token reached included
            joined = cat(st.activations().to(st.freq.device))  # [N, E, I], in rank order
            st.acts = joined[:self.act_tokens].cpu()
            st.n_acts = st.acts.shape[0]
        st.n_tokens = int(total(torch.tensor(float(st.n_tokens), device=st.freq.device)))

    def take(self, index: int) -> MergeLayerStats:
        """One layer's statistics, moved to the CPU and released here (the layer-sequential sweep)."""
        st = self.stats.pop(index, None) or self._new(self._layer(index), self._layer(index).hidden_size, "cpu")
        for name in ("freq", "gram", "sum", "cos", "gated", "sal"):
            if getattr(st, name) is not None:
                setattr(st, name, getattr(st, name).cpu())
        return st

    def result(self) -> list[MergeLayerStats]:
        """One MergeLayerStats per layer (a layer no token reached: zeros, n_tokens 0)."""
        return [self.stats.get(layer.index) or self._new(layer, layer.hidden_size, "cpu") for layer in self.layers]


class ExpertStats(Collector):
    """Fills one LayerStats per MoE layer. experts=False: routing statistics only (no expert outputs needed)."""

    def __init__(self, layers: list[MoELayer], experts: bool = True, n_groups: int = 1) -> None:
        self.layers = layers
        self.stats = {layer.index: LayerStats(layer) for layer in layers}
        if n_groups > 1:
            for st in self.stats.values():
                st.easy_groups = torch.zeros(n_groups, st.layer.num_experts, dtype=F64)
        self.needs_experts = experts
        self._on_device = False
        self._obs: Observation | None = None

    def attach(self, obs: Observation) -> None:
        self._obs = obs

    def _st(self, layer: MoELayer, device) -> LayerStats:
        if not self._on_device:
            for st in self.stats.values():
                st.to(device)
            self._on_device = True
        return self.stats[layer.index]

    def on_route(self, ev: RouteEvent) -> None:
        logits = ev.logits.double()  # [T, E]
        st = self._st(ev.layer, logits.device)
        st.n_tokens += logits.shape[0]
        _, flat, weight = ev.picks()  # [S] routed-expert picks (identity experts' left out)
        st.freq += torch.bincount(flat, minlength=len(st.freq)).double()
        st.soft.index_add_(0, flat, weight.double())
        top = logits.argmax(-1)  # [T]
        st.tcess_sum.index_add_(0, top, logits.gather(-1, top[:, None])[:, 0])
        vals, idx = torch.topk(logits, st.layer.top_k, dim=-1)  # the PEU pool: top-k_a raw logits, k_a = top_k
        st.pool_logits.append(vals)
        st.pool_index.append(idx)

    def on_routed(self, r: Routed) -> None:
        st = self.stats[r.layer.index]
        route = r.route
        h = (route.residual if route.residual is not None else route.hidden).double()  # [T, H]
        cos = nn.functional.cosine_similarity(h, h + route.routed_output.double(), dim=-1)
        shift = torch.clamp(1 - cos, min=0)  # [T]
        norm = torch.cat([c.double().norm(dim=-1) for c in r.f.split(4096)]) if len(r.f) else r.f.new_zeros(
            0, dtype=F64)  # [S] ‖f_i(t)‖, in row chunks: no float64 copy of all of f
        gn = r.weight.double() * norm  # [S] g·‖f‖
        st.ean.index_add_(0, r.expert, norm)
        st.ean_sq.index_add_(0, r.expert, norm * norm)
        st.reap_sum.index_add_(0, r.expert, gn)
        contrib = gn * shift[r.token]  # [S]
        st.easy.index_add_(0, r.expert, contrib)
        if st.easy_groups is not None:
            G, E = st.easy_groups.shape
            groups = self._obs.token_groups(r.x.device)
            if groups is None:
                raise ValueError("per-source EASY-EP sums need the windows' groups (run(..., groups=))")
            st.easy_groups.view(-1).index_add_(0, groups[r.token] * E + r.expert, contrib)

    def result(self) -> list[LayerStats]:
        return [self.stats[layer.index].to("cpu") for layer in self.layers]

    def reduce(self, index: int, total: Callable, cat: Callable) -> None:
        """Combine layer `index`'s sums across data-parallel ranks: `total` sums a tensor in place, `cat`
        concatenates rows (the PEU pool)."""
        st = self.stats[index]
        for name in LayerStats.SUMS:
            total(getattr(st, name))
        n = torch.tensor([float(st.n_tokens)], dtype=F64, device=st.freq.device)
        st.n_tokens = int(total(n).item())
        if st.easy_groups is not None:
            total(st.easy_groups)
        k = st.layer.top_k
        logits = torch.cat(st.pool_logits) if st.pool_logits else st.freq.new_zeros(0, k)
        index_ = torch.cat(st.pool_index) if st.pool_index else st.freq.new_zeros(0, k, dtype=torch.long)
        st.pool_logits, st.pool_index = [cat(logits)], [cat(index_)]


# -- atoms (HEAPr) -----------------------------------------------------------------------------------------
@dataclass
class AtomLayerStats:
    """Per-expert sums over routed tokens: each [E, I] float64, plus token counts [E]."""

    count: torch.Tensor
    h2: torch.Tensor  # Σ h²
    g2: torch.Tensor  # Σ (∂L/∂h)²
    hg2: torch.Tensor  # Σ h²·(∂L/∂h)²
    a2: torch.Tensor | None = None  # gated=True: Σ a², a = g·h with g the token's combine weight (CAMERA-P)
    amax: torch.Tensor | None = None  # gated=True: max over tokens of a²
    shared_a2: torch.Tensor | None = None  # gated=True, a shared expert: [I_s] Σ over all tokens of (g_s·h_s)²
    shared_amax: torch.Tensor | None = None  # [I_s] its maximum (g_s: the shared gate's sigmoid, or 1)

    def to(self, device) -> AtomLayerStats:
        return AtomLayerStats(*(None if t is None else t.to(device) for t in (
            self.count, self.h2, self.g2, self.hg2, self.a2, self.amax, self.shared_a2, self.shared_amax)))


class AtomStats(Collector):
    """h = the down-projection input of each expert on its routed tokens; with backward, ∂L/∂h of the summed
    LM loss; with gated, the sum and the maximum of (g·h)² (g: the token's combine weight). State per expert: a
    few length-I vectors, never an H×H matrix."""

    needs_experts = True

    def __init__(self, layers: list[MoELayer], backward: bool = True, gated: bool = False) -> None:
        self.layers = layers
        self.needs_backward = backward
        self.gated = gated
        self.stats: dict[int, AtomLayerStats] = {}

    def _st(self, layer: MoELayer, device) -> AtomLayerStats:
        st = self.stats.get(layer.index)
        if st is None:
            E, I = layer.num_experts, layer.intermediate_size
            n = 5 if self.gated else 3
            st = AtomLayerStats(torch.zeros(E, dtype=F64, device=device),
                                *(torch.zeros(E, I, dtype=F64, device=device) for _ in range(n)))
            shared = layer.shared_linears() if self.gated else None
            if shared is not None:
                st.shared_a2, st.shared_amax = (torch.zeros(shared[2].in_features, dtype=F64, device=device)
                                                for _ in range(2))
            self.stats[layer.index] = st
        return st

    def _shared(self, st: AtomLayerStats, layer: MoELayer, x: torch.Tensor, chunk: int = 1024) -> None:
        """The shared expert's gated activations on every token of x [T, H], `chunk` rows at a time."""
        with torch.no_grad():
            for s in range(0, x.shape[0], chunk):
                xs = x[s:s + chunk].detach()
                a2 = (layer.shared_hidden(xs).double() * layer.shared_weight(xs).double()) ** 2  # [c, I_s]
                st.shared_a2 += a2.sum(0)
                torch.maximum(st.shared_amax, a2.max(0).values, out=st.shared_amax)

    def on_routed(self, r: Routed) -> None:
        st = self._st(r.layer, r.h.device)
        segs = list(r.segments())
        for e, a, b in segs:
            st.count[e] += b - a
            st.h2[e] += (r.h[a:b].double() ** 2).sum(0)
            if self.gated:
                a2 = (r.h[a:b].detach().double() * r.weight[a:b].detach().double()[:, None]) ** 2  # [n, I]
                st.a2[e] += a2.sum(0)
                torch.maximum(st.amax[e], a2.max(0).values, out=st.amax[e])
        if self.gated and st.shared_a2 is not None:
            self._shared(st, r.layer, r.route.hidden)
        if not self.needs_backward:
            return
        h = r.h  # [S, I], the forward's own values (no extra copy kept for the backward)

        def grab(g: torch.Tensor) -> None:  # [S, I]
            for e, a, b in segs:
                gd2 = g[a:b].double() ** 2
                st.g2[e] += gd2.sum(0)
                st.hg2[e] += (h[a:b].double() ** 2 * gd2).sum(0)

        r.on_grad_h(grab)

    def reduce(self, layer: MoELayer, total: Callable, maximum: Callable | None = None) -> None:
        """Combine `layer`'s statistics across data-parallel ranks (`total` sums a tensor in place, `maximum`
        takes the elementwise maximum in place)."""
        st = self._st(layer, layer.router_weight.device)
        for t in (st.count, st.h2, st.g2, st.hg2) + ((st.a2,) if self.gated else ()):
            total(t)
        if st.shared_a2 is not None:
            total(st.shared_a2)
        if self.gated and maximum is not None:
            maximum(st.amax)
            if st.shared_amax is not None:
                maximum(st.shared_amax)

    def result(self) -> list[AtomLayerStats]:
        out = []
        for layer in self.layers:
            st = self.stats.get(layer.index)
            if st is None:  # the layer never ran (no tokens)
                st = self._st(layer, "cpu")
            out.append(st.to("cpu"))
        return out


# -- input norms (Wanda, μ-MoE) ----------------------------------------------------------------------------
def col_sq(x: torch.Tensor) -> torch.Tensor:
    """Σ_t x_tj² per column of x [T, d]: fp32 within one pass (relative error ~1e-7), float64 result."""
    x = x.detach().float()
    return torch.mul(x, x).sum(0).double()


class DeferredNorms:
    """‖X_j‖₂ of a fused experts' down_proj inputs [E, I] for one prompt, where the rows of the experts no prompt
    token routed to are computed when first asked for (`row(e)`). Their fallback — the layer's input over all
    prompt tokens through expert e — is a matmul over every token per expert, and a decode needs few of them
    (BENCHMARKS.md: 9 of 234 on the 848M qwen3_moe); a row computed here equals the one computed in the prefill.
    Holds the layer's input [T, H] until dropped."""

    def __init__(self, known: torch.Tensor, pending: list[int], layer: MoELayer, x: torch.Tensor) -> None:
        self.known = known  # [E, I] float64; rows of pending experts 0 until computed
        self.pending = set(pending)
        self.layer, self.x, self._version = layer, x, x._version  # x [T, H]: the layer's input over all tokens

    @property
    def shape(self) -> torch.Size:
        return self.known.shape

    @torch.no_grad()
    def row(self, e: int) -> torch.Tensor:
        """‖X_j‖₂ [I] of expert e's down_proj input (computed now for an expert no prompt token routed to)."""
        if e in self.pending:
            if self.x._version != self._version:
                raise RuntimeError("the prompt's hidden states were modified in place after the prefill")
            self.known[e] = col_sq(self.layer.expert_hidden(e, self.x)).sqrt()
            self.pending.discard(e)
        return self.known[e]

    def resolved(self) -> torch.Tensor:
        """Every row computed: [E, I], equal to the norms the prefill computes without deferring."""
        for e in sorted(self.pending):
            self.row(e)
        return self.known


DEFER_BYTES = 1 << 30  # at most this many bytes of prompt hidden states held for deferred fallbacks (one [T, H]
# per MoE layer: 48 layers × 8k tokens × 4096 in bf16 would be 3.2 GB); the layers past it compute theirs in the prefill


class InputNorms(Collector):
    """Σ_t x_tj² per input feature of every prunable weight: dense linears through pre-hooks; fused routed
    experts per expert over its routed tokens (gate_up input [E, H], down input [E, I]); an expert no token
    routes to falls back to the layer's input over all tokens. `result()` -> {param name: ‖X_j‖₂}.
    defer_unrouted (one pass, a prompt): the fallback of the down_proj inputs is not computed in the forward;
    `result()` gives those weights as `DeferredNorms`, which compute an expert's row when asked (while the held
    hidden states stay within `DEFER_BYTES`; later layers as without deferring)."""

    needs_routes = False

    def __init__(self, model: nn.Module, defer_unrouted: bool = False) -> None:
        self.defer_unrouted = defer_unrouted
        self.deferred: dict[str, tuple[MoELayer, torch.Tensor]] = {}  # prefix -> (layer, its input [T, H])
        self.dense, self.moe_layers = prunable_linears(model)
        self.needs_experts = bool(self.moe_layers)
        names = adapter_for(model).module_names()
        self.prefix = {l.index: names[id(l.experts)] for l in self.moe_layers}
        self.sq: dict[str, torch.Tensor] = {}
        self.fused: dict[str, dict[str, torch.Tensor]] = {}
        self.seconds = 0.0  # time spent computing the statistics inside the forward
        self._last: list = [None, None, -1]  # (input, its column sums, its version): q/k/v, gate/up share one input
        self._scratch: torch.Tensor | None = None  # x² of the largest input so far, reused (no page faults)
        self._obs: Observation | None = None

    def _squares(self, x: torch.Tensor) -> torch.Tensor:
        """x² in fp32 [T, d], written into a scratch buffer reused across calls (no page faults)."""
        x = x.detach().float()  # a backward pass (HEAPr in the same pass) must not track the statistics
        if self._scratch is None or self._scratch.numel() < x.numel() or self._scratch.device != x.device:
            self._scratch = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
        return torch.mul(x, x, out=self._scratch[: x.numel()].view(x.shape))

    def _col_sq(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_t x_tj² per column of x [T, d]: fp32 within one pass (relative error ~1e-7), float64 across passes."""
        return self._squares(x).sum(0).double()

    def _segment_sq(self, x: torch.Tensor, expert: torch.Tensor, E: int) -> torch.Tensor:
        """Σ x_sj² per column over the rows of each expert: x [S, d], expert [S] -> [E, d] (fp32 within the pass,
        like `_col_sq`; float64 result). One index_add over all rows instead of a loop over the experts."""
        sq = self._squares(x)
        return torch.zeros(E, sq.shape[1], dtype=torch.float32, device=sq.device).index_add_(0, expert, sq).double()

    def attach(self, obs: Observation) -> None:
        self._obs = obs
        for lin in self.dense:
            obs.add_handle(lin.module.register_forward_pre_hook(self._dense_hook(f"{lin.name}.weight")))

    def detach(self) -> None:
        self._last[0] = self._last[1] = None

    def _dense_hook(self, name: str):
        def hook(module, args):
            t0 = time.perf_counter()
            inp = args[0]
            last = self._last
            if last[0] is not inp or last[2] != inp._version:
                x = inp.reshape(-1, inp.shape[-1])  # [T, d_in]
                valid = self._obs.valid(x.shape[0], x.device) if self._obs is not None else None
                if valid is not None:
                    x = x[valid]
                last[0], last[1], last[2] = inp, self._col_sq(x), inp._version
            self.sq[name] = self.sq.get(name, 0) + last[1]
            self.seconds += time.perf_counter() - t0
        return hook

    def on_routed(self, r: Routed) -> None:
        t0 = time.perf_counter()
        layer = r.layer
        E, I, H = layer.num_experts, layer.intermediate_size, layer.hidden_size
        dev = r.x.device
        acc = self.fused.setdefault(self.prefix[layer.index], {
            "n": torch.zeros(E, device=dev), "gu": torch.zeros(E, H, dtype=F64, device=dev),
            "dn": torch.zeros(E, I, dtype=F64, device=dev), "gu_all": torch.zeros(E, H, dtype=F64, device=dev),
            "dn_all": torch.zeros(E, I, dtype=F64, device=dev)})
        acc["n"] += torch.tensor(r.counts, dtype=acc["n"].dtype, device=dev)
        acc["gu"] += self._segment_sq(r.x, r.expert, E)  # [E, H]: Σ over each expert's pairs, one pass
        acc["dn"] += self._segment_sq(r.h, r.expert, E)  # [E, I]
        unrouted = [e for e, n in enumerate(r.counts) if n == 0]
        if unrouted:  # fallback material: the layer's input over all tokens of this pass
            x = r.route.hidden
            x_sq = self._col_sq(x)  # the same for every unrouted expert
            acc["gu_all"][unrouted] += x_sq
            held = sum(v[1].numel() * v[1].element_size() for v in self.deferred.values())
            if self.defer_unrouted and held + x.numel() * x.element_size() <= DEFER_BYTES:  # down_proj's fallback
                if self.prefix[layer.index] in self.deferred:  # when asked (`DeferredNorms`)
                    raise RuntimeError("defer_unrouted gathers the statistics of one forward")
                self.deferred[self.prefix[layer.index]] = (layer, x.detach())
            else:
                with torch.no_grad():
                    for e in unrouted:
                        acc["dn_all"][e] += self._col_sq(layer.expert_hidden(e, x))
        self.seconds += time.perf_counter() - t0

    def reduce(self, prefix: str, total: Callable) -> None:
        """Sum the statistics of every weight under module `prefix` across data-parallel ranks."""
        for name, v in self.sq.items():
            if name.startswith(prefix + "."):
                total(v)
        for name, acc in self.fused.items():
            if name.startswith(prefix + "."):
                for v in acc.values():
                    total(v)

    def result(self, prefix: str | None = None) -> dict[str, torch.Tensor]:
        """{param name: ‖X_j‖₂}; prefix: only the weights under that module (one decoder layer)."""
        if prefix is not None:
            keep = lambda n: n.startswith(prefix + ".")
            return {k: v for k, v in self.result().items() if keep(k)}
        sq = dict(self.sq)
        for prefix, acc in self.fused.items():  # experts never routed over all passes use their fallback sums
            unrouted = (acc["n"] == 0)[:, None]
            sq[f"{prefix}.gate_up_proj"] = torch.where(unrouted, acc["gu_all"], acc["gu"])
            sq[f"{prefix}.down_proj"] = torch.where(unrouted, acc["dn_all"], acc["dn"])
        out = {k: v.sqrt() for k, v in sq.items()}
        for prefix, (layer, x) in self.deferred.items():
            pending = (self.fused[prefix]["n"] == 0).nonzero().flatten().tolist()
            out[f"{prefix}.down_proj"] = DeferredNorms(out[f"{prefix}.down_proj"], pending, layer, x)
        return out


# -- anything else on the routes ----------------------------------------------------------------------------
class OnRoute(Collector):
    """Calls fn(RouteEvent) for every MoE layer of every forward."""

    def __init__(self, fn: Callable[[RouteEvent], None]) -> None:
        self.fn = fn

    def on_route(self, ev: RouteEvent) -> None:
        self.fn(ev)


@torch.no_grad()
def input_norms(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                batch_size: int = 8, return_cache: bool = False, timing: dict | None = None,
                defer_unrouted: bool = False, cache_in=None):
    """‖X_j‖₂ per input feature of every prunable weight, from dense forwards of `ids` [B, L] (in batches;
    with return_cache, one forward whose KV cache is returned too: -> (norms, cache); `cache_in`: the cache that
    forward fills, where the caller prepared one). `timing`: a dict that receives "hooks_s", the seconds spent
    computing the statistics inside the forward.

    -> {param name: [d_in]} for dense linears; {"...experts.gate_up_proj": [E, H], "...experts.down_proj": [E, I]}
    for fused experts (per expert, over its routed tokens; unrouted experts use all tokens). defer_unrouted (with
    return_cache): the down_proj norms of layers with unrouted experts come as `DeferredNorms` (computed per
    expert when asked)."""
    if defer_unrouted and not return_cache:
        raise ValueError("defer_unrouted is for one prompt's forward (return_cache=True)")
    col = InputNorms(model, defer_unrouted)
    cache = None
    try:
        if return_cache:  # one prompt: keep its KV cache for decoding
            with Observation(model, [col]) as obs:
                obs.attention_mask = attention_mask
                given = {} if cache_in is None else {cache_kwarg(): cache_in}  # (a cache prepared by the caller)
                cache = output_cache(model(input_ids=ids, attention_mask=attention_mask, use_cache=True, **given,
                                           **last_logits(model)))  # (the logits are not read: one position)
        else:  # calibration windows [N, L]: sums over every batch
            run(model, ids, [col], batch_size=batch_size, attention_mask=attention_mask)
    finally:
        if timing is not None:
            timing["hooks_s"] = col.seconds
    norms = col.result()
    return (norms, cache) if return_cache else norms


