"""REAM (2026; code SamsungSAILMontreal/ream): pure functions for its grouping and its neuron alignment.

Per MoE layer, from `observe.collectors.MergeLayerStats` (ream=True) and the layer's weights:

    saliency   s_i = mean over the tokens routed to i of p_i(t)²·‖f_i(x_t)‖, p = softmax of the raw router logits
               over all E (the authors' REAP on outputs already scaled by p); an expert no token chose gets
               min(0.5, the smallest non-zero s) so it can still be merged
    similarity ½[(cos(ō_i, ō_j) + 1)/2 + (1 − d_ij / max d)], ō_i = the mean over ALL calibration tokens of
               p_i(t)·f_i(x_t), d_ij = ‖l̂_i − l̂_j‖ between the L2-normalized router-logit columns l_i [T]
    groups     the M most salient experts are centroids; in order of saliency each takes up to C − 1 (C = 16)
               of the nearest experts not yet assigned (distance 1 − similarity) until every expert has one
    alignment  each member's neurons matched one-to-one to its centroid's (Hungarian matching, scipy's
               `linear_sum_assignment`) on the cost cdist(activations) + cdist(weights): activations = each
               neuron's h over the same calibration tokens, L2-normalized; weights = each neuron's [gate row |
               up row | down column], L2-normalized, projected on the top 64 principal directions of all the
               layer's neurons (scaled by their singular values), normalized again
    merge      the aligned members averaged with weights s_i / Σ_group s (`apply.merge`, operator "aligned");
               the merged expert keeps its centroid's router row

Differences from the authors' code, each deliberate: their activation sample is drawn per expert with its own
random permutation of the tokens (so the activation cost compares different tokens); here every expert's
activations are on the same first `ACT_TOKENS` tokens. Their PCA is `torch.pca_lowrank` (randomized); here it
is exact (eigenvectors of the covariance). Their saliency is a mean per calibration batch, averaged over
batches; here one mean over all routed tokens (equal with one batch).
"""

from __future__ import annotations

import torch

from ..errors import MumoeDataError, MumoeError

GROUP_SIZE = 16  # C: the most experts one merged expert takes (its centroid included)
PCA_DIM = 64  # the weight features' dimension
EPS = 1e-8  # the authors' normalize_rows epsilon


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of x scaled to unit norm: x / (‖x‖ + 1e-8)."""
    return x / (torch.linalg.norm(x, dim=-1, keepdim=True) + EPS)


def saliency(sal_sum: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """s_i = Σ_routed p_i²‖f_i‖ / (times i was routed) [E]; zeros (never routed) -> min(0.5, the smallest
    non-zero s)."""
    s = sal_sum.double() / freq.double().clamp(min=1)
    zero = s == 0
    if bool(zero.all()):
        raise MumoeDataError("REAM: every expert's saliency is 0 at this layer (no token routed, or all-zero "
                             "outputs); give calibration text with tokens")
    if bool(zero.any()):
        s = s.clone()
        s[zero] = min(0.5, float(s[~zero].min()))
    return s


def similarity(gated_mean: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """REAM's expert similarity [E, E] from the mean gated outputs ō [E, H] and the router-logit Gram matrix
    G = Σ_t l_t l_tᵀ [E, E]: ½[(cos(ō_i, ō_j) + 1)/2 + 1 − d_ij / max d], d_ij = ‖l_i/(‖l_i‖+ε) − l_j/(‖l_j‖+ε)‖."""
    o = gated_mean.double()
    dots = o @ o.T
    n = o.norm(dim=-1)
    cos = dots / (n[:, None] * n[None, :]).clamp(min=EPS)  # torch's cosine_similarity: a·b / max(‖a‖‖b‖, ε)
    sim_out = (cos + 1) / 2
    g = gram.double()
    norm = g.diagonal().clamp(min=0).sqrt() + EPS  # [E] ‖l_i‖ + ε
    c = g / (norm[:, None] * norm[None, :])  # l̂_i·l̂_j
    sq = c.diagonal()
    d = (sq[:, None] + sq[None, :] - 2 * c).clamp(min=0).sqrt()  # [E, E] ‖l̂_i − l̂_j‖
    top = float(d.max())
    sim_gate = 1 - (d / top if top > 0 else d)
    return (sim_out + sim_gate) / 2


def groups(sal: torch.Tensor, distance: torch.Tensor, M: int, C: int = GROUP_SIZE) -> list[list[int]]:
    """REAM's pseudo-grouping: centroids = the M most salient experts (ties: the lower id); in saliency order each
    centroid takes the nearest unassigned experts (ties: the lower id) until its group has C members or none is
    left. -> M groups, each [centroid, then its other members ascending], ordered by centroid id."""
    E = sal.shape[0]
    if not 1 <= M <= E:
        raise MumoeError(f"cannot group {E} experts into {M}")
    if M * C < E:
        raise MumoeError(f"REAM groups at most {C} experts into one: {E} experts need at least {-(-E // C)} "
                         f"merged experts per layer, the ratio leaves {M}")
    order = torch.sort(sal.double(), descending=True, stable=True).indices.tolist()
    centroids = order[:M]
    owner = [-1] * E
    for c in centroids:
        owner[c] = c
    for c in centroids:
        if min(owner) >= 0:
            break
        taken = 1
        for i in torch.sort(distance[c].double(), stable=True).indices.tolist():
            if taken >= C:
                break
            if owner[i] == -1:
                owner[i] = c
                taken += 1
    return [[c] + [i for i in range(E) if owner[i] == c and i != c] for c in sorted(centroids)]


def neuron_vectors(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Each neuron's weights [gate row | up row | down column]: gate_up [n, 2I, H], down [n, H, I] -> [n, I, 3H]
    (float32)."""
    I = down.shape[-1]
    return torch.cat([gate_up[:, :I].float(), gate_up[:, I:].float(), down.float().transpose(1, 2)], dim=2)


