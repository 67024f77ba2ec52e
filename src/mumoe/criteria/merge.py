"""Merge-grain methods (pure functions): statistics -> features, features -> groups of experts merged into one,
and the per-layer merged counts of a global budget.

Features (one dict per MoE layer, from `observe.collectors.MergeLayerStats`):
    hc_smoe           HC-SMoE: each expert's mean output over ALL calibration tokens, [E, H]
    sub_moe           Sub-MoE: 1 − the mean over tokens of the cosine similarity of two experts' outputs, [E, E]
    msmoe             M-SMoE: (cos + 1)/2 of two experts' router-logit columns over the calibration tokens, [E, E]
    ream              REAM: saliency [E], distance 1 − similarity [E, E], the activation sample (`criteria.ream`)
Groupings ((features, M, seed) -> M groups, each its sorted member ids, ordered by their smallest member):
    average_linkage   HC-SMoE: agglomerative clustering, Euclidean distance, average linkage
    kmeans            Sub-MoE: K-means (k-means++ seeding, 10 restarts, the lowest inertia) on the rows
    dominant          M-SMoE: the M most used experts are dominant; every other joins its most similar dominant one
    (REAM's pseudo-grouping and neuron alignment: `criteria.ream`; DERN's segment assignment: `criteria.dern`)
Budgets:
    msmoe_counts      M-SMoE: one usage threshold over all layers (non-uniform counts, the average kept)
"""

from __future__ import annotations

import math

import torch

from ..errors import MumoeError
from ..observe.collectors import MergeLayerStats

Groups = list[list[int]]


# -- features ------------------------------------------------------------------------------------------------
def hc_smoe(st: MergeLayerStats) -> dict[str, torch.Tensor]:
    """o_i = (1/T) Σ_t E_i(x_t) over every calibration token (every expert run on every token). -> [E, H]"""
    return {"features": st.mean()}


def sub_moe(st: MergeLayerStats) -> dict[str, torch.Tensor]:
    """Rows of the distance matrix 1 − S, S_ij = (1/T) Σ_t cos(E_i(x_t), E_j(x_t)) (every expert on every
    token), S_ii = 1; the K-means points, as the Sub-MoE re-implementation clusters them. -> [E, E]"""
    S = st.mean_cosine().clone()
    S.fill_diagonal_(1.0)
    return {"features": 1.0 - S}


def msmoe(st: MergeLayerStats, eps: float = 1.1920928955078125e-07) -> dict[str, torch.Tensor]:
    """(cos + 1)/2 between expert i's and j's router-logit columns over the calibration tokens, from the Gram
    matrix G = Σ_t l_t l_tᵀ: cos_ij = G_ij / (max(√G_ii, ε)·max(√G_jj, ε)), ε the fp32 machine epsilon. -> [E, E]"""
    norms = st.gram.diagonal().clamp(min=0).sqrt().clamp(min=eps)  # [E] ‖column‖
    cos = st.gram / (norms[:, None] * norms[None, :])
    return {"similarity": (cos + 1) / 2}


def ream(st: MergeLayerStats) -> dict[str, torch.Tensor]:
    """REAM's features: its saliency (also the merge weights), the distance 1 − similarity [E, E] and the neuron
    activations [E, N, I] the alignment reads (dropped once the layer's plan is made)."""
    from . import ream as r

    sal = r.saliency(st.sal, st.freq)
    dist = 1 - r.similarity(st.gated / max(st.n_tokens, 1), st.gram)
    return {"saliency": sal, "distance": dist, "merge_weights": sal, "acts": st.activations()}


# -- groupings -----------------------------------------------------------------------------------------------
def _canonical(clusters) -> Groups:
    return sorted((sorted(int(i) for i in c) for c in clusters if len(c)), key=lambda c: c[0])


