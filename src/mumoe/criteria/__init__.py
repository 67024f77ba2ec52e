"""Pure scoring functions: statistics + weights -> one score tensor per MoE layer.

Each method is registered with how it is read (higher = keep, or prune the highest), its grain and whether it
needs calibration data. Any set of calibrated methods shares one observation pass (`score_methods`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import MumoeDataError, MumoeError
from . import camera, expert, heapr, stun
from . import merge as merge_features
from . import weight as weight_scores
from .stats import LayerStats


@dataclass(frozen=True)
class Method:
    """One scoring method: its grain, how its scores are read, and the one function that computes them (the
    field that is set says which statistics it needs). Everything a driver asks of a method is a field here;
    no code outside this registry compares method names."""

    name: str
    grain: str  # a name in mumoe.grains.GRAINS
    needs_calib: bool
    prune_highest: bool
    description: str
    from_stats: Callable[[LayerStats], torch.Tensor] | None = None  # calibrated: LayerStats -> [E]
    from_weights: Callable | None = None  # calibration-free: MoELayer -> [E]
    needs_expert_outputs: bool = False
    from_seed: Callable | None = None  # (layers, seed) -> one [E] per layer (a baseline)
    from_atoms: Callable | None = None  # (MoELayer, AtomLayerStats | None) -> [E, I]
    needs_backward: bool = False  # its atom statistics need the loss gradient (one backward pass)
    atom_gated: bool = False  # its atom statistics need the gated activations' squared sums and maxima (CAMERA-P)
    weigh: Callable | None = None  # atom grain: (one layer's score parts, AtomPart) -> [E, I] (CAMERA-P's λ)
    defaults: dict = field(default_factory=dict)  # grain options it runs with unless asked otherwise (atom grain)
    keep_rule: Callable | None = None  # expert grain: (layers, per-layer features, ratio) -> (keep, clusters)
    from_norms: Callable | None = None  # (weight, input norms) -> the weight's scores (weight grain)
    from_weight: Callable | None = None  # (weight) -> the weight's scores (weight grain, calibration-free)
    from_files: Callable | None = None  # (checkpoint folder, progress) -> {layer: [E]}, the model never loaded
    from_merge: Callable | None = None  # merge grain: MergeLayerStats -> {name: tensor} (the grouping's features)
    merge_stats: tuple[str, ...] = ()  # merge grain: the costly statistics it needs ("outputs", "pairwise")
    group: Callable | None = None  # merge grain: (features + "freq", M, seed) -> M groups of expert ids
    merge_budget: Callable | None = None  # merge grain: (counts per layer, ratio, top_ks) -> M per layer (global)
    operator: str = "average"  # merge grain: "average", "svd", "aligned" (REAM), "recombine" (DERN)
    align: Callable | None = None  # merge grain: (MoELayer, features, groups) -> each expert's neuron order [E, I]
    plan_layer: Callable | None = None  # merge grain: (MoELayer, features, M, MergePart) -> the layer's whole plan
    default_order: str = "one-shot"  # the scoring order when none is asked for
    progressive: bool | None = None  # may score layer by layer on the pruned earlier layers (None: if calibrated)
    structures: tuple[str, ...] | None = None  # weight grain: the --structure values it takes (None: every one)
    notes: dict[str, str] = field(default_factory=dict)  # grain option value -> a line the CLI prints

    @property
    def may_progress(self) -> bool:
        return self.needs_calib if self.progressive is None else self.progressive


def random_scores(layers, seed: int | None = 0) -> list[torch.Tensor]:
    """Seeded uniform scores, one generator per call so results do not depend on global RNG state."""
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    return [torch.rand(layer.num_experts, generator=gen, dtype=torch.float64) for layer in layers]


def _aimer_files(path, progress: bool):
    from .aimer_stream import stream_aimer

    return stream_aimer(path, progress)


def _stun_files(path, progress: bool):
    from ..observe.layerwise import weights_from_files

    return weights_from_files(path, stun.router_features, progress)


HEAPR_NOTES = {"uniform": "the uniform form: every expert keeps its best atoms at one width (an HF checkpoint); the "
                          "paper's method is the global ranking: --form global --scope global",
               "global": "the paper's form: one global ranking of atoms"}

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("random", "expert", False, False, "seeded random expert scores (baseline)", from_seed=random_scores),
    Method("aimer", "expert", False, True, "AIMER: ‖w‖₁/(√N‖w‖₂) from weights alone; prunes the highest",
           from_weights=expert.aimer, from_files=_aimer_files),
    Method("frequency", "expert", True, False, "how often the router selects the expert", expert.frequency),
    Method("gate", "expert", True, False, "gate score: summed combine weights (soft count)", expert.gate_score),
    Method("ean", "expert", True, False, "EAN: summed output norm over routed tokens", expert.ean,
           needs_expert_outputs=True),
    Method("reap", "expert", True, False, "REAP: mean g·‖f‖ over routed tokens", expert.reap,
           needs_expert_outputs=True),
    Method("man", "expert", True, False, "MAN: mean ‖f‖ over routed tokens", expert.man,
           needs_expert_outputs=True),
    Method("msan", "expert", True, False, "MSAN: mean ‖f‖² over routed tokens", expert.msan,
           needs_expert_outputs=True),
    Method("easy-ep", "expert", True, False, "EASY-EP: g·‖f‖ weighted by the residual-stream change",
           expert.easy_ep, needs_expert_outputs=True),
    Method("stun", "expert", False, False, "STUN's expert stage: experts clustered by router-row distance (τ searched "
           "for the budget over all layers), the one nearest each cluster's mean kept", from_weights=stun.router_features,
           from_files=_stun_files, keep_rule=stun.keep_rule, progressive=False),
    Method("stun-coselect", "expert", True, False, "STUN's expert stage with co-selection distances (tokens choosing "
           "both experts)", stun.coselect_features, keep_rule=stun.keep_rule, progressive=False),
    Method("tcess", "expert", True, False, "PreMoe TCESS (v1): mean arg-max router logit", expert.tcess),
    Method("peu", "expert", True, False, "PreMoe PEU (v3): thresholded pool scores", expert.peu),
    Method("heapr", "atom", True, False, "HEAPr: E[h²]·E[(∂L/∂h)²] per expert neuron (forward + backward)",
           from_atoms=heapr.heapr, needs_backward=True, notes=HEAPR_NOTES),
    Method("heapr-token", "atom", True, False, "HEAPr per-token variant: E[h²·(∂L/∂h)²]",
           from_atoms=heapr.heapr_token, needs_backward=True, notes=HEAPR_NOTES),
    Method("camera-p", "atom", True, False, "CAMERA-P: ‖down[:, k]‖²·[(1−λ)Σ(g·h)² + λ·max (g·h)²] per expert "
           "neuron (forward only), ranked per layer, layer by layer on the pruned layers before",
           from_atoms=camera.camera_parts, atom_gated=True, weigh=camera.weigh, defaults={"form": "global", "scope": "layer", "order": "progressive"},
           notes={"uniform": "the uniform form: every expert keeps its best atoms at one width (an HF checkpoint); "
                             "the paper's form ranks a layer's atoms together: --form global --scope layer"}),
    Method("atom-act", "atom", True, False, "atom baseline: E[h²]·‖down[:, k]‖²", from_atoms=heapr.atom_act),
    Method("atom-magnitude", "atom", False, False, "atom baseline: weight norm of the neuron's rows/column",
           from_atoms=heapr.atom_magnitude),
    Method("wanda", "weight", True, False, "Wanda: |W|·‖X‖ per weight (row, N:M or column structure)",
           from_norms=weight_scores.wanda, progressive=True),
    Method("magnitude", "weight", False, False, "magnitude: |W| with one threshold per matrix",
           from_weight=weight_scores.magnitude, structures=("row",)),
    Method("hc-smoe", "merge", True, False, "HC-SMoE: experts' mean outputs over all tokens, average-linkage "
           "clusters, frequency-weighted average", from_merge=merge_features.hc_smoe, merge_stats=("outputs",),
           group=merge_features.group_by_linkage),
    Method("m-smoe", "merge", True, False, "M-SMoE: most-used experts dominant (one threshold over all layers), "
           "the others join the most similar by router logits; frequency-weighted average",
           from_merge=merge_features.msmoe, group=merge_features.group_by_dominance,
           merge_budget=merge_features.msmoe_counts),
    Method("sub-moe", "merge", True, False, "Sub-MoE: K-means on the experts' output cosine similarity, joint-SVD "
           "subspace merge (--rank; full rank = the frequency-weighted average)", from_merge=merge_features.sub_moe,
           merge_stats=("pairwise",), group=merge_features.group_by_kmeans, operator="svd"),
    Method("ream", "merge", True, False, "REAM: the most salient experts (REAP) are centroids, each takes up to 15 "
           "nearest by gated outputs and router logits; neurons aligned (Hungarian), saliency-weighted average; "
           "layer by layer on the merged layers before", from_merge=merge_features.ream, merge_stats=("ream",),
           group=merge_features.group_by_ream, operator="aligned", align=merge_features.align_ream,
           default_order="progressive"),
    Method("dern", "merge", True, False, "DERN (our reading): the least used experts dropped, each of their neurons "
           "merged into the most similar neuron of a kept expert (cosine ≥ --alpha), usage-weighted",
           from_merge=merge_features.dern, plan_layer=merge_features.plan_dern, operator="recombine"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MumoeError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def methods_of(grain: str) -> list[str]:
    """The registered methods of one grain, by name."""
    return [n for n, m in METHODS.items() if m.grain == grain]


def score_methods(model, names: list[str], calib: torch.Tensor | None, groups: torch.Tensor | None = None,
                  seed: int | None = None, batch_size: int = 8, progress: bool = False, layers=None,
                  device=None) -> dict[str, object]:
    """Scores of every named method from ONE observation pass (one-shot: every layer observed on the model as it
    is). The collectors the methods need are attached together: expert statistics (with expert outputs if any
    method reads them), HEAPr atom statistics (forward + backward if any method needs gradients), Wanda input
    norms. -> name: per MoE layer [E] (expert grain) or [E, I] (atom grain); weight grain: {param: scores}.
    groups: [N] calibration source of each window (EASY-EP normalizes per source)."""
    from ..models import adapter_for, moe_adapter_for
    from ..observe.collectors import AtomStats, ExpertStats, InputNorms, MergeStats
    from ..observe.runner import run

    methods = [get_method(n) for n in names]
    if layers is None:  # methods of routed experts need them: one clear line for a dense model
        needs_moe = any(m.from_norms is None and m.from_weight is None for m in methods)
        layers = moe_adapter_for(model).moe_layers() if needs_moe else adapter_for(model).moe_layers()
    calibrated = [m for m in methods if m.needs_calib]
    if calibrated and calib is None:
        raise MumoeError(f"method {calibrated[0].name!r} needs calibration data (--calib PATH)")
    experts = ExpertStats(layers, any(m.needs_expert_outputs for m in calibrated),
                          n_groups=1 if groups is None else int(groups.max()) + 1)
    atoms = AtomStats(layers, backward=any(m.needs_backward for m in calibrated),
                      gated=any(m.atom_gated for m in calibrated))
    norms = InputNorms(model)
    merging = [m for m in calibrated if m.from_merge is not None]
    means = MergeStats(layers, outputs=any("outputs" in m.merge_stats for m in merging),
                       pairwise=any("pairwise" in m.merge_stats for m in merging),
                       ream=any("ream" in m.merge_stats for m in merging))
    collectors = ([experts] if any(m.from_stats is not None for m in calibrated) else []) + (
        [atoms] if any(m.from_atoms is not None for m in calibrated) else []) + (
        [norms] if any(m.from_norms is not None for m in calibrated) else []) + (
        [means] if merging else [])
    if collectors:
        run(model, calib, collectors, batch_size=batch_size, progress=progress, layers=layers, groups=groups,
            device=device)
    stats = experts.result() if experts in collectors else None
    atom_st = atoms.result() if atoms in collectors else [None] * len(layers)
    params = dict(model.named_parameters())
    out: dict[str, object] = {}
    for m in methods:
        if m.from_seed is not None:
            out[m.name] = m.from_seed(layers, seed)
        elif m.from_weights is not None:
            out[m.name] = [m.from_weights(layer) for layer in layers]
        elif m.from_stats is not None:
            out[m.name] = [m.from_stats(st) for st in stats]
        elif m.from_atoms is not None:
            out[m.name] = [m.from_atoms(layer, st) for layer, st in zip(layers, atom_st)]
        elif m.from_norms is not None:
            out[m.name] = {n: m.from_norms(params[n], v) for n, v in norms.result().items()}
        elif m.from_merge is not None:  # features to group, and the routed counts that weight the merge
            res = means.result()
            check_tokens([st.n_tokens for st in res], [layer.index for layer in layers])
            out[m.name] = [merge_scores(m, st) for st in res]
        else:
            from ..models.prunable import prunable_names

            out[m.name] = {n: m.from_weight(params[n]) for n in prunable_names(model)}
    if stats is not None:
        check_tokens([st.n_tokens for st in stats], [layer.index for layer in layers])
    return check_scores(out, [layer.index for layer in layers])


def merge_scores(m: Method, st) -> dict[str, torch.Tensor]:
    """A merge method's per-layer scores: its features and the routed counts that weight the merge (CPU)."""
    return {**{k: v.cpu() for k, v in m.from_merge(st).items()}, "freq": st.freq.cpu()}


