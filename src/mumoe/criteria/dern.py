"""DERN (Zhou et al., EMNLP 2025 Findings, "Dropping Experts, Recombining Neurons"; no public code): pure
functions for our reading of its three steps, written out here because the paper gives no code.

Per MoE layer, with f_e = expert e's routed count on the calibration tokens:

    drop       keep the M = E − round(ratio·E) experts with the largest f (ties: the lower id); drop the others
    segments   every neuron n of an expert e is one segment: a_{e,n} = [gate_e[n, :] | up_e[n, :] | down_e[:, n]]
               (length 3H; GPT-OSS-style biases travel with their neuron)
    assign     each segment of a dropped expert goes to the kept segment (r, k) of highest cosine similarity over
               all kept experts' segments (fp32), if that similarity is ≥ α (`--alpha`, default 0.4); otherwise
               it is discarded
    merge      each kept segment becomes the usage-weighted mean of itself and the segments assigned to it:
               a'_{r,k} = (f_r·a_{r,k} + Σ_{(d,n)→(r,k)} f_d·a_{d,n}) / (f_r + Σ f_d) — the gate row, up row, down
               column and their biases; a kept expert's output bias and router row stay its own

The plan per layer is `targets` [E, I]: for every source segment the flat index r·I + k of the kept segment it
merges into (a kept segment: its own; −1: discarded), and the coefficients f [E]. `apply.merge.recombine` applies
it, in memory and in the streamed export alike.
"""

from __future__ import annotations

import torch

from ..errors import MumoeError

ALPHA = 0.4  # the default similarity threshold


def kept_experts(freq: torch.Tensor, M: int) -> list[int]:
    """The M most used experts (routed counts; ties to the lower id), ascending."""
    E = freq.shape[0]
    if not 1 <= M <= E:
        raise MumoeError(f"cannot keep {M} of {E} experts")
    return sorted(torch.sort(freq.double(), descending=True, stable=True).indices[:M].tolist())


def segments(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """[n, 2I, H] gate_up and [n, H, I] down -> every neuron's unit-norm segment vector [n, I, 3H] (float32)."""
    I = down.shape[-1]
    a = torch.cat([gate_up[:, :I].float(), gate_up[:, I:].float(), down.float().transpose(1, 2)], dim=2)
    return a / a.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def assign(gate_up: torch.Tensor, down: torch.Tensor, kept: list[int], alpha: float = ALPHA,
           budget: int = 64 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (targets [E, I] long: the flat kept segment r·I + k each source segment merges into, −1 if discarded;
    best [E, I] the cosine similarity of that best match (fp32), 1 for kept segments). The similarities of the
    dropped experts' segments to all kept segments are computed in blocks of experts of about `budget` bytes
    each (never all [D·I, M·I] at once)."""
    E, I, H = gate_up.shape[0], down.shape[-1], down.shape[1]
    M = len(kept)
    targets = torch.full((E, I), -1, dtype=torch.long)
    best = torch.ones(E, I, dtype=torch.float32)
    slot = {e: g for g, e in enumerate(kept)}
    for e in kept:
        targets[e] = slot[e] * I + torch.arange(I)
    dropped = [d for d in range(E) if d not in slot]
    step = max(1, budget // (I * 3 * H * 4))  # experts per block of segments
    for a in range(0, len(dropped), step):
        ds = dropped[a:a + step]
        q = segments(gate_up[ds], down[ds]).reshape(len(ds) * I, -1)  # [d·I, 3H]
        val = torch.full((len(ds) * I,), -float("inf"))
        idx = torch.zeros(len(ds) * I, dtype=torch.long)
        for b in range(0, M, step):
            ks = kept[b:b + step]
            sim = q @ segments(gate_up[ks], down[ks]).reshape(len(ks) * I, -1).T  # [d·I, k·I] cosines
            v, i = sim.max(dim=1)  # the first maximum: ties to the lower kept expert / neuron
            better = v > val  # strictly: an earlier block keeps a tie
            val, idx = torch.where(better, v, val), torch.where(better, i + b * I, idx)
        best[ds] = val.reshape(len(ds), I)
        targets[ds] = torch.where(val >= alpha, idx, torch.full_like(idx, -1)).reshape(len(ds), I)
    return targets, best


def record(targets: torch.Tensor, kept: list[int], freq: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """pruning.json's view of a recombination: per kept expert (exported order) its id then the dropped experts
    that gave it at least one segment (ascending), with their usage shares f / Σ f over that list."""
    I = targets.shape[1]
    groups = []
    for g, r in enumerate(kept):
        into = (targets >= g * I) & (targets < (g + 1) * I)  # [E, I]
        donors = [d for d in torch.nonzero(into.any(1)).flatten().tolist() if d != r]
        groups.append([r] + donors)
    f = freq.double()
    weights = []
    for g in groups:
        total = float(f[g].sum())
        weights.append([float(f[i]) / total if total > 0 else 1.0 / len(g) for i in g])
    return groups, weights
