"""The Python API: `score` and `prune` (a method name with options, or a `Recipe`)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .apply.experts import remove_experts
from .apply.export import PruneReport
from .apply.report import RECORDS
from .criteria import get_method, score_methods
from .criteria.heapr import ATOM_METHODS
from .errors import MumoeError
from .models import adapter_for, moe_adapter_for
from .observe.calib import spec_windows, tokenize, windows
from .observe.collectors import InputNorms
from .observe.runner import resolve_device
from .observe.runner import run as run_collectors
from .recipe import Recipe
from .select import check_ratio, keep_global, keep_uniform


def layer_summary(entry: dict) -> str:
    """One line per layer: kept count and the dropped experts."""
    dropped = sorted(set(range(entry["num_experts"])) - set(entry["kept"]))
    shown = ", ".join(map(str, dropped[:12])) + (", ..." if len(dropped) > 12 else "")
    return f"  layer {entry['layer']:3d}: kept {len(entry['kept'])}/{entry['num_experts']}  dropped [{shown}]"


def _is_path(calib) -> bool:
    """A path or bundled-split name (else raw calibration text)."""
    if isinstance(calib, Path):
        return True
    if not isinstance(calib, str) or "\n" in calib or len(calib) > 4096:
        return False
    if calib == "domain" or calib.startswith("domain:"):
        return True
    try:
        return Path(calib).exists()
    except OSError:  # a name too long for the file system: text
        return False


def _sources(calib) -> tuple[str, ...]:
    """What a recipe records of the `calib` argument of the Python API."""
    if calib is None:
        return ()
    if isinstance(calib, torch.Tensor):
        return ("tensor",)
    if isinstance(calib, (list, tuple)):
        return tuple(str(c) for c in calib)
    return (str(calib),) if _is_path(calib) else ("text",)


def calibration(recipe: Recipe, calib=None, tokenizer=None) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """The recipe's calibration windows: (ids [N, L] or None, source index per window [N] or None, info).
    `calib` (API only) overrides the recipe's sources: token ids [N, L], raw text, or paths."""
    spec = recipe.calib
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.long, torch.int32, torch.int64):
            raise MumoeError("calib tensor must be integer token ids of shape [N, L]")
        if calib.shape[0] == 0 or calib.shape[1] == 0:
            raise MumoeError(f"calib tensor holds no tokens (shape {list(calib.shape)})")
        return calib.long(), None, {"source": "tensor", "nsamples": calib.shape[0], "seqlen": calib.shape[1]}
    if calib is not None and not isinstance(calib, (list, tuple)) and not _is_path(calib):  # raw text
        if tokenizer is None:
            raise MumoeError("calibration text needs a tokenizer (this model has none); pass token ids [N, L]")
        wins = windows(tokenize(tokenizer, str(calib)), spec.seqlen, spec.nsamples, spec.seed)
        return wins, None, {"source": "text", "nsamples": wins.shape[0], "seqlen": spec.seqlen, "seed": spec.seed}
    if calib is not None:
        spec = replace(spec, sources=_sources(calib))
    if not spec.sources:
        return None, None, {}
    if any(s in ("tensor", "text") for s in spec.sources):
        raise MumoeError("this recipe was calibrated on token ids or text passed in from Python; pass them again "
                         "(mumoe.prune(model, recipe, calib=...))")
    wins, groups, info = spec_windows(tokenizer, spec)
    return wins, (groups if len(info["sources"]) > 1 else None), info


def as_recipe(method, ratio=None, calib=None, options: dict | None = None) -> Recipe:
    """A Recipe as given, or built from the flat options of the Python API."""
    options = options or {}
    if isinstance(method, Recipe):
        if ratio is not None or options:
            raise MumoeError("pass either a Recipe or method/ratio/options, not both")
        return method
    if ratio is None:
        raise MumoeError("ratio is required (the fraction removed, in [0, 1))")
    unknown = set(options) - set(_RECIPE_OPTIONS)
    if unknown:
        raise MumoeError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(_RECIPE_OPTIONS)}")
    return Recipe.build(method, ratio, calib=_sources(calib), **options)