def average_linkage(features: torch.Tensor, M: int) -> Groups:
    """Agglomerative clustering of the rows of features [E, D] into M clusters: start from singletons, merge the
    two clusters with the smallest average pairwise Euclidean distance between their members until M remain
    (ties: the pair whose smaller members come first). -> clusters, each its sorted member ids, ordered by their
    smallest member."""
    E = features.shape[0]
    if not 1 <= M <= E:
        raise MumoeError(f"cannot group {E} experts into {M}")
    x = features.double()
    sums = torch.cdist(x, x)  # [E, E] sums of member distances between clusters (singletons: the distances)
    sizes = torch.ones(E, dtype=torch.float64)
    alive = torch.ones(E, dtype=torch.bool)
    clusters: list[list[int]] = [[i] for i in range(E)]
    upper = torch.ones(E, E, dtype=torch.bool).triu(1)
    for _ in range(E - M):
        avg = sums / torch.outer(sizes, sizes)  # average linkage
        valid = upper & alive[:, None] & alive[None, :]
        avg = torch.where(valid, avg, torch.full_like(avg, float("inf")))
        flat = int(torch.argmin(avg))  # first minimum in row-major order: ties go to the smallest (a, b)
        a, b = divmod(flat, E)  # a < b: b joins a (a keeps the cluster's smallest member)
        sums[a, :] += sums[b, :]
        sums[:, a] += sums[:, b]
        sizes[a] += sizes[b]
        alive[b] = False
        clusters[a] = sorted(clusters[a] + clusters[b])
    return [clusters[a] for a in range(E) if alive[a]]


def _kmeans_once(x: torch.Tensor, M: int, gen: torch.Generator, iters: int) -> tuple[float, torch.Tensor]:
    """One Lloyd run from a greedy k-means++ seeding (each next centre: the best of 2 + ⌊ln M⌋ candidates drawn
    with probability ∝ D², the one that lowers the potential most). x [E, D] float64 -> (inertia, labels [E])."""
    E = x.shape[0]
    trials = 2 + int(math.log(M))
    first = int(torch.randint(E, (1,), generator=gen))
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(-1)  # [E] squared distance to the nearest centre
    for _ in range(1, M):
        total = float(d2.sum())
        if total > 0:
            cand = torch.multinomial(d2 / total, trials, replacement=True, generator=gen)  # [trials]
            new_d2 = torch.minimum(d2[None, :], torch.cdist(x[cand], x) ** 2)  # [trials, E]
            best = int(new_d2.sum(1).argmin())
            nxt, d2 = int(cand[best]), new_d2[best]
        else:  # every point sits on a centre (identical experts): the first not yet a centre
            taken = {int(torch.nonzero((x == c).all(-1))[0]) for c in centers}
            nxt = next(i for i in range(E) if i not in taken)
        centers.append(x[nxt])
    c = torch.stack(centers)  # [M, D]
    labels = torch.full((E,), -1, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, c) ** 2  # [E, M]
        new = dist.argmin(1)  # ties: the lower cluster
        counts = torch.bincount(new, minlength=M)
        for k in torch.nonzero(counts == 0).flatten().tolist():  # an empty cluster takes the farthest point
            own = dist.gather(1, new[:, None])[:, 0]
            movable = counts[new] > 1
            far = int(torch.where(movable, own, torch.full_like(own, -1.0)).argmax())
            counts[new[far]] -= 1
            new[far], counts[k] = k, 1
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([x[labels == k].mean(0) for k in range(M)])
    inertia = float(((x - c[labels]) ** 2).sum())
    return inertia, labels


def kmeans(features: torch.Tensor, M: int, seed: int | None = 0, n_init: int = 10, iters: int = 300) -> Groups:
    """K-means of the rows of features [E, D] into M non-empty clusters: k-means++ seeding (a seeded generator),
    Lloyd iterations until the assignment is stable, the run of lowest inertia of `n_init` (ties: the first).
    -> clusters, each its sorted member ids, ordered by their smallest member."""
    E = features.shape[0]
    if not 1 <= M <= E:
        raise MumoeError(f"cannot group {E} experts into {M}")
    x = features.double()
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    best: tuple[float, torch.Tensor] | None = None
    for _ in range(n_init):
        run = _kmeans_once(x, M, gen, iters)
        if best is None or run[0] < best[0] - 1e-12:
            best = run
    labels = best[1]
    return _canonical([torch.nonzero(labels == k).flatten().tolist() for k in range(M)])


