"""STUN's expert stage (Lee et al., ACL 2025; code thnkinbtfly/STUN, `merge_weight.py`): cluster the experts of
each layer by behaviour, keep one expert per cluster, with a threshold τ searched so that the total kept over all
layers hits a target. Pure functions over [E, E] matrices; the grain plugs them in.

    distance  router rows (data-free): D = cdist(W_r, W_r) / ‖W_r‖_F  (their default division_by_norm)
              co-selection (calibrated): D = −C / |mean C|, C[i, j] = tokens whose top-k holds both i and j
    cluster   greedy: the closest pair (i, j) still open; join their clusters iff every member of i's cluster is
              under τ from j and every member of j's cluster under τ from i (the pair is closed either way; a
              joined pair closes its members' distances to i and j); stop when no open pair is under τ or only
              E − max_removed clusters are left
    search    τ from `start`, step 0.1 doubled while the total moves one way, halved once it has turned, until the
              total kept equals the target
    keep      per cluster the expert whose flattened weights [gate | up | down] are nearest the cluster's mean
              (from the experts' weight Gram matrix: ‖w_i − c‖² = G_ii − 2·mean_j G_ij + const)

The clustering and the search follow `select_expert_pairs` and the `binary_search_target` loop of their script
statement for statement (argmin over the row-major flattened matrix: the first minimum wins).
"""

from __future__ import annotations

import torch

from ..errors import MumoeError

START, STEP = 0.5, 0.1  # their README's starting threshold and their step
MAX_TRIALS = 200  # thresholds tried before giving up (they stop after 10 trials with an unchanged total)


def router_distance(router_weight: torch.Tensor, by_norm: bool = True) -> torch.Tensor:
    """[E, E] Euclidean distances between router rows (fp32, as they compute them), divided by the router matrix's
    Frobenius norm (`by_norm`). router_weight [E, H]."""
    w = router_weight.detach().float().cpu()
    d = torch.cdist(w, w)
    return d / torch.norm(w) if by_norm else d


def coselect_distance(counts: torch.Tensor) -> torch.Tensor:
    """[E, E] −C / |mean C| from co-selection counts C [E, E] (their `--load_path ... --divide_mean`)."""
    c = counts.detach().float().cpu()
    mean = c.mean().abs()
    if mean == 0:
        raise MumoeError("no token selected two experts together: co-selection distances are undefined")
    return -c / mean


def coselect_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """C [E, E] float64: for every token, +1 at (i, j) and (j, i) for each pair i ≠ j of its selected experts.
    indices [T, k]."""
    T, k = indices.shape
    onehot = torch.zeros(T, num_experts, dtype=torch.float64)
    onehot.scatter_(1, indices.cpu().long(), 1.0)
    c = onehot.T @ onehot  # [E, E]: tokens selecting both (the diagonal: tokens selecting i)
    c.fill_diagonal_(0)
    return c


def cluster(distance: torch.Tensor, threshold: float, max_removed: int) -> list[tuple[int, ...]]:
    """Greedy clustering under `threshold` (their greedy_but_reject_mixed), at least E − max_removed clusters.
    -> clusters as sorted tuples, ordered by their first member."""
    values = distance.clone().float()
    E = values.shape[0]
    values.fill_diagonal_(float("inf"))
    of = {i: {i} for i in range(E)}  # vertex -> its cluster (shared set objects)
    while torch.min(values) < threshold:
        if len({tuple(sorted(s)) for s in of.values()}) <= E - max_removed:
            break
        flat = int(torch.argmin(values.flatten()))
        v1, v2 = divmod(flat, E)
        lengths = [values[c, v2] for c in of[v1]] + [values[c, v1] for c in of[v2]]
        if max(lengths) < threshold:
            union = of[v1] | of[v2]
            for c in of[v1]:
                values[c, v2] = float("inf")
            for c in of[v2]:
                values[c, v1] = float("inf")
            for v in union:
                of[v] = union
        else:
            values[v1, v2] = float("inf")
            values[v2, v1] = float("inf")
    return sorted({tuple(sorted(s)) for s in of.values()})


