"""The layer-sequential driver: calibrated pruning of a checkpoint larger than memory — layer-sequential scoring
(`criteria.layerwise`) and a streamed export (`apply.stream`); the model is never materialised, only one decoder
layer and the activations. Generic over the grain (`grains`): the grain gives the progressive order's per-layer
hooks, the plan from the sweep's scores, and the streamed transform of that plan.

    mumoe prune /models/Qwen3-30B-A3B --method reap --ratio 0.25 --calib domain --layerwise --device cuda --out out/

Results equal the in-memory driver's (same kept sets, same scores) — tested on every supported architecture. A
multi-stage recipe runs stage by stage: each stage but the last is exported to a folder of mumoe's own beside
`out` (removed at the end), which the next stage reads — exactly two `mumoe prune` commands in a row.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

from ..apply.export import PruneReport, check_output_dir
from ..apply.stream import write_streamed
from ..criteria import get_method
from ..criteria.layerwise import score_layerwise
from ..errors import MumoeError
from ..grains import get_grain
from ..loading import compute_dtype, parse_dtype
from ..models import adapter_for
from ..observe.layerwise import LayerwiseCheckpoint
from ..observe.runner import resolve_device
from ..observe.sequential import dist_world, fingerprint
from ..observe.workdir import WorkDir, check_work_dir, source_identity
from .record import combine, finish, stage_report


def check_layerwise(recipe) -> None:
    """What the layer-sequential path supports, checked before any work."""
    for stage in recipe.stages[:-1]:
        if not get_grain(stage.grain).leaves_hf(stage):
            raise MumoeError(f"{get_grain(stage.grain).describe(stage)} leaves per-layer shapes that the "
                             "layer-sequential reader does not read yet, so no later stage can run on them layer by "
                             "layer; run this recipe in memory (--layerwise off)")
    for stage in recipe.stages:
        m = get_method(stage.method)
        if not m.needs_calib:
            how = ("it runs from the checkpoint files without --layerwise" if m.from_files is not None else
                   "it runs on the loaded model (no streamed version yet); drop --layerwise")
            raise MumoeError(f"{m.name} needs no calibration: {how}")


def prune_layerwise(path: str | Path, recipe, out: str | Path, windows: tuple, *, overwrite: bool = False,
                    verbose: bool = True, work_dir: str | Path | None = None, spill_bytes: int = 8 << 30,
                    max_shard_bytes: int = 1 << 30, timing: dict | None = None,
                    say: Callable[[str], None] | None = None) -> PruneReport:
    """Score `recipe` layer by layer on the checkpoint at `path` and write the pruned checkpoint to `out`
    tensor by tensor; a multi-stage recipe stage by stage (each stage reads the one before's export).
    windows: (ids [N, L], groups or None, info) as `inputs.calibration` returns them.
    work_dir: checkpoint every finished layer there; the same call again resumes after the last one (one-stage
    recipes). Under torchrun, every rank scores its share of the windows; rank 0 writes `out`. timing: a dict
    that receives calib_s, export_s and the sweep's `SweepInfo` (as "sweep")."""
    check_layerwise(recipe)
    check_output_dir(out, overwrite, source=path)  # before any layer is read
    stages = recipe.stages
    if work_dir is not None and len(stages) > 1:
        raise MumoeError("--work-dir resumes a one-stage run; run the stages as separate `mumoe prune` commands "
                         "(each with its own --work-dir) to resume each")
    if len(stages) == 1:
        return _prune_stage(path, recipe, out, windows, overwrite=overwrite, verbose=verbose, work_dir=work_dir,
                            spill_bytes=spill_bytes, max_shard_bytes=max_shard_bytes, timing=timing)
    from ..files import stage_folder

    reports, src = [], Path(path)
    with stage_folder(out) as scratch:  # a killed multi-stage run's earlier exports are swept first
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            if i and recipe.expert_params is not None:  # the combined budget's rest, after stage 1's experts
                stage = _split_from_plan(stage, recipe, reports[0], say)
            if say is not None and i:
                say(f"stage {i + 1} of {len(stages)}: {get_grain(stage.grain).describe(stage)}")
            dest = out if last else scratch / f"stage-{i + 1}"
            whole = (lambda r: combine(reports + [r], recipe)) if last else None  # the export records every stage
            r = _prune_stage(src, stage, dest, windows, overwrite=overwrite if last else False, verbose=verbose,
                             spill_bytes=spill_bytes, max_shard_bytes=max_shard_bytes, timing=timing,
                             source=str(path), record=whole)
            reports.append(r)
            src = dest
        return reports[-1]


def _split_from_plan(stage, recipe, first: PruneReport, say):
    """The weight stage of a combined budget from the expert stage's record (experts of one layer are of one
    size: the share of expert weights it removed is the share of experts)."""
    from .memory import split_stage

    total = sum(e["num_experts"] for e in first.layers)
    kept = sum(len(e["kept"]) for e in first.layers)
    return split_stage(stage, recipe, (total, total), (total, kept), say)


def _prune_stage(path: str | Path, recipe, out: str | Path, windows: tuple, *, overwrite: bool, verbose: bool,
                 work_dir: str | Path | None = None, spill_bytes: int, max_shard_bytes: int,
                 timing: dict | None, source: str | None = None, record: Callable | None = None) -> PruneReport:
    """One stage (a one-stage recipe) from the checkpoint at `path` to `out` (checked by the caller). source: the
    model the run started from (recorded in pruning.json), when `path` is an earlier stage's export; record:
    report -> the report the export records (a multi-stage run's last stage: every stage's)."""
    if work_dir is not None:
        check_work_dir(work_dir, source=path, out=out)
    wins, groups, info = windows
    if wins is None:
        raise MumoeError(f"method {recipe.method!r} needs calibration windows")
    dev = resolve_device(recipe.device or "cpu")
    t0 = time.perf_counter()
    ckpt = LayerwiseCheckpoint(path, dtype=compute_dtype(recipe.dtype, path, dev), device=dev)
    recipe.check_config(ckpt.config)
    m = get_method(recipe.method)
    grain = get_grain(recipe.grain)
    moe_layers = adapter_for(ckpt.model).moe_layers()
    layers = {layer.index: layer for layer in moe_layers}
    grain.check_layerwise(recipe, moe_layers)
    order = grain.order(recipe.part)
    hooks = grain.hooks(recipe, ckpt, layers)
    work = None
    if work_dir is not None:
        key = fingerprint(wins, groups, recipe.to_dict(), str(Path(path).resolve()), source_identity(path),
                          dist_world())
        work = WorkDir(work_dir, key, say=print if verbose else None, rank_world=dist_world())

    if verbose:
        print(f"  layer-sequential on {dev}: {len(ckpt.decoder.layers)} decoder layers, largest "
              f"{ckpt.layer_bytes() / 2**20:.1f} MiB resident at a time; checkpoint "
              f"{ckpt.checkpoint_bytes() / 2**20:.1f} MiB")
    try:
        res = score_layerwise(ckpt, [m.name], wins, groups, batch_size=recipe.calib.batch_size, progress=verbose,
                              order=order, select=hooks.select, prune_layer=hooks.prune_layer, work=work,
                              spill_bytes=spill_bytes)
    except BaseException:
        if work is not None and not work.state_file.exists():
            work.remove()  # no layer finished: nothing worth resuming, nothing left behind
        raise
    t_score = time.perf_counter() - t0
    calib_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, for the memory benchmark
    if verbose and res.info is not None:
        i = res.info
        print(f"  scored in {t_score:.1f}s" + (f" (resumed after layer {i.resumed_after})" if i.resumed_after
                                               is not None else "") + (f" on {i.ranks} ranks" if i.ranks > 1 else "")
              + f"; activations {i.activation_bytes / 2**20:.1f} MiB per layer"
              + (f", {i.spilled_bytes / 2**20:.1f} MiB spilled to disk" if i.spilled_bytes else ""))
    plan = grain.plan_layerwise(recipe, moe_layers, res)
    report = finish(stage_report(recipe, plan), recipe, info,
                    {"source": source or str(path), "model_type": ckpt.config.model_type})
    if record is not None:
        report = record(report)
    if dist_world()[0] == 0:
        transform, changes = grain.transform(plan, ckpt, recipe)
        t1 = time.perf_counter()
        write_streamed(path, out, report, transform, changes, overwrite, verbose,
                       max_shard_bytes, None if recipe.dtype in (None, "auto") else parse_dtype(recipe.dtype))
        if timing is not None:
            timing["export_s"] = time.perf_counter() - t1
    if timing is not None:
        timing.update(calib_s=t_score, sweep=res.info, calib_peak_rss_mb=calib_peak)
    if work is not None:
        if dist_world()[1] > 1:  # every rank has saved its last state before rank 0 removes the folder
            import torch.distributed as dist

            dist.barrier()
        if dist_world()[0] == 0:
            work.remove()
    return report