def check_tokens(counts: list[int], layer_index: list[int]) -> None:
    """Calibration that routed no token through a MoE layer scores every expert 0 there: refuse it."""
    empty = [j for j, n in zip(layer_index, counts) if n == 0]
    if empty:
        raise MumoeDataError(f"calibration saw no tokens at MoE layer(s) {', '.join(map(str, empty))}; every score "
                             "there would be 0 — give calibration text (--calib) with at least one window")


def check_scores(scores: dict[str, object], layer_index: list[int]) -> dict[str, object]:
    """scores unchanged, or a one-line MumoeDataError naming the method and layer (or parameter) whose scores
    hold NaN or inf: selecting on them would prune at random, silently."""
    for name, per in scores.items():
        items = per.items() if isinstance(per, dict) else zip((f"MoE layer {j}" for j in layer_index), per)
        for where, s in items:
            if isinstance(s, dict):  # several tensors per layer (the merge grain's features and counts)
                s = torch.cat([v.flatten().double() for v in s.values() if isinstance(v, torch.Tensor)])
            if isinstance(s, torch.Tensor) and s.is_floating_point() and s.numel() and not bool(torch.isfinite(s).all()):
                raise MumoeDataError(f"{name} scores of {where} are not finite (NaN or inf): the activations "
                                     "overflowed or the weights are corrupt; try --dtype fp32, or check the checkpoint")
    return scores
