"""The Python API: `score` and `prune` (contracts in DESIGN.md)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .apply.experts import remove_experts
from .apply.export import PruneReport
from .criteria import compute_scores, get_method
from .errors import MumoeError
from .models import adapter_for, moe_adapter_for
from .observe.calib import read_text, tokenize, windows
from .select import check_ratio, keep_global, keep_uniform


def layer_summary(entry: dict) -> str:
    """One line per layer: kept count and the dropped experts."""
    dropped = sorted(set(range(entry["num_experts"])) - set(entry["kept"]))
    shown = ", ".join(map(str, dropped[:12])) + (", ..." if len(dropped) > 12 else "")
    return f"  layer {entry['layer']:3d}: kept {len(entry['kept'])}/{entry['num_experts']}  dropped [{shown}]"


def resolve_calib(calib, tokenizer=None, nsamples: int = 128, seqlen: int = 512, seed: int | None = None):
    """calib: LongTensor [N, L] of token ids, a path to a .txt file/folder, or raw text. -> ([N, L], info)"""
    if calib is None:
        return None, {}
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.long, torch.int32, torch.int64):
            raise MumoeError("calib tensor must be integer token ids of shape [N, L]")
        return calib.long(), {"source": "tensor", "nsamples": calib.shape[0], "seqlen": calib.shape[1]}
    is_path = isinstance(calib, Path) or (isinstance(calib, str) and len(calib) < 4096 and (
        Path(calib).exists() or calib == "domain" or calib.startswith("domain:")))
    text, source = (read_text(calib), str(calib)) if is_path else (str(calib), "text")
    if tokenizer is None:
        raise MumoeError("calibration text needs a tokenizer (this model has none); pass token ids [N, L]")
    wins = windows(tokenize(tokenizer, text), seqlen, nsamples, seed)
    return wins, {"source": source, "nsamples": wins.shape[0], "seqlen": wins.shape[1], "seed": seed}


def score(model: nn.Module, method: str, calib=None, seed: int = 0, tokenizer=None, nsamples: int = 128,
          seqlen: int = 512, batch_size: int = 8, progress: bool = False) -> list[torch.Tensor]:
    """Raw criterion values, one tensor [E] per MoE layer (in decoder-layer order)."""
    m = get_method(method)
    layers = moe_adapter_for(model).moe_layers()
    wins, _ = resolve_calib(calib, tokenizer, nsamples, seqlen)
    if m.needs_calib and wins is None:
        raise MumoeError(f"method {method!r} needs calibration data (--calib PATH)")
    if m.grain == "atom":  # one [E, I] tensor per layer
        from .criteria.heapr import atom_scores, collect_atom_stats

        stats = ([None] * len(layers) if not m.needs_calib else
                 collect_atom_stats(model, layers, wins, batch_size, backward=method != "atom-act", progress=progress))
        return [atom_scores(method, layer, st) for layer, st in zip(layers, stats)]
    return compute_scores(m, model, layers, wins, seed, batch_size, progress)


def prune(model: nn.Module, method: str, ratio: float, calib=None, seed: int = 0, budget: str = "uniform",
          tokenizer=None, nsamples: int = 128, seqlen: int = 512, source: str | None = None,
          batch_size: int = 8, order: str = "one-shot", form: str = "uniform", scope: str = "global",
          structure: str = "row", verbose: bool = False) -> PruneReport:
    """Prune `model` in place (expert grain, or atom grain for atom methods) and return what was done.

    ratio: fraction of routed experts removed: in every MoE layer (budget="uniform"), or over all layers
    with one normalized ranking and a per-layer floor of top_k (budget="global": per-layer counts differ, the
    export is in mumoe's own form, loaded by `mumoe.load`).
    order: "one-shot" (default: every layer scored on the unpruned model, as Cerebras REAP and AIMER) or
    "progressive" (layer l scored on the outputs of layers < l already pruned, as llm-compressor's REAP);
    only differs for calibrated criteria with a uniform budget.
    form / scope: atom-grain methods only (see `prune_atoms`); structure: weight-grain only (`prune_weights`,
    where ratio is the sparsity).
    """
    check_ratio(ratio)
    m = get_method(method)
    if m.grain == "weight":
        return prune_weights(model, method, ratio, calib, structure=structure, tokenizer=tokenizer, nsamples=nsamples,
                             seqlen=seqlen, batch_size=batch_size, source=source, verbose=verbose)
    if m.grain == "atom":
        return prune_atoms(model, method, ratio, calib, form=form, scope=scope, tokenizer=tokenizer,
                           nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, source=source, verbose=verbose)
    if budget not in ("uniform", "global"):
        raise MumoeError(f"unknown budget {budget!r}; available: uniform, global")
    adapter = moe_adapter_for(model)
    layers = adapter.moe_layers()
    wins, calib_info = resolve_calib(calib, tokenizer, nsamples, seqlen)
    if m.needs_calib and wins is None:
        raise MumoeError(f"method {method!r} needs calibration data (--calib PATH)")
    if order not in ("one-shot", "progressive"):
        raise MumoeError(f"unknown scoring order {order!r}; available: one-shot, progressive")
    if not m.needs_calib:
        order = "one-shot"  # data-free scores do not depend on earlier layers
    if order == "progressive" and budget != "uniform":
        raise MumoeError("progressive scoring needs the uniform budget")
    if budget == "global" and any(layer.n_group and layer.n_group > 1 for layer in layers):
        raise MumoeError("global budgets are not available for group-limited routers; use --budget uniform")
    t0 = time.perf_counter()
    if order == "progressive":
        scores = []
        for layer in layers:  # score this layer on the model whose earlier layers are already sliced
            s = compute_scores(m, model, [layer], wins, seed, batch_size, progress=verbose)[0]
            scores.append(s)
            remove_experts(model, {layer.index: keep_uniform(s, ratio, layer.top_k, layer.n_group, layer.topk_group,
                                                             m.prune_highest)})
    else:
        scores = compute_scores(m, model, layers, wins, seed, batch_size, progress=verbose)
    if budget == "global":
        kept = keep_global(scores, ratio, [layer.top_k for layer in layers], m.prune_highest)
        keep = {layer.index: k for layer, k in zip(layers, kept)}
    else:
        keep = {layer.index: keep_uniform(s, ratio, layer.top_k, layer.n_group, layer.topk_group, m.prune_highest)
                for layer, s in zip(layers, scores)}
    E0 = len(scores[0])
    report = PruneReport(
        method=method, grain=m.grain, ratio=ratio, budget=budget, scoring_order=order, calibration=calib_info,
        model={"source": source or getattr(model.config, "_name_or_path", ""),
               "model_type": model.config.model_type, "num_experts": E0},
        layers=[{"layer": layer.index, "num_experts": len(s), "kept": keep[layer.index],
                 "scores": [float(v) for v in s]} for layer, s in zip(layers, scores)],
    )
    counts = [len(k) for k in keep.values()] if order == "progressive" else remove_experts(model, keep)
    report.form = "hf" if len(set(counts)) == 1 else "mumoe"
    if verbose:
        dt = time.perf_counter() - t0
        for entry in report.layers:
            print(layer_summary(entry))
        print(f"  scored and sliced in {dt:.2f}s" + ("" if report.form == "hf" else
              "; per-layer expert counts differ: an HF config cannot hold them, so the export is in mumoe's "
              "own form (load it with mumoe.load)"))
    return report


def _config_field(cfg: dict, keys: tuple[str, ...]):
    for c in (cfg, cfg.get("text_config") or {}):
        for key in keys:
            if c.get(key) is not None:
                return c[key]
    return None


def prune_streamed(path: str | Path, ratio: float, out: str | Path, method: str = "aimer", overwrite: bool = False,
                   progress: bool = True, verbose: bool = False) -> PruneReport:
    """Calibration-free expert pruning straight from a checkpoint's safetensors files: the model is never
    loaded; scores come from memory-mapped tensors read one at a time and the pruned checkpoint is written
    shard by shard. Only weight-based methods (AIMER) can run this way."""
    import json

    from .apply.export import check_output_dir
    from .apply.stream import prune_checkpoint, stream_aimer
    from .models.base import EXPERT_COUNT_KEYS, TOP_K_KEYS

    if method != "aimer":
        raise MumoeError(f"only aimer can score from the checkpoint files; {method!r} needs the model loaded")
    check_ratio(ratio)
    check_output_dir(out, overwrite)
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    top_k = _config_field(cfg, TOP_K_KEYS)
    if top_k is None or _config_field(cfg, EXPERT_COUNT_KEYS) is None:
        raise MumoeError(f"{path}: config has no routed experts; expert pruning needs an MoE checkpoint")
    n_group, topk_group = _config_field(cfg, ("n_group",)), _config_field(cfg, ("topk_group",))
    t0 = time.perf_counter()
    scores = stream_aimer(path, progress)
    keep = {L: keep_uniform(s, ratio, int(top_k), n_group, topk_group, prune_highest=True) for L, s in scores.items()}
    t_score = time.perf_counter() - t0
    E0 = len(next(iter(scores.values())))
    report = PruneReport(method=method, grain="expert", ratio=ratio, budget="uniform",
                         model={"source": str(path), "model_type": cfg.get("model_type"), "num_experts": E0},
                         layers=[{"layer": L, "num_experts": len(s), "kept": keep[L], "scores": [float(v) for v in s]}
                                 for L, s in scores.items()])
    if verbose:
        for entry in report.layers:
            print(layer_summary(entry))
        print(f"  scored {len(scores)} layers from the checkpoint files in {t_score:.2f}s (model not loaded)")
    prune_checkpoint(path, out, report, overwrite, progress)
    return report


def prune_atoms(model: nn.Module, method: str, ratio: float, calib=None, form: str = "uniform",
                scope: str = "global", tokenizer=None, nsamples: int = 128, seqlen: int = 512, batch_size: int = 4,
                source: str | None = None, verbose: bool = False) -> PruneReport:
    """Atomic-expert pruning in place (HEAPr and same-grain baselines).

    form="uniform": every expert keeps its best I' = (1 − ratio)·I atoms (multiple of 8); the model stays a
    standard HF model with a narrower expert width. form="global": the lowest `ratio` of all atoms go, ranked
    over all layers (scope="global", HEAPr) or per layer (scope="layer"); widths differ per expert, removed
    atoms are zeroed in memory and the export (mumoe's own form) stores only the kept ones.
    """
    from .apply.atoms import keep_global_atoms, keep_uniform_atoms, mask_atoms, slice_atoms_uniform
    from .criteria.heapr import ATOM_METHODS, atom_scores, collect_atom_stats

    check_ratio(ratio)
    if method not in ATOM_METHODS:
        raise MumoeError(f"unknown atom method {method!r}; known: {', '.join(ATOM_METHODS)}")
    if form not in ("uniform", "global"):
        raise MumoeError(f"unknown form {form!r}; use uniform or global")
    adapter = moe_adapter_for(model)
    layers = adapter.moe_layers()
    wins, calib_info = resolve_calib(calib, tokenizer, nsamples, seqlen)
    t0 = time.perf_counter()
    if method == "atom-magnitude":
        stats = [None] * len(layers)
    else:
        if wins is None:
            raise MumoeError(f"method {method!r} needs calibration data (--calib PATH)")
        stats = collect_atom_stats(model, layers, wins, batch_size, backward=method != "atom-act", progress=verbose)
    scores = [atom_scores(method, layer, st) for layer, st in zip(layers, stats)]  # [E, I] each
    entries = []
    if form == "uniform":
        keeps = [keep_uniform_atoms(s, ratio) for s in scores]
        for layer, k in zip(layers, keeps):
            entries.append({"layer": layer.index, "num_experts": layer.num_experts,
                            "intermediate_size": layer.intermediate_size, "kept_width": k.shape[-1],
                            "experts": [{"expert": e, "kept": k[e].tolist()} for e in range(k.shape[0])]})
        adapter.set_expert_width(keeps[0].shape[-1])
        for layer, k in zip(layers, keeps):
            slice_atoms_uniform(layer, k)
    else:
        masks = keep_global_atoms(scores, ratio, scope)
        for layer, m in zip(layers, masks):
            entries.append({"layer": layer.index, "num_experts": layer.num_experts,
                            "intermediate_size": layer.intermediate_size,
                            "experts": [{"expert": e, "kept": torch.nonzero(m[e]).flatten().tolist()}
                                        for e in range(m.shape[0])]})
            mask_atoms(layer, m)
    report = PruneReport(
        method=method, grain="atom", ratio=ratio, budget=f"{form}" + ("" if form == "uniform" else f"/{scope}"),
        calibration=calib_info, form="hf" if form == "uniform" else "mumoe-atoms",
        model={"source": source or getattr(model.config, "_name_or_path", ""),
               "model_type": model.config.model_type, "num_experts": layers[0].num_experts},
        layers=entries)
    if verbose:
        for e in entries:
            widths = [len(x["kept"]) for x in e["experts"]]
            print(f"  layer {e['layer']:3d}: kept atoms per expert {min(widths)}..{max(widths)} of "
                  f"{e['intermediate_size']} (total {sum(widths)}/{e['intermediate_size'] * len(widths)})")
        print(f"  scored and applied in {time.perf_counter() - t0:.2f}s")
    return report


def prune_weights(model: nn.Module, method: str, ratio: float, calib=None, structure: str = "row", tokenizer=None,
                  nsamples: int = 128, seqlen: int = 512, batch_size: int = 8, source: str | None = None,
                  verbose: bool = False) -> PruneReport:
    """Weight-grain pruning in place: Wanda (|W|·‖X‖ from calibration windows; structures row, N:M, column) or
    magnitude (one threshold per matrix) on every linear of the decoder layers and every routed expert
    (per expert, from its routed tokens); embeddings, lm_head, routers untouched. ratio = sparsity."""
    from .testtime.masks import apply_masks, input_norms, magnitude_mask, masks_from_norms, prunable_names

    check_ratio(ratio)
    adapter_for(model)
    wins, calib_info = resolve_calib(calib, tokenizer, nsamples, seqlen)
    t0 = time.perf_counter()
    if method == "wanda":
        if wins is None:
            raise MumoeError("method 'wanda' needs calibration data (--calib PATH)")
        masks = masks_from_norms(model, input_norms(model, wins, batch_size=batch_size), 1 - ratio, structure)
    else:
        if structure != "row":
            raise MumoeError("magnitude pruning has one threshold per matrix; --structure applies to wanda")
        params = dict(model.named_parameters())
        masks = {n: magnitude_mask(params[n], ratio) for n in prunable_names(model)}
    apply_masks(model, masks)
    report = PruneReport(
        method=method, grain="weight", ratio=ratio, budget=structure, calibration=calib_info,
        model={"source": source or getattr(model.config, "_name_or_path", ""), "model_type": model.config.model_type,
               "num_experts": None},
        layers=[{"param": n, "active": round(float(m.float().mean()), 6)} for n, m in masks.items()])
    if verbose:
        total = sum(m.numel() for m in masks.values())
        kept = sum(int(m.sum()) for m in masks.values())
        print(f"  {len(masks)} weight tensors, {kept:,}/{total:,} weights kept ({kept / total:.1%}) in "
              f"{time.perf_counter() - t0:.2f}s")
    return report