def weight_features(gate_up: torch.Tensor, down: torch.Tensor, r: int = PCA_DIM, budget: int = 64 << 20
                    ) -> torch.Tensor:
    """The alignment's weight features [E, I, r']: every neuron's normalized [gate | up | down] vector, centred and
    projected on the top r' = min(r, 3H, E·I) principal directions, each scaled by its singular value (exact PCA
    from the covariance [3H, 3H], accumulated a few experts at a time: about `budget` bytes of float64 rows)."""
    E, I = gate_up.shape[0], down.shape[-1]
    D = 3 * gate_up.shape[2]
    chunk = max(1, budget // (I * D * 8))
    total, count = torch.zeros(D, dtype=torch.float64), 0
    for s in range(0, E, chunk):
        x = _normalize(neuron_vectors(gate_up[s:s + chunk], down[s:s + chunk]).cpu()).reshape(-1, D).double()
        total += x.sum(0)
        count += x.shape[0]
    mean = total / count
    cov = torch.zeros(D, D, dtype=torch.float64)
    for s in range(0, E, chunk):
        x = _normalize(neuron_vectors(gate_up[s:s + chunk], down[s:s + chunk]).cpu()).reshape(-1, D).double() - mean
        cov += x.T @ x
    vals, vecs = torch.linalg.eigh(cov)  # ascending
    k = min(r, D, count)
    proj = vecs[:, -k:].flip(1) * vals[-k:].flip(0).clamp(min=0).sqrt()  # [D, k] V_r·diag(σ_r)
    out = []
    for s in range(0, E, chunk):
        x = _normalize(neuron_vectors(gate_up[s:s + chunk], down[s:s + chunk]).cpu()).double()  # [c, I, D]
        out.append(((x - mean) @ proj))
    return torch.cat(out)  # [E, I, k]


def assignment(cost: torch.Tensor) -> torch.Tensor:
    """The one-to-one matching of minimal total cost of a square cost matrix [I, I] (Hungarian: scipy's
    linear_sum_assignment): -> col [I], row r matched to column col[r]."""
    from scipy.optimize import linear_sum_assignment

    _, col = linear_sum_assignment(cost.double().cpu().numpy())
    return torch.as_tensor(col, dtype=torch.long)


def alignment(groups_: list[list[int]], acts: torch.Tensor | None, wfeat: torch.Tensor | None) -> torch.Tensor:
    """Every expert's neuron order [E, I]: identity for the centroids (each group's first member) and singletons;
    a member's row r = its neuron matched to the centroid's neuron r by the cost cdist(â_c, â_m) + cdist(ŵ_c, ŵ_m)
    over acts [N, E, I] (each neuron's activations over N tokens; normalized when N > 1) and wfeat [E, I, r]
    (normalized); either may be None (left out of the cost)."""
    E, I = acts.shape[1:] if acts is not None else wfeat.shape[:2]
    perm = torch.arange(I).repeat(E, 1)
    for g in groups_:
        if len(g) == 1:
            continue
        c = g[0]
        a_c = w_c = None
        if acts is not None:
            a_c = acts[:, c].T.double()  # [I, N]
            a_c = _normalize(a_c) if a_c.shape[1] > 1 else a_c
        if wfeat is not None:
            w_c = _normalize(wfeat[c].double())
        for m in g[1:]:
            cost = torch.zeros(I, I, dtype=torch.float64)
            if a_c is not None:
                a_m = acts[:, m].T.double()
                cost += torch.cdist(a_c, _normalize(a_m) if a_m.shape[1] > 1 else a_m)
            if w_c is not None:
                cost += torch.cdist(w_c, _normalize(wfeat[m].double()))
            perm[m] = assignment(cost)
    return perm


def check_available() -> None:
    """REAM's alignment needs scipy: a one-line error before any work when it is missing."""
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        raise MumoeError("ream aligns neurons with scipy's Hungarian matching: pip install 'mumoe[merge]' "
                         "(or pip install scipy)") from None
