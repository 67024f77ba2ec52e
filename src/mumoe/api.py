"""The Python API: `score` and `prune` (a method name with options, or a `Recipe`; a loaded model or a
checkpoint folder — the driver is the library's choice, `drivers.choose`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from .apply.export import PruneReport
from .criteria import METHODS, get_method, methods_of, score_methods
from .drivers.files import prune_files
from .drivers.inputs import (_sources, calibration, check_materialised, check_model_arg,  # noqa: F401
                             check_token_ids)
from .drivers.memory import apply_stage, prune_loaded
from .errors import MumoeError
from .grains import GRAINS
from .grains.expert import layer_summary, select_experts  # noqa: F401  (re-exported)
from .recipe import Recipe, make_stage

_RECIPE_OPTIONS = ("nsamples", "seqlen", "seed", "batch_size", "dtype", "device",
                   *dict.fromkeys(f for g in GRAINS.values() for f in g.flags))  # and every grain's options


def as_recipe(method, ratio=None, calib=None, options: dict | None = None, then=()) -> Recipe:
    """A Recipe as given, or built from the flat options of the Python API. then: later stages, each a
    (method, ratio) or (method, ratio, {options}) tuple."""
    options = dict(options or {})
    if isinstance(method, Recipe):
        if ratio is not None or options or then:
            raise MumoeError("pass either a Recipe or method/ratio/options, not both")
        return method
    split = {k: options.pop(k) for k in ("expert_params", "expert_share") if k in options}
    if split:  # one combined budget: the stage ratios follow from it
        if ratio is not None or any(len(st) > 1 and st[1] is not None for st in then):
            raise MumoeError("expert_params sets the stages' ratios: leave out ratio and the later stage's ratio "
                             "(then=[('wanda',)])")
        ratio, then = 0.0, [(st[0], 0.0, *st[2:]) for st in then]
    if ratio is None:
        raise MumoeError("ratio is required (the fraction removed, in [0, 1))")
    unknown = set(options) - set(_RECIPE_OPTIONS)
    if unknown:
        raise MumoeError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(_RECIPE_OPTIONS)}")
    recipe = Recipe.build(method, ratio, calib=_sources(calib), **options)
    if then:
        from dataclasses import replace

        recipe = replace(recipe, later=tuple(make_stage(*st) for st in then))
    return recipe.split(**split) if split else recipe


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


def prune(model, method, ratio: float | None = None, calib=None, *, tokenizer=None, source: str | None = None,
          verbose: bool = False, windows: tuple | None = None, out: str | Path | None = None,
          layerwise="auto", work_dir: str | Path | None = None, overwrite: bool = False, then=(),
          say: Callable[[str], None] | None = None, stream_files: bool = True, spill_bytes: int = 8 << 30,
          **options) -> PruneReport:
    """Prune and return what was done (its `recipe` replays the run).

    model: a loaded model (pruned in place; `out` given: also saved there), or a checkpoint folder / hub id /
    'default' (the pruned checkpoint is written to `out`; the library picks the driver: the checkpoint files
    alone for AIMER, layer by layer when `layerwise` is True — or "auto" and the model would not fit in the
    memory this process may use —, else loaded whole). work_dir: checkpoint the layer-sequential sweep there
    (the same call again resumes).
    method: a Recipe, or a method name with `ratio` (the fraction removed: experts per layer, atoms, or weights)
    and the recipe's flat options — nsamples, seqlen, seed (None: the first windows; an int: seeded random
    windows and random scores), batch_size, budget / order (expert grain: "uniform" | "global",
    "one-shot" | "progressive"), form / scope (atom grain), structure (weight grain: row, N:M, column), router /
    rank / order / alpha (merge grain: "centroid" | "bound", Sub-MoE's rank, REAM's progressive order, DERN's
    similarity threshold), device;
    then: later stages [(method, ratio[, {options}]), ...], each run on the model the one before it left;
    expert_params (with expert_share): one budget over an expert stage and a weight stage — the share of
    routed-expert weights removed in all (`Recipe.split`; then leave out the ratios: then=[("wanda",)]).
    calib: token ids [N, L], raw text, a path, 'domain[:NAME]', or a list of sources (None: the recipe's).
    windows: the recipe's calibration prepared already, as `calibration(recipe, calib, tokenizer)` returns it.
    say: where progress lines go (None: printed when verbose). stream_files=False: a checkpoint is never pruned
    from its files alone (it is loaded). spill_bytes: the layer-sequential sweep's activations beyond this go
    to disk (under work_dir, or a temporary folder).
    """
    recipe = as_recipe(method, ratio, calib, options, then)
    say = say or (print if verbose else None)
    if isinstance(model, (str, Path)):
        if out is None:
            raise MumoeError(f"mumoe.prune on the path {str(model)!r} writes the pruned checkpoint: pass out=DIR "
                             "(or load the model first with mumoe.load(PATH) and prune it in memory)")
        if calib is not None and windows is None:
            if tokenizer is None:
                from .loading import load_tokenizer

                tokenizer = load_tokenizer(str(model))
            windows = calibration(recipe, calib, tokenizer)
        from .drivers.choose import prune_path

        return prune_path(str(model), recipe, out, layerwise=layerwise, work_dir=work_dir, overwrite=overwrite,
                          stream_files=stream_files, tokenizer=tokenizer, windows=windows, verbose=verbose, say=say,
                          spill_bytes=spill_bytes)[0]
    if layerwise is True or work_dir is not None:
        raise MumoeError("the layer-sequential driver reads a checkpoint folder: pass its path (mumoe.prune(PATH, "
                         "recipe, layerwise=True, out=DIR)), not a loaded model")
    check_model_arg(model)
    check_materialised(model)
    windows = windows if windows is not None else calibration(recipe, calib, tokenizer)
    report = prune_loaded(model, recipe, windows, verbose=verbose, source=source, say=say)
    if out is not None:
        from .apply.export import save_pruned

        save_pruned(model, out, report, tokenizer, overwrite=overwrite, dtype=recipe.dtype)
    return report


def apply_recipe(model: nn.Module, recipe: Recipe, wins, groups=None, verbose: bool = False,
                 scores=None) -> PruneReport:
    """One one-stage recipe scored (unless `scores`), selected and applied in place (`drivers.memory`)."""
    return apply_stage(model, recipe, wins, groups, verbose, scores)


def prune_streamed(path: str | Path, ratio: float, out: str | Path, method: str = "aimer", overwrite: bool = False,
                   progress: bool = True, verbose: bool = False, recipe: Recipe | None = None) -> PruneReport:
    """Calibration-free expert pruning straight from a checkpoint's safetensors files (`drivers.files`): the
    model is never loaded. Only methods that score from the files (AIMER) run this way."""
    if get_method(method).from_files is None:
        raise MumoeError(f"only {', '.join(n for n, m in METHODS.items() if m.from_files)} can score from the "
                         f"checkpoint files; {method!r} needs the model loaded")
    recipe = recipe or Recipe.build(method, ratio)
    return prune_files(path, recipe, out, overwrite, progress, verbose)


def prune_atoms(model: nn.Module, method: str, ratio: float, calib=None, form: str = "uniform",
                scope: str = "global", tokenizer=None, nsamples: int = 128, seqlen: int = 512, batch_size: int = 4,
                source: str | None = None, verbose: bool = False) -> PruneReport:
    """Atomic-expert pruning in place (HEAPr and same-grain baselines): `prune` with an atom-grain method."""
    known = methods_of(get_method("heapr").grain)
    if method not in known:
        raise MumoeError(f"{method!r} is not an atom method; known: {', '.join(known)}")
    return prune(model, method, ratio, calib, tokenizer=tokenizer, source=source, verbose=verbose, form=form,
                 scope=scope, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size)


def prune_weights(model: nn.Module, method: str, ratio: float, calib=None, structure: str = "row", tokenizer=None,
                  nsamples: int = 128, seqlen: int = 512, batch_size: int = 8, source: str | None = None,
                  verbose: bool = False) -> PruneReport:
    """Weight-grain pruning in place (Wanda, magnitude): `prune` with a weight-grain method."""
    known = methods_of(get_method("wanda").grain)
    if method not in known:
        raise MumoeError(f"{method!r} is not a weight method; known: {', '.join(known)}")
    return prune(model, method, ratio, calib, tokenizer=tokenizer, source=source, verbose=verbose,
                 structure=structure, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size)


def quantize(model: nn.Module, avg_bits: float = 2.5, calib="domain", *, tokenizer=None, bits=(1, 2, 3),
             group: int = 128, nsamples: int = 128, seqlen: int = 512, seed: int | None = None, batch_size: int = 8,
             verbose: bool = False) -> PruneReport:
    """PMQ (MC#'s mixed-precision experts) on a loaded MoE model, in place: one bit width per routed expert so
    that every layer averages `avg_bits` (widths from `bits`), the experts replaced by their round-to-nearest
    values (groups of `group` input columns). -> the record; `save_pruned(model, out, report)` writes the packed
    export (`mumoe-quant`, read back by `mumoe.load`). calib: a source as for prune, or token ids [N, L]."""
    from .drivers.quantize import check_quant_args, quantize_loaded
    from .recipe import CalibSpec

    check_quant_args(avg_bits, bits, group)
    check_model_arg(model, "quantize")
    check_materialised(model)
    spec = CalibSpec(_sources(calib), nsamples, seqlen, seed, batch_size)
    windows = calibration(spec, calib, tokenizer)
    check_token_ids(model, windows[0])
    return quantize_loaded(model, windows, avg_bits, bits, group, batch_size,
                           source=getattr(model.config, "_name_or_path", ""), progress=verbose,
                           say=print if verbose else None)