def dominant(similarity: torch.Tensor, freq: torch.Tensor, M: int) -> Groups:
    """M-SMoE's grouping: the M most used experts (routed counts; ties to the lower id) are the dominant ones;
    every other expert joins the dominant expert of highest similarity (ties: the more used one)."""
    E = similarity.shape[0]
    if not 1 <= M <= E:
        raise MumoeError(f"cannot group {E} experts into {M}")
    order = torch.sort(freq.double(), descending=True, stable=True).indices.tolist()
    cores = order[:M]
    members: dict[int, list[int]] = {c: [c] for c in cores}
    for i in order[M:]:
        sims = similarity[i, cores]
        members[cores[int(sims.argmax())]].append(i)  # argmax: the first maximum, the most used core
    return _canonical(members.values())


def group_by_linkage(s: dict, M: int, seed: int | None) -> Groups:
    return average_linkage(s["features"], M)


def group_by_kmeans(s: dict, M: int, seed: int | None) -> Groups:
    return kmeans(s["features"], M, seed)


def group_by_dominance(s: dict, M: int, seed: int | None) -> Groups:
    return dominant(s["similarity"], s["freq"], M)


def group_by_ream(s: dict, M: int, seed: int | None) -> Groups:
    from . import ream as r

    return r.groups(s["saliency"], s["distance"], M)


def align_ream(layer, s: dict, groups: Groups) -> torch.Tensor:
    """REAM's neuron order of every expert [E, I] from its activation sample and the layer's weights."""
    from . import ream as r

    with torch.no_grad():
        wfeat = r.weight_features(layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach())
        return r.alignment(groups, s.get("acts"), wfeat)


def dern(st: MergeLayerStats) -> dict[str, torch.Tensor]:
    """DERN reads only the routed counts (added to every merge method's scores); its plan reads the weights."""
    return {}


def plan_dern(layer, s: dict, M: int, part) -> dict:
    """DERN's plan of one layer (`criteria.dern`): the M most used experts kept, every dropped segment assigned
    to its most similar kept segment at similarity ≥ α, the routed counts as the merge coefficients."""
    from . import dern as d

    kept = d.kept_experts(s["freq"], M)
    alpha = d.ALPHA if part.alpha is None else part.alpha
    with torch.no_grad():
        targets, _ = d.assign(layer.experts.gate_up_proj.detach().cpu(), layer.experts.down_proj.detach().cpu(),
                              kept, alpha)
    groups, weights = d.record(targets, kept, s["freq"])
    return {"groups": tuple(tuple(g) for g in groups), "weights": tuple(tuple(w) for w in weights),
            "perm": targets, "coef": s["freq"].double().cpu()}


# -- budgets -------------------------------------------------------------------------------------------------
def msmoe_counts(freqs: list[torch.Tensor], ratio: float, top_ks: list[int]) -> list[int]:
    """M-SMoE's global budget: usage u = f / Σf per layer; each layer's top_k most used experts set to 1 (every
    layer keeps at least top_k: M-SMoE's own floor is one, its bound router allows fewer than k); all layers'
    u sorted together, the threshold is the (L·M̄ + 1)-th largest (M̄ = E − round(ratio·E), the uniform count)
    and a layer keeps its experts with u above it. -> merged count per layer (their mean ≤ M̄: ties at the
    threshold keep fewer)."""
    if ratio == 0:
        return [len(f) for f in freqs]
    usage = []
    for f, k in zip(freqs, top_ks):
        u = f.double() / f.double().sum() if float(f.sum()) > 0 else torch.zeros(len(f), dtype=torch.float64)
        top = torch.sort(u, descending=True, stable=True).indices[:k]
        u = u.clone()
        u[top] = 1.0
        usage.append(u)
    total = sum(len(f) - round(ratio * len(f)) for f in freqs)
    ranked = torch.sort(torch.cat(usage), descending=True).values
    threshold = float(ranked[total]) if total < len(ranked) else -1.0
    if threshold >= 1.0:
        raise MumoeError(f"ratio {ratio} keeps fewer merged experts than top_k in some layer: lower the ratio")
    return [int((u > threshold).sum()) for u in usage]