_RECIPE_OPTIONS = ("nsamples", "seqlen", "seed", "batch_size", "budget", "order", "form", "scope", "structure",
                   "dtype", "device", "width_multiple")


def check_model_arg(model, what: str = "prune") -> nn.Module:
    """The API's `model` argument: a loaded transformers causal LM (not a path, not another object)."""
    if isinstance(model, (str, Path)):
        raise MumoeError(f"mumoe.{what} takes a loaded model, got the path {str(model)!r}: load it first with "
                         "mumoe.load(PATH) (or run `mumoe prune PATH ...`, which never loads more than it needs)")
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise MumoeError(f"mumoe.{what} takes a transformers causal LM (an nn.Module with .config), got "
                         f"{type(model).__name__}")
    return model


def check_token_ids(model: nn.Module, wins: torch.Tensor | None) -> None:
    """Calibration ids must index the model's embedding table (an IndexError deep in the forward otherwise)."""
    if wins is None or not wins.numel():
        return
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    lo, hi = int(wins.min()), int(wins.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise MumoeError(f"calibration token ids span [{lo}, {hi}], outside the model's vocabulary [0, {vocab}); "
                         "were they made with another tokenizer?")


def score(model: nn.Module, method, calib=None, seed: int | None = None, tokenizer=None, nsamples: int = 128,
          seqlen: int = 512, batch_size: int = 8, progress: bool = False, device=None):
    """Raw criterion values: expert grain -> one tensor [E] per MoE layer (decoder-layer order); atom grain ->
    one [E, I] per MoE layer; weight grain -> {parameter name: score tensor of the weight's shape}
    (Wanda |W|·‖X‖, magnitude |W|). `method` may be a Recipe."""
    recipe = method if isinstance(method, Recipe) else Recipe.build(
        method, 0.0, calib=_sources(calib), nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size,
        device=device)
    check_model_arg(model, "score")
    check_materialised(model)
    wins, groups, _ = calibration(recipe, calib, tokenizer)
    check_token_ids(model, wins)
    return score_methods(model, [recipe.method], wins, groups, seed=recipe.calib.seed,
                         batch_size=recipe.calib.batch_size, progress=progress, device=recipe.device)[recipe.method]


def prune(model: nn.Module, method, ratio: float | None = None, calib=None, *, tokenizer=None,
          source: str | None = None, verbose: bool = False, windows: tuple | None = None, **options) -> PruneReport:
    """Prune `model` in place and return what was done (its `recipe` replays the run).

    method: a Recipe, or a method name with `ratio` (the fraction removed: experts per layer, atoms, or weights)
    and the recipe's flat options — nsamples, seqlen, seed (None: the first windows; an int: seeded random
    windows and random scores), batch_size, budget / order (expert grain: "uniform" | "global",
    "one-shot" | "progressive"), form / scope (atom grain), structure (weight grain: row, N:M, column), device.
    calib: token ids [N, L], raw text, a path, 'domain[:NAME]', or a list of sources (None: the recipe's).
    windows: the recipe's calibration prepared already, as `calibration(recipe, calib, tokenizer)` returns it
    (the CLI builds it before loading the model).
    """
    recipe = as_recipe(method, ratio, calib, options)
    check_model_arg(model)
    check_materialised(model)
    wins, groups, calib_info = windows if windows is not None else calibration(recipe, calib, tokenizer)
    check_token_ids(model, wins)
    if recipe.device is not None:
        model.to(resolve_device(recipe.device))
    report = apply_recipe(model, recipe, wins, groups, verbose)
    report.calibration = calib_info
    report.recipe = recipe.to_dict()
    report.model = {"source": source or getattr(model.config, "_name_or_path", ""),
                    "model_type": model.config.model_type, **report.model}
    earlier = RECORDS.get(model)
    if earlier is not None:  # pruned before: one record of every stage, describing the export
        report = report.compose(earlier)
    RECORDS[model] = report
    return report


def check_materialised(model: nn.Module) -> None:
    """A model whose weights are on the meta device (built with `torch.device("meta")` or `init_empty_weights`,
    never loaded) cannot be scored or pruned: one line, not a NotImplementedError from deep in torch."""
    meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise MumoeError(f"the model's weights are not loaded (parameter {meta} is on the meta device): load it "
                         "with mumoe.load(PATH), or prune the checkpoint folder with `mumoe prune PATH` "
                         "(layer by layer, never loaded whole)")


def apply_recipe(model: nn.Module, recipe: Recipe, wins, groups=None, verbose: bool = False,
                 scores=None) -> PruneReport:
    """Score (unless `scores` are given: the method's one-shot scores from a shared pass), select and apply one
    recipe in place. The report's calibration/recipe/model source are the caller's to fill."""
    if recipe.grain == "weight":
        if scores is not None:
            raise MumoeError("weight-grain methods are scored and masked in one step; no precomputed scores")
        return _prune_weights(model, recipe, wins, verbose)
    if recipe.grain == "atom":
        return _prune_atoms(model, recipe, wins, verbose, scores)
    return _prune_experts(model, recipe, wins, groups, verbose, scores)


def _prune_experts(model: nn.Module, recipe: Recipe, wins, groups, verbose: bool, scores=None) -> PruneReport:
    """scores: precomputed one-shot scores (one [E] per MoE layer), e.g. from a shared pass (`compare`)."""
    m = get_method(recipe.method)
    budget, order = recipe.expert.budget, recipe.expert.order
    layers = moe_adapter_for(model).moe_layers()
    if budget == "global" and any(layer.n_group and layer.n_group > 1 for layer in layers):
        raise MumoeError("global budgets are not available for group-limited routers; use --budget uniform")
    seed, bs = recipe.calib.seed, recipe.calib.batch_size
    ratio = recipe.ratio
    t0 = time.perf_counter()
    if scores is not None:
        if order != "one-shot":
            raise MumoeError("precomputed scores are one-shot; progressive scoring needs its own passes")
    elif order == "progressive":
        scores, keep = [], {}
        for layer in layers:  # score this layer on the model whose earlier layers are already sliced
            s = score_methods(model, [m.name], wins, groups, seed, bs, verbose, layers=[layer])[m.name][0]
            scores.append(s)
            keep.update(select_experts([layer], [s], ratio, budget, m.prune_highest))
            remove_experts(model, {layer.index: keep[layer.index]})
    else:
        scores = score_methods(model, [m.name], wins, groups, seed, bs, verbose, layers=layers)[m.name]
    if order != "progressive":
        keep = select_experts(layers, scores, ratio, budget, m.prune_highest)
    report = expert_report(recipe, layers, scores, keep)
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


def expert_report(recipe: Recipe, layers, scores, keep: dict[int, list[int]]) -> PruneReport:
    """The report of an expert-grain run: per MoE layer its kept experts and raw scores."""
    m = get_method(recipe.method)
    return PruneReport(
        method=m.name, grain=m.grain, ratio=recipe.ratio, budget=recipe.expert.budget,
        scoring_order=recipe.expert.order, model={"num_experts": len(scores[0])},
        layers=[{"layer": layer.index, "num_experts": len(s), "kept": keep[layer.index],
                 "scores": [float(v) for v in s]} for layer, s in zip(layers, scores)])


def atom_report(recipe: Recipe, layers, scores) -> PruneReport:
    """The report of an atom-grain run (keep sets chosen from `scores`, one [E, I] per MoE layer); masks of the
    global form in `report.masks` (not serialized)."""
    from .select.atoms import keep_global_atoms, keep_uniform_atoms

    form, scope, ratio = recipe.atom.form, recipe.atom.scope, recipe.ratio
    entries = []
    if form == "uniform":
        keeps = [keep_uniform_atoms(s, ratio, recipe.atom.width_multiple) for s in scores]
        for layer, k in zip(layers, keeps):
            entries.append({"layer": layer.index, "num_experts": layer.num_experts,
                            "intermediate_size": layer.intermediate_size, "kept_width": k.shape[-1],
                            "experts": [{"expert": e, "kept": k[e].tolist()} for e in range(k.shape[0])]})
    else:
        for layer, mk in zip(layers, keep_global_atoms(scores, ratio, scope)):
            entries.append({"layer": layer.index, "num_experts": layer.num_experts,
                            "intermediate_size": layer.intermediate_size,
                            "experts": [{"expert": e, "kept": torch.nonzero(mk[e]).flatten().tolist()}
                                        for e in range(mk.shape[0])]})
    return PruneReport(
        method=recipe.method, grain="atom", ratio=ratio, budget=f"{form}" + ("" if form == "uniform" else f"/{scope}"),
        form="hf" if form == "uniform" else "mumoe-atoms", model={"num_experts": layers[0].num_experts},
        layers=entries)


def select_experts(layers, scores, ratio: float, budget: str, prune_highest: bool) -> dict[int, list[int]]:
    """Keep sets per decoder-layer index under the budget."""
    if budget == "global":
        kept = keep_global(scores, ratio, [layer.top_k for layer in layers], prune_highest)
        return {layer.index: k for layer, k in zip(layers, kept)}
    return {layer.index: keep_uniform(s, ratio, layer.top_k, layer.n_group, layer.topk_group, prune_highest)
            for layer, s in zip(layers, scores)}


def _config_field(cfg: dict, keys: tuple[str, ...]):
    for c in (cfg, cfg.get("text_config") or {}):
        for key in keys:
            if c.get(key) is not None:
                return c[key]
    return None


def prune_streamed(path: str | Path, ratio: float, out: str | Path, method: str = "aimer", overwrite: bool = False,
                   progress: bool = True, verbose: bool = False, recipe: Recipe | None = None) -> PruneReport:
    """Calibration-free expert pruning straight from a checkpoint's safetensors files: the model is never
    loaded; scores come from memory-mapped tensors read one at a time and the pruned checkpoint is written
    shard by shard. Only weight-based methods (AIMER) can run this way."""

    from .apply.export import check_output_dir
    from .apply.stream import prune_checkpoint
    from .criteria.aimer_stream import stream_aimer
    from .models.base import EXPERT_COUNT_KEYS, TOP_K_KEYS

    if method != "aimer":
        raise MumoeError(f"only aimer can score from the checkpoint files; {method!r} needs the model loaded")
    check_ratio(ratio)
    path = Path(path)
    check_output_dir(out, overwrite, source=path)
    from .checkpoint import check_files
    from .files import read_json

    cfg = read_json(path / "config.json", "the model config")
    check_files(path)
    from .observe.layerwise import LayerwiseCheckpoint

    LayerwiseCheckpoint(path)  # every tensor the model needs is in the files, with its shape (headers only)
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
                                 for L, s in scores.items()],
                         recipe=(recipe or Recipe.build(method, ratio)).to_dict())
    if verbose:
        for entry in report.layers:
            print(layer_summary(entry))
        print(f"  scored {len(scores)} layers from the checkpoint files in {t_score:.2f}s (model not loaded)")
    prune_checkpoint(path, out, report, overwrite, progress)
    return report


