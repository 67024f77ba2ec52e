"""Calibrated pruning of a checkpoint larger than memory: layer-sequential scoring (`criteria.layerwise`) and a
streamed export (`apply.stream`); the model is never materialised, only one decoder layer and the activations.

    mumoe prune /models/Qwen3-30B-A3B --method reap --ratio 0.25 --calib domain --layerwise --device cuda --out out/

Results equal the in-memory path's (same kept sets, same scores) — tested on every supported architecture.
"""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

import torch

from .apply.export import PruneReport, check_output_dir
from .apply.masking import apply_masks
from .apply.stream import atom_ragged_transform, atom_transform, expert_transform, write_streamed
from .checkpoint import DTYPES
from .criteria import get_method
from .criteria.layerwise import LayerwiseScores, score_layerwise
from .errors import MumoeError
from .loading import compute_dtype, parse_dtype
from .models import adapter_for
from .models.base import EXPERT_COUNT_KEYS
from .observe.layerwise import LayerwiseCheckpoint, _target
from .observe.runner import resolve_device
from .observe.sequential import dist_world, fingerprint
from .observe.workdir import WorkDir, check_work_dir, source_identity
from .recipe import Recipe
from .select.weights import masks_from_norms

_LAYER = re.compile(r"\.layers\.(?P<layer>\d+)\.")


def check_layerwise(recipe: Recipe) -> None:
    """What the layer-sequential path supports, checked before any work."""
    m = get_method(recipe.method)
    if not m.needs_calib:
        raise MumoeError(f"{m.name} needs no calibration: it runs from the checkpoint files without --layerwise "
                         "(aimer is streamed already)")