def search(distances: list[torch.Tensor], target: int, max_removed: list[int], start: float = START,
           step: float = STEP) -> tuple[float, list[list[tuple[int, ...]]]]:
    """τ such that Σ_layers |clusters| == target, by their search: -> (τ, each layer's clusters). Where their search
    ends without it (the total can jump over the target at one τ: their script exits), a bisection between the
    nearest totals above and below it gives the smallest total above the target (fewer experts removed than
    asked, never more); a one-line error if no τ tried lies on each side."""
    total = sum(d.shape[0] for d in distances)
    if not min(d.shape[0] - m for d, m in zip(distances, max_removed)) >= 1 or target > total:
        raise MumoeError(f"cannot keep {target} of {total} experts")

    def at(t: float) -> tuple[int, list]:
        clusters = [cluster(d, t, m) for d, m in zip(distances, max_removed)]
        return sum(len(c) for c in clusters), clusters

    threshold, last, turned, seen, tried = start, 0, False, [], {}
    for _ in range(MAX_TRIALS):
        n, clusters = at(threshold)
        if n == target:
            return threshold, clusters
        tried[threshold] = n
        direction = -1 if n < target else 1
        seen.append(n)
        if len(seen) > 10 and min(seen[-10:]) == max(seen[-10:]):  # their stop: ten trials, one total
            break
        if last * direction < 0:
            turned = True
        step = step / 2 if turned else step * 2
        threshold += step * direction
        last = direction
    above = [t for t, n in tried.items() if n > target]  # too many kept: τ too low
    a = max(above) if above else None
    later = [t for t, n in tried.items() if n < target and a is not None and t > a]
    if not later:
        raise MumoeError(f"STUN's threshold search found no τ keeping {target} of {total} experts (totals tried: "
                         f"{sorted(set(seen))}); try another ratio")
    b = min(later)
    for _ in range(60):  # the breakpoint between a (above the target) and b (below)
        mid = (a + b) / 2
        n, clusters = at(mid)
        if n == target:
            return mid, clusters
        a, b = (mid, b) if n > target else (a, mid)
    return a, at(a)[1]


TIE = 1e-9  # relative to the cluster's largest squared norm: distances this close are equal


def representatives(clusters: list[tuple[int, ...]], gram: torch.Tensor) -> list[int]:
    """Per cluster the member nearest the mean of the members' flattened weights, from the Gram matrix G [E, E] of
    the experts' flattened weights: ‖w_i − c‖² = G_ii − (2/n)·Σ_j G_ij + ‖c‖². Equal distances (always, in a
    cluster of two: both members are equidistant from their mean) go to the lowest expert id — the authors' code
    leaves that tie to fp32 rounding."""
    g = gram.double()
    kept = []
    for members in clusters:
        m = torch.tensor(members)
        sub = g[m][:, m]  # [n, n]
        d = sub.diagonal() - 2 * sub.mean(1)  # ‖w_i − c‖² − ‖c‖²
        near = d <= d.min() + TIE * sub.diagonal().abs().max()
        kept.append(int(m[near][0]))
    return kept


def expert_gram(layer, block_bytes: int = 64 << 20) -> torch.Tensor:
    """G [E, E] float64: dot products of the experts' flattened [gate | up | down] weights, summed over column
    blocks of the flattened weights (each block of all E experts in float64 at most `block_bytes`): every weight
    is converted once and the whole layer is never held in float64."""
    gu, down = layer.experts.gate_up_proj, layer.experts.down_proj  # [E, 2I, H], [E, H, I]
    E = gu.shape[0]
    out = torch.zeros(E, E, dtype=torch.float64)
    step = max(1, block_bytes // (8 * E))
    with torch.no_grad():
        for t in (gu, down):
            flat = t.reshape(E, -1)  # [E, n] (a view)
            for a in range(0, flat.shape[1], step):
                x = flat[:, a:a + step].double().cpu()  # [E, ≤step]
                out += x @ x.T
    return out


# -- the expert grain's view: per-layer features, then one rule over all layers ------------------------------
def router_features(layer) -> dict[str, torch.Tensor]:
    """The data-free variant's features of one layer: router-row distances and the experts' weight Gram."""
    return {"distance": router_distance(layer.router_weight[: layer.num_experts]),  # routed rows (not identity)
            "gram": expert_gram(layer)}


def coselect_features(st) -> dict[str, torch.Tensor]:
    """The calibrated variant's features of one layer (`LayerStats`): co-selection distances from the tokens' top-k
    router logits (their top-2 of the softmax, for a top-2 model) and the experts' weight Gram."""
    E = st.layer.num_experts
    index = torch.cat([i.reshape(-1, i.shape[-1]).cpu() for i in st.pool_index]) if st.pool_index else \
        torch.zeros(0, st.layer.top_k, dtype=torch.long)
    return {"distance": coselect_distance(coselect_counts(index, E)), "gram": expert_gram(st.layer)}


def keep_rule(layers, features: list[dict], ratio: float) -> tuple[dict[int, list[int]], dict[int, list[list[int]]]]:
    """Kept experts per layer and the clusters they stand for: round(ratio·ΣE) experts removed over all layers
    (τ searched), at least top_k left in every layer."""
    if any(layer.fixed_routing for layer in layers):
        raise MumoeError("STUN clusters every layer's experts at once; layers that pick experts from a fixed token "
                         "table (hash routing) cannot lose any: use a per-layer expert method")
    total = sum(layer.num_experts for layer in layers)
    target = total - round(ratio * total)
    _, clusters = search([f["distance"] for f in features], target, [layer.num_experts - layer.top_k for layer in layers])
    keep = {layer.index: sorted(representatives(c, f["gram"])) for layer, c, f in zip(layers, clusters, features)}
    return keep, {layer.index: [list(x) for x in c] for layer, c in zip(layers, clusters)}