def prune_atoms(model: nn.Module, method: str, ratio: float, calib=None, form: str = "uniform",
                scope: str = "global", tokenizer=None, nsamples: int = 128, seqlen: int = 512, batch_size: int = 4,
                source: str | None = None, verbose: bool = False) -> PruneReport:
    """Atomic-expert pruning in place (HEAPr and same-grain baselines): `prune` with an atom-grain method."""
    if get_method(method).grain != "atom":
        raise MumoeError(f"{method!r} is not an atom method; known: {', '.join(ATOM_METHODS)}")
    return prune(model, method, ratio, calib, tokenizer=tokenizer, source=source, verbose=verbose, form=form,
                 scope=scope, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size)


def prune_weights(model: nn.Module, method: str, ratio: float, calib=None, structure: str = "row", tokenizer=None,
                  nsamples: int = 128, seqlen: int = 512, batch_size: int = 8, source: str | None = None,
                  verbose: bool = False) -> PruneReport:
    """Weight-grain pruning in place (Wanda, magnitude): `prune` with a weight-grain method."""
    if get_method(method).grain != "weight":
        raise MumoeError(f"{method!r} is not a weight method; known: wanda, magnitude")
    return prune(model, method, ratio, calib, tokenizer=tokenizer, source=source, verbose=verbose,
                 structure=structure, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size)


