"""Scores of calibrated methods from a layer-sequential sweep over a checkpoint (the model is never loaded).

Same collectors and the same score functions as `score_methods`; each layer is scored while its weights are
resident, right after its statistics are complete (summed over data-parallel ranks first). Orders:
    one-shot      every layer observed on the unpruned model (what `score_methods` gives)
    progressive   layer ℓ is scored, pruned, and its pruned outputs feed layer ℓ+1 (llm-compressor's REAP order
                  for expert criteria; the Wanda authors' own order for Wanda) — still one sweep
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import MumoeError
from ..models import adapter_for
from ..observe.collectors import AtomStats, ExpertStats, InputNorms, MergeStats
from ..observe.layerwise import LayerwiseCheckpoint
from ..observe.sequential import SweepInfo, WorkDir, all_cat, all_max, all_sum, sweep
from . import check_tokens, get_method, merge_scores


@dataclass
class LayerwiseScores:
    """What a sweep produced: per-MoE-layer scores of each method (decoder-layer order), the expert keep sets
    chosen on the way (progressive order), Wanda's input norms (masks are made from them at export)."""

    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    keep: dict[int, object] = field(default_factory=dict)  # expert ids, or each expert's kept atoms
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_index: list[int] = field(default_factory=list)  # decoder-layer index of each MoE layer
    info: SweepInfo | None = None


def score_layerwise(ckpt: LayerwiseCheckpoint, names: list[str], calib: torch.Tensor,
                    groups: torch.Tensor | None = None, *, batch_size: int = 8, progress: bool = False,
                    order: str = "one-shot", select: Callable | None = None,
                    prune_layer: Callable | None = None, work: WorkDir | None = None,
                    spill_bytes: int = 8 << 30, attention_mask: torch.Tensor | None = None) -> LayerwiseScores:
    """Scores of every named calibrated method in one layer-sequential sweep of `ckpt`.

    order="progressive" (one method): after layer ℓ is scored, `select(layer, score) -> keep` chooses its keep
    set (expert grain) and `prune_layer(ℓ, module, state)` prunes the resident layer in place; its outputs are
    recomputed for layer ℓ+1. A merge method's `select` (given when its plan needs the layer's weights) makes the
    layer's plan in either order."""
    methods = [get_method(n) for n in names]
    for m in methods:
        if not m.needs_calib:
            raise MumoeError(f"{m.name} needs no calibration; the layer-sequential sweep is for calibrated methods")
    if order == "progressive" and len(methods) != 1:
        raise MumoeError("progressive order scores one method at a time")
    model = ckpt.model
    adapter = adapter_for(model)
    layers = adapter.moe_layers()
    by_index = {layer.index: layer for layer in layers}
    expert_m = [m for m in methods if m.from_stats is not None]
    atom_m = [m for m in methods if m.from_atoms is not None]
    merge_m = [m for m in methods if m.from_merge is not None]
    wanda = any(m.from_norms is not None for m in methods)
    if (expert_m or atom_m or merge_m) and not layers:
        raise MumoeError(f"{model.config.model_type} has no routed experts; {methods[0].name} needs an MoE model")
    backward = any(m.needs_backward for m in atom_m)
    experts = ExpertStats(layers, any(m.needs_expert_outputs for m in expert_m),
                          n_groups=1 if groups is None else int(groups.max()) + 1) if expert_m else None
    atoms = AtomStats(layers, backward=backward, gated=any(m.atom_gated for m in atom_m)) if atom_m else None
    norms = InputNorms(model) if wanda else None
    merging = MergeStats(layers, outputs=any("outputs" in m.merge_stats for m in merge_m),
                         pairwise=any("pairwise" in m.merge_stats for m in merge_m),
                         ream=any("ream" in m.merge_stats for m in merge_m)) if merge_m else None
    layer_names = {j: n for j, n in enumerate(ckpt.layer_names())}

    def forward_done(j: int) -> dict | None:
        out: dict = {}
        if experts is not None and j in by_index:
            experts.reduce(j, all_sum, all_cat)
            st = experts.stats[j].to("cpu")
            out["scores"] = {m.name: m.from_stats(st) for m in expert_m}
            experts.stats[j] = type(st)(st.layer)  # free the pools
        if merging is not None and j in by_index:
            merging.reduce(j, all_sum, all_cat)
            st = merging.take(j)
            check_tokens([st.n_tokens], [j])
            out.setdefault("scores", {}).update({m.name: merge_scores(m, st) for m in merge_m})
        if atoms is not None and not backward and j in by_index:
            out.setdefault("scores", {}).update(atom_layer(j))
        if norms is not None:
            norms.reduce(layer_names[j], all_sum)
            out["norms"] = {k: v.cpu() for k, v in norms.result(layer_names[j]).items()}
        if select is not None and j in by_index and (methods[0] in merge_m or (
                order == "progressive" and methods[0] in expert_m + atom_m)):
            # the layer's selection while its weights are resident (the merge grain: its plan, every order)
            out["keep"] = select(by_index[j], out["scores"][methods[0].name])
        for m in merge_m:  # the activation samples served the plan: not kept for the layers after
            out.get("scores", {}).get(m.name, {}).pop("acts", None)
        return out or None

    def atom_layer(j: int) -> dict:
        layer = by_index[j]
        atoms.reduce(layer, all_sum, all_max)
        st = atoms.stats[j].to("cpu")
        res = {m.name: m.from_atoms(layer, st) for m in atom_m}
        del atoms.stats[j]
        return res

    def backward_done(j: int) -> dict | None:
        return {"scores": atom_layer(j)} if j in by_index else None

    results: dict = {}

    def modify(j: int) -> bool:
        if order != "progressive" or prune_layer is None:
            return False
        return prune_layer(j, model.get_submodule(layer_names[j]), results.get(j) or {})

    # on_layer's result is stored by the sweep into `results` before modify runs
    info = sweep(ckpt, calib, [c for c in (experts, norms, merging) if c is not None] + (
                     [atoms] if atoms is not None and not backward else []),
                 [atoms] if backward else [], batch_size=batch_size, groups=groups, on_layer=forward_done,
                 on_layer_backward=backward_done if backward else None, modify=modify,
                 spill_bytes=spill_bytes, work=work, progress=progress, results=results,
                 attention_mask=attention_mask)
    out = LayerwiseScores(layer_index=[layer.index for layer in layers], info=info)
    for m in methods:
        if m not in expert_m and m not in atom_m and m not in merge_m:  # weight scores: made from the norms at export
            continue
        key = (lambda j: ("bwd", j)) if m in atom_m and backward else (lambda j: j)
        out.scores[m.name] = [results[key(layer.index)]["scores"][m.name] for layer in layers]
    for j, res in results.items():
        if isinstance(j, int) and "keep" in res:
            out.keep[j] = res["keep"]
        if isinstance(j, int) and "norms" in res:
            out.norms.update(res["norms"])
    from . import check_scores

    check_scores(out.scores, out.layer_index)
    return out

