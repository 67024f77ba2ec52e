"""Expert merging applied: each group of experts becomes one expert. Router policies:

    centroid  one router row (and bias) per merged expert, the weighted average of its members' rows: a standard
              compact checkpoint every engine loads
    bound     all E router rows kept; the router picks its top-k among the E as before and each pick is mapped
              to its member's merged expert (`expert_map`), so two picked members of one group add their gates —
              the papers' evaluation setting; mumoe's own form (`mumoe.load`, or transformers with
              trust_remote_code)

The expert tensors are merged by the plan's operator:

    average   W = Σ w_i W_i (gate, up, down and their biases), w_i = f_i / Σ f over the group
    svd       Sub-MoE's subspace merge, per matrix: [W_1 … W_n] = U Σ Vᵀ (concatenated along the input
              dimension), Vᵀ split into per-expert column blocks V_iᵀ, V_mᵀ = Σ w_i V_iᵀ, W = U_r Σ_r V_{m,r}ᵀ at
              rank r (None: full). At full rank U Σ V_iᵀ = W_i, so the result is the weighted average.
    aligned   REAM: each member's neurons first put in the order the plan's permutation gives (member neuron
              perm[r] becomes neuron r: gate/up rows, down columns, their biases), then the weighted average;
              the merged expert's router row is its first member's (the centroid's), not an average.
    recombine DERN: not groups but single neurons: every source neuron merges into the kept neuron the plan's
              `targets` name (or is discarded), each kept neuron the f-weighted mean of itself and what it
              received (`recombine`); kept experts keep their own router rows and output biases.

The same pure functions serve the loaded model (`merge_layer`) and the streamed export (`merge_transform`), so
the two agree tensor for tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MumoeError
from ..models import MoELayer, moe_adapter_for
from ..models.keys import EXPERT_BIAS, FUSED, KIND, LEGACY, router_axis, unchanged
from .experts import slice_layer

EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")  # [E, ...] each
OPERATORS = ("average", "svd", "aligned", "recombine")
ROUTERS = ("centroid", "bound")
GROUP_LIMITED = "merging is not available for group-limited routers (DeepSeek-V3 n_group) yet"


def expert_map(groups: list[list[int]], E: int) -> list[int]:
    """map[e] = the merged expert (group position) expert e belongs to."""
    out = [-1] * E
    for g, members in enumerate(groups):
        for e in members:
            out[e] = g
    return out


def _bound_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    # the router's picks [T, k] in the E source experts -> the merged experts they belong to
    mapping = torch.tensor(self.mumoe_expert_map, dtype=torch.long, device=top_k_index.device)  # [E]
    return super(type(self), self).forward(hidden_states, mapping[top_k_index], top_k_weights, *args, **kwargs)


def bind_experts(experts: nn.Module, mapping: list[int]) -> None:
    """Make a (merged) experts module take the router's picks among the E source experts: every pick is mapped
    through `mapping` [E] before the experts run (`mumoe_expert_map`, a plain attribute: nothing in the state
    dict; the class becomes a subclass of its own whose forward maps the indices — parameter names unchanged)."""
    experts.mumoe_expert_map = tuple(int(m) for m in mapping)
    cls = type(experts)
    if not getattr(cls, "_mumoe_bound", False):
        experts.__class__ = type(f"Bound{cls.__name__}", (cls,), {"forward": _bound_forward, "_mumoe_bound": True})


def svd_merge(mats: torch.Tensor, w: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """Sub-MoE's subspace merge of n matrices mats [n, out, in] with weights w [n] -> [out, in] (float64).

    With [W_1 … W_n] = U Σ Vᵀ and V_iᵀ = Σ⁻¹ Uᵀ W_i, the merge U_r Σ_r (Σ w_i V_iᵀ)_r is U_r U_rᵀ W̄, W̄ = Σ w_i W_i:
    the weighted average projected onto the top-r left singular subspace of the concatenation. So full rank is
    W̄ itself, and rank r needs only U_r — the top-r eigenvectors of Σ_i W_i W_iᵀ [out, out] — not an SVD of the
    [out, n·in] concatenation (tested against that SVD)."""
    n, o, i = mats.shape
    avg = (mats.double() * w.double().view(n, 1, 1)).sum(0)  # W̄ [out, in]
    if rank is None or rank >= min(o, n * i):
        return avg
    gram = torch.einsum("noi,npi->op", mats.double(), mats.double())  # Σ_i W_i W_iᵀ [out, out]
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    top = vecs[:, -rank:]  # U_r [out, r]
    return top @ (top.T @ avg)


def align_rows(t: torch.Tensor, perm: torch.Tensor, kind: str) -> torch.Tensor:
    """Members' tensors t [n, ...] with each member's neurons reordered: perm [n, I] (row r of member i is its
    neuron perm[i, r]). kind names where the neuron axis is: "gate_up" ([n, 2I, H]) and "gate_up_bias" ([n, 2I]):
    both halves; "rows" ([n, I, H]: a per-expert gate or up matrix); "cols" ([n, H, I]: down); "vector" and
    "router": no neuron axis (unchanged)."""
    n = t.shape[0]
    perm = perm.to(t.device)
    if kind in ("gate_up", "gate_up_bias"):
        half = t.shape[1] // 2
        return t[torch.arange(n, device=t.device)[:, None], torch.cat([perm, perm + half], 1)]
    if kind == "rows":
        return t[torch.arange(n, device=t.device)[:, None], perm]
    if kind == "cols":
        return t.gather(2, perm[:, None, :].expand(n, t.shape[1], perm.shape[1]))
    return t


def merge_rows(t: torch.Tensor, w: list[float], operator: str = "average", rank: int | None = None,
               kind: str = "cols", perm: torch.Tensor | None = None) -> torch.Tensor:
    """One group's tensor from its members' t [n, ...] (same dtype as t). kind: "gate_up" (fused [n, 2I, H]:
    the gate and up halves merged apart, as the per-expert layout is), "rows" / "cols" (matrices [n, out, in]
    whose neurons are rows / columns), "gate_up_bias", "vector" (other biases: always the weighted average) or
    "router" (router rows: the weighted average; the first member's under the aligned operator). perm [n, I]:
    the aligned operator's neuron order of each member."""
    if operator not in OPERATORS:
        raise MumoeError(f"unknown merge operator {operator!r}; available: {', '.join(OPERATORS)}")
    if operator == "aligned":
        if kind == "router":
            return t[0].clone()
        if perm is not None:
            t = align_rows(t, perm, kind)
    coef = torch.tensor(w, dtype=torch.float64, device=t.device)
    if operator != "svd" or kind in ("vector", "router", "gate_up_bias") or t.dim() != 3:
        merged = torch.zeros(t.shape[1:], dtype=torch.float64, device=t.device)
        for i in range(t.shape[0]):  # one member at a time in fp64: never the group's n copies at once
            merged += float(coef[i]) * t[i].double()
    elif kind == "gate_up":
        half = t.shape[1] // 2
        merged = torch.cat([svd_merge(t[:, :half], coef, rank), svd_merge(t[:, half:], coef, rank)])
    else:
        merged = svd_merge(t, coef, rank)
    return merged.to(t.dtype)


def recombine(t: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, kept: list[int], kind: str
              ) -> torch.Tensor:
    """DERN's merge of one tensor kind of one layer: t [E, ...] (`align_rows`' kinds) -> [M, ...], M = len(kept).
    Kept neuron j = r·I + k becomes Σ_s c_s a_s / Σ_s c_s over itself and every source neuron s with
    targets[s] = j (c = the source expert's coef); a neuron whose weights sum to 0 keeps its own. "vector" and
    "router" tensors: the kept experts' own rows. Computed one kept expert at a time (fp64 of one expert)."""
    if kind in ("vector", "router"):
        return t[kept].clone()
    E, I = targets.shape
    if kind in ("gate_up", "gate_up_bias"):
        half = t.shape[1] // 2
        return torch.cat([recombine(t[:, :half], targets, coef, kept, "rows"),
                          recombine(t[:, half:], targets, coef, kept, "rows")], dim=1)
    x = t.transpose(1, 2) if kind == "cols" else t  # [E, I, ...] neurons on axis 1 (a view)
    flat = x.reshape(E * I, -1) if x.is_contiguous() else x.contiguous().reshape(E * I, -1)  # [E·I, D]
    idx = targets.reshape(-1).to(t.device)
    c = coef.double().to(t.device)[:, None].expand(E, I).reshape(-1)  # [E·I] each neuron's expert's coef
    out = torch.empty(len(kept), I, flat.shape[1], dtype=t.dtype, device=t.device)
    for g, r in enumerate(kept):  # one kept expert at a time: its own neurons and those merged into them, fp64
        sel = torch.nonzero((idx >= g * I) & (idx < (g + 1) * I)).flatten()
        pos = idx[sel] - g * I
        num = torch.zeros(I, flat.shape[1], dtype=torch.float64, device=t.device).index_add_(
            0, pos, flat[sel].double() * c[sel, None])
        den = torch.zeros(I, dtype=torch.float64, device=t.device).index_add_(0, pos, c[sel])
        own = flat[r * I:(r + 1) * I].double()
        out[g] = torch.where(den[:, None] > 0, num / den.clamp(min=1e-300)[:, None], own).to(t.dtype)
    out = out.reshape(len(kept), I, *x.shape[2:])
    return out.transpose(1, 2).contiguous() if kind == "cols" else out


def check_groups(index: int, E: int, groups: list[list[int]]) -> None:
    if sorted(i for g in groups for i in g) != list(range(E)):
        raise MumoeError(f"layer {index}: merge groups must cover the {E} experts once each, got {groups}")


KINDS = {"gate_up_proj": "gate_up", "down_proj": "cols", "gate_up_proj_bias": "gate_up_bias",
         "down_proj_bias": "vector"}  # the fused expert tensors' neuron axes (`align_rows`)


@torch.no_grad()
def merge_layer(layer: MoELayer, groups: list[list[int]], weights: list[list[float]], operator: str = "average",
                rank: int | None = None, router: str = "centroid", perm: torch.Tensor | None = None,
                coef: torch.Tensor | None = None, inplace: bool = False) -> None:
    """Merge one MoE layer in place: group g (member ids, groups ordered by their first member) becomes expert g,
    its tensors merged by `operator` with the group's weights (summing to 1); router rows averaged (centroid) or
    all kept and mapped onto the merged experts (bound). perm [E, I]: the aligned operator's neuron order of
    every source expert, or the recombine operator's targets (with coef [E]: each expert's weight). inplace: the
    merged experts moved within the existing tensors (`slice_layer`'s inplace: a layer about to be freed, as in
    the layer-sequential sweep)."""
    E = layer.num_experts
    if layer.n_group and layer.n_group > 1:
        raise MumoeError(GROUP_LIMITED)
    if router not in ROUTERS:
        raise MumoeError(f"unknown router policy {router!r}; available: {', '.join(ROUTERS)}")
    if operator == "recombine":
        kept = [g[0] for g in groups]
        for name in EXPERT_TENSORS:
            t = getattr(layer.experts, name, None)
            if t is not None:
                t.data[kept] = recombine(t.data, perm, coef, kept, KINDS[name])
        slice_layer(layer, kept, inplace=inplace)
        return
    check_groups(layer.index, E, groups)
    parts = [(layer.experts, name, 0, KINDS[name]) for name in EXPERT_TENSORS]
    parts += [(rt.module, rt.name, rt.dim, "router") for rt in layer.router_tensors] if router == "centroid" else []
    for g, w in zip(groups, weights):
        if len(g) == 1:
            continue
        for module, name, dim, kind in parts:
            t = getattr(module, name, None)
            if t is None:
                continue
            data = t.data.movedim(dim, 0)  # a view: [E, ...]
            data[g[0]].copy_(merge_rows(data[g], w, operator, rank, kind, None if perm is None else perm[g]))
    # each group's first slot now holds its merged expert
    slice_layer(layer, [g[0] for g in groups], inplace=inplace, router=router == "centroid")
    if router == "bound":
        bind_experts(layer.experts, expert_map(groups, E))


def merge_experts(model: nn.Module, groups: dict[int, list[list[int]]], weights: dict[int, list[list[float]]],
                  operator: str = "average", rank: int | None = None, router: str = "centroid",
                  perms: dict[int, torch.Tensor] | None = None, coefs: dict[int, torch.Tensor] | None = None
                  ) -> None:
    """Merge every MoE layer named in `groups`; the config's expert count set when every layer ends equal (and
    the router is centroid: a bound router keeps the source count, its number of rows). perms: per layer, the
    aligned operator's neuron order of every source expert [E, I] (recombine: its targets, with coefs [E])."""
    adapter = moe_adapter_for(model)
    for layer in adapter.moe_layers():
        if layer.index in groups:
            merge_layer(layer, groups[layer.index], weights[layer.index], operator, rank, router,
                        (perms or {}).get(layer.index), (coefs or {}).get(layer.index))
    counts = {layer.num_experts for layer in adapter.moe_layers()}
    if len(counts) == 1 and router == "centroid":
        adapter.set_num_experts(counts.pop())


def bind_layers(model: nn.Module, slots: dict[int, list[int]], maps: dict[int, list[int]]) -> None:
    """A bound merge rebuilt on a freshly built model (`mumoe.load` of the export): each layer in `maps` keeps
    the expert slots `slots[layer]` (its router all rows) and maps the router's picks through `maps[layer]`."""
    for layer in moe_adapter_for(model).moe_layers():
        if layer.index in maps:
            slice_layer(layer, slots[layer.index], router=False)
            bind_experts(layer.experts, maps[layer.index])


def merge_transform(groups: dict[int, list[list[int]]], weights: dict[int, list[list[float]]],
                    operator: str = "average", rank: int | None = None, router: str = "centroid",
                    *, routers: dict[str, tuple[int, int, int]], rename=unchanged,
                    perms: dict[int, torch.Tensor] | None = None, coefs: dict[int, torch.Tensor] | None = None):
    """The streamed export of a merge (`apply.stream.write_streamed`): fused expert tensors and (centroid) routing
    tensors (`models.keys.router_axis`: [E, ...] on their expert axis) become [M, ...]; per-expert matrices
    (legacy layouts) wait until every member of their group has been read (at most one layer's matrices of one
    kind), then leave as expert g's. A bound router is written as it is. perms: as `merge_experts`."""
    where = {j: {e: (g, pos) for g, members in enumerate(gs) for pos, e in enumerate(members)}
             for j, gs in groups.items()}
    pending: dict[tuple, dict[int, torch.Tensor]] = {}
    perms = perms or {}

    def order(j: int, g: list[int]) -> torch.Tensor | None:
        return perms[j][g] if j in perms else None

    def merged(j: int, t: torch.Tensor, kind: str) -> torch.Tensor:
        if operator == "recombine":
            return recombine(t, perms[j], coefs[j], [g[0] for g in groups[j]], kind)
        check_groups(j, t.shape[0], groups[j])
        return torch.stack([t[g[0]] if len(g) == 1 else merge_rows(t[g], w, operator, rank, kind, order(j, g))
                            for g, w in zip(groups[j], weights[j])])

    def transform(key: str, read):
        if (m := LEGACY.match(key)) and int(m["layer"]) in groups and operator == "recombine":
            j, e = int(m["layer"]), int(m["e"])  # all E matrices of this kind, then the M recombined ones
            slot = pending.setdefault((j, m["pre"], m["kind"]), {})
            slot[e] = read()
            if len(slot) < perms[j].shape[0]:
                return []
            del pending[(j, m["pre"], m["kind"])]
            t = torch.stack([slot[i] for i in range(len(slot))])  # [E, out, in]
            out = merged(j, t, "cols" if KIND[m["kind"]] == "down_proj" else "rows")
            return [(f"{m['pre']}.{g}.{m['kind']}.weight", out[g]) for g in range(out.shape[0])]
        if (m := LEGACY.match(key)) and int(m["layer"]) in groups:
            j, e = int(m["layer"]), int(m["e"])
            g, pos = where[j][e]
            members = groups[j][g]
            if len(members) == 1:
                return [(f"{m['pre']}.{g}.{m['kind']}.weight", read())]
            slot = pending.setdefault((j, m["pre"], m["kind"], g), {})
            slot[pos] = read()
            if len(slot) < len(members):
                return []
            del pending[(j, m["pre"], m["kind"], g)]
            t = torch.stack([slot[p] for p in range(len(members))])  # [n, out, in]
            kind = "cols" if KIND[m["kind"]] == "down_proj" else "rows"
            return [(f"{m['pre']}.{g}.{m['kind']}.weight",
                     merge_rows(t, weights[j][g], operator, rank, kind, order(j, members)))]
        view = rename(key)  # the family's own key renames on loading (`models.keys.checkpoint_renamer`)
        if (m := FUSED.match(view)) and int(m["layer"]) in groups:
            return [(key, merged(int(m["layer"]), read(), KINDS[m["kind"]]))]
        if (m := EXPERT_BIAS.match(view)) and int(m["layer"]) in groups:  # the experts' biases (GPT-OSS)
            return [(key, merged(int(m["layer"]), read(), KINDS[m["kind"]]))]
        if router == "centroid" and (r := router_axis(view, routers)) and r[0] in groups:
            t = read().movedim(r[1], 0)
            E = t.shape[0] - r[2]  # (identity experts' entries after the routed ones kept: `RouterTensor.tail`)
            t = torch.cat([merged(r[0], t[:E], "router"), t[E:]])
            return [(key, t.movedim(0, r[1]).contiguous())]
        return [(key, read())]

    return transform