def prune_layerwise(path: str | Path, recipe: Recipe, out: str | Path, windows: tuple, *, overwrite: bool = False,
                    verbose: bool = True, work_dir: str | Path | None = None, spill_bytes: int = 8 << 30,
                    max_shard_bytes: int = 1 << 30, timing: dict | None = None) -> PruneReport:
    """Score `recipe` layer by layer on the checkpoint at `path` and write the pruned checkpoint to `out`
    tensor by tensor. windows: (ids [N, L], groups or None, info) as `api.calibration` returns them.
    work_dir: checkpoint every finished layer there; the same call again resumes after the last one.
    Under torchrun, every rank scores its share of the windows; rank 0 writes `out`. timing: a dict that
    receives calib_s, export_s and the sweep's `SweepInfo` (as "sweep")."""
    check_layerwise(recipe)
    check_output_dir(out, overwrite, source=path)  # before any layer is read
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
    adapter = adapter_for(ckpt.model)
    layers = {layer.index: layer for layer in adapter.moe_layers()}
    if m.grain == "expert" and recipe.expert.budget == "global" and any(
            layer.n_group and layer.n_group > 1 for layer in layers.values()):
        raise MumoeError("global budgets are not available for group-limited routers; use --budget uniform")
    order = recipe.expert.order if m.grain == "expert" else recipe.weight.order if m.grain == "weight" else "one-shot"
    work = None
    if work_dir is not None:
        key = fingerprint(wins, groups, recipe.to_dict(), str(Path(path).resolve()), source_identity(path),
                          dist_world())
        work = WorkDir(work_dir, key, say=print if verbose else None, rank_world=dist_world())

    def select(layer, s):
        from .api import select_experts

        return select_experts([layer], [s], recipe.ratio, recipe.expert.budget, m.prune_highest)[layer.index]

    def prune_layer(j: int, module, res: dict) -> bool:
        if m.grain == "expert" and j in layers:
            from .apply.experts import slice_layer

            slice_layer(layers[j], res["keep"], inplace=True)
            return True
        if m.grain == "weight":
            params = dict(ckpt.model.named_parameters())
            apply_masks(ckpt.model, masks_from_norms(ckpt.model, res["norms"], 1 - recipe.ratio,
                                                     recipe.weight.structure, params=params))
            return True
        return False

    if verbose:
        print(f"  layer-sequential on {dev}: {len(ckpt.decoder.layers)} decoder layers, largest "
              f"{ckpt.layer_bytes() / 2**20:.1f} MiB resident at a time; checkpoint "
              f"{ckpt.checkpoint_bytes() / 2**20:.1f} MiB")
    try:
        res = score_layerwise(ckpt, [m.name], wins, groups, batch_size=recipe.calib.batch_size, progress=verbose,
                              order=order, select=select, prune_layer=prune_layer, work=work,
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
    report = _report(recipe, m, ckpt, res, order)
    report.calibration = info
    report.recipe = recipe.to_dict()
    report.model = {"source": str(path), "model_type": ckpt.config.model_type, **report.model}
    if dist_world()[0] == 0:
        if m.grain == "expert":
            keep = report.kept()
            counts = {len(v) for v in keep.values()}
            report.form = "hf" if len(counts) == 1 else "mumoe"  # per-layer counts: mumoe.load rebuilds shapes
            transform = expert_transform(keep)
            changes = dict.fromkeys(EXPERT_COUNT_KEYS, counts.pop()) if report.form == "hf" else {}
        elif m.grain == "atom" and recipe.atom.form == "uniform":
            keep = {e["layer"]: torch.tensor([x["kept"] for x in e["experts"]]) for e in report.layers}
            width = next(iter(keep.values())).shape[-1]
            transform, changes = atom_transform(keep), {adapter.expert_width_key: width}
        elif m.grain == "atom":  # HEAPr's global form: per-expert widths (mumoe.load)
            keep = {e["layer"]: [torch.tensor(x["kept"], dtype=torch.long) for x in e["experts"]]
                    for e in report.layers}
            transform, changes = atom_ragged_transform(keep), {}
        else:
            transform, changes = wanda_transform(ckpt, res.norms, recipe), {}
        t1 = time.perf_counter()
        write_streamed(path, out, report, transform, changes, overwrite, verbose, max_shard_bytes,
                       None if recipe.dtype in (None, "auto") else parse_dtype(recipe.dtype))
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


def _report(recipe: Recipe, m, ckpt: LayerwiseCheckpoint, res: LayerwiseScores, order: str) -> PruneReport:
    from .api import atom_report, expert_report, select_experts

    layers = adapter_for(ckpt.model).moe_layers()
    if m.grain == "expert":
        scores = res.scores[m.name]
        keep = res.keep if order == "progressive" else select_experts(layers, scores, recipe.ratio,
                                                                       recipe.expert.budget, m.prune_highest)
        return expert_report(recipe, layers, scores, keep)
    if m.grain == "atom":
        return atom_report(recipe, layers, res.scores[m.name])
    return PruneReport(method=m.name, grain="weight", ratio=recipe.ratio, budget=recipe.weight.structure,
                       scoring_order=order, model={"num_experts": None},
                       layers=[{"param": n, "active": None} for n in sorted(res.norms)])


def wanda_transform(ckpt: LayerwiseCheckpoint, norms: dict, recipe: Recipe):
    """Per source tensor: its decoder layer is materialised (once per run of consecutive keys), masked with the
    masks made from the calibration norms, and the tensor cut back out in the source's layout and dtype."""
    current: dict = {"layer": None}
    has_bs = any(".block_sparse_moe." in n for n, _ in ckpt.model.named_parameters())
    dtypes = {s.key: DTYPES[s.meta["dtype"]] for srcs in ckpt.sources.values() for s in srcs}  # source dtypes
    names = ckpt.layer_names()

    def load(j: int) -> dict:
        if current["layer"] != j:
            if current["layer"] is not None:
                ckpt.release(names[current["layer"]])
            ckpt.materialise(names[j])
            params = dict(ckpt.model.named_parameters())
            mine = {k: v for k, v in norms.items() if k.startswith(names[j] + ".")}
            masks = masks_from_norms(ckpt.model, mine, 1 - recipe.ratio, recipe.weight.structure, params=params)
            apply_masks(ckpt.model, masks)
            current.update(layer=j, params=params)
        return current["params"]

    def transform(key: str, read):
        mm = _LAYER.search(key)
        name, index = _target(key, has_bs)
        if mm is None or name not in norms:  # not a Wanda-pruned weight: as it is
            return [(key, read())]
        t = load(int(mm["layer"]))[name]  # the masked weight; the source tensor itself is not read again
        if len(index) == 1:
            t = t[index[0]]
        elif len(index) == 2:
            half = t.shape[1] // 2
            t = t[index[0], :half] if index[1] == "gate_proj" else t[index[0], half:]
        return [(key, t.detach().to(device="cpu", dtype=dtypes[key]).clone())]

    return transform