def _prune_atoms(model: nn.Module, recipe: Recipe, wins, verbose: bool, scores=None) -> PruneReport:
    """form="uniform": every expert keeps its best I' = (1 − ratio)·I atoms (multiple of 8); the model stays a
    standard HF model with a narrower expert width. form="global": the lowest `ratio` of all atoms go, ranked
    over all layers (scope="global", HEAPr) or per layer (scope="layer"); widths differ per expert, removed
    atoms are zeroed in memory and the export (mumoe's own form) stores only the kept ones."""
    from .apply.atoms import mask_atoms, slice_atoms_uniform

    form = recipe.atom.form
    adapter = moe_adapter_for(model)
    layers = adapter.moe_layers()
    t0 = time.perf_counter()
    if scores is None:
        scores = score_methods(model, [recipe.method], wins, None, recipe.calib.seed, recipe.calib.batch_size,
                               verbose, layers=layers)[recipe.method]  # [E, I] each
    report = atom_report(recipe, layers, scores)
    entries = report.layers
    for layer, e in zip(layers, entries):
        if form == "uniform":
            slice_atoms_uniform(layer, torch.tensor([x["kept"] for x in e["experts"]], dtype=torch.long))
        else:
            mask = torch.zeros(layer.num_experts, layer.intermediate_size, dtype=torch.bool)
            for x in e["experts"]:
                mask[x["expert"], x["kept"]] = True
            mask_atoms(layer, mask)
    if form == "uniform":
        adapter.set_expert_width(len(entries[0]["experts"][0]["kept"]))
    if verbose:
        for e in entries:
            widths = [len(x["kept"]) for x in e["experts"]]
            print(f"  layer {e['layer']:3d}: kept atoms per expert {min(widths)}..{max(widths)} of "
                  f"{e['intermediate_size']} (total {sum(widths)}/{e['intermediate_size'] * len(widths)})")
        print(f"  scored and applied in {time.perf_counter() - t0:.2f}s")
    return report


def _prune_weights(model: nn.Module, recipe: Recipe, wins, verbose: bool) -> PruneReport:
    """Wanda (|W|·‖X‖ from calibration windows; structures row, N:M, column) or magnitude (one threshold per
    matrix) on every linear of the decoder layers and every routed expert (per expert, from its routed
    tokens); embeddings, lm_head, routers untouched. ratio = sparsity."""
    from .apply.masking import apply_masks
    from .models.prunable import prunable_names
    from .select.weights import magnitude_mask, masks_from_norms

    adapter_for(model)
    recipe.check_config(model.config)
    if recipe.weight.order == "progressive":
        raise MumoeError("Wanda's progressive order calibrates one layer at a time: it runs on the layer-sequential "
                         "path (mumoe prune CHECKPOINT --layerwise)")
    ratio, structure = recipe.ratio, recipe.weight.structure
    t0 = time.perf_counter()
    if recipe.method == "wanda":
        bs = recipe.calib.batch_size
        if verbose:  # a stage line each (bars only on a terminal): the pass takes seconds to minutes
            print(f"  statistics: input norms of every prunable weight over {wins.shape[0]} windows "
                  f"({-(-wins.shape[0] // bs)} forwards of {bs})", flush=True)
        norms = run_collectors(model, wins, [InputNorms(model)], batch_size=bs, progress=verbose)[0].result()
        if verbose:
            print(f"  statistics done in {time.perf_counter() - t0:.1f}s; selecting {structure} masks", flush=True)
        masks = masks_from_norms(model, norms, 1 - ratio, structure)
    else:
        params = dict(model.named_parameters())
        masks = {n: magnitude_mask(params[n], ratio) for n in prunable_names(model)}
    apply_masks(model, masks)
    report = PruneReport(
        method=recipe.method, grain="weight", ratio=ratio, budget=structure, model={"num_experts": None},
        layers=[{"param": n, "active": round(float(m.float().mean()), 6)} for n, m in masks.items()])
    if verbose:
        total = sum(m.numel() for m in masks.values())
        kept = sum(int(m.sum()) for m in masks.values())
        print(f"  {len(masks)} weight tensors, {kept:,}/{total:,} weights kept ({kept / total:.1%}) in "
              f"{time.perf_counter() - t0:.2f}s")
    return report
