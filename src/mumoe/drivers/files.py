"""The files driver: calibration-free scores read straight from a checkpoint's safetensors files (the model is
never loaded) and the pruned checkpoint written shard by shard. For methods with a `from_files` scorer (AIMER;
STUN's router-distance clusters, one decoder layer resident at a time), one stage, one-shot; per-layer counts
are written in mumoe's form."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from ..apply.report import PruneReport
from ..criteria import get_method
from ..criteria.layerwise import LayerwiseScores
from ..errors import MumoeError
from ..grains import get_grain
from .record import finish, stage_report


def runs_from_files(recipe) -> bool:
    """Whether the files driver can run `recipe`."""
    stage = recipe.stages[0]
    grain = get_grain(stage.grain)
    return (len(recipe.stages) == 1 and get_method(stage.method).from_files is not None
            and grain.order(stage.part) == "one-shot")


def prune_files(path: str | Path, recipe, out: str | Path, overwrite: bool = False, progress: bool = True,
                verbose: bool = False, say: Callable[[str], None] | None = None) -> PruneReport:
    """Score `recipe`'s method from the files at `path`, select, and write the pruned checkpoint to `out`."""
    from ..apply.export import check_output_dir
    from ..apply.stream import write_streamed
    from ..checkpoint import check_files
    from ..files import read_json
    from ..models.keys import EXPERT_COUNT_KEYS, TOP_K_KEYS, config_value
    from ..models import moe_adapter_for
    from ..observe.layerwise import LayerwiseCheckpoint

    if not runs_from_files(recipe):
        raise MumoeError(f"{recipe.describe()} cannot run from the checkpoint files alone; load the model "
                         "(mumoe.prune on a loaded model, or the layer-sequential driver)")
    path = Path(path)
    check_output_dir(out, overwrite, source=path)
    cfg = read_json(path / "config.json", "the model config")
    check_files(path)
    ckpt = LayerwiseCheckpoint(path)  # every tensor the model needs is in the files, with its shape (headers only)
    top_k = config_value(cfg, TOP_K_KEYS)
    if top_k is None or config_value(cfg, EXPERT_COUNT_KEYS) is None:
        raise MumoeError(f"{path}: config has no routed experts; expert pruning needs an MoE checkpoint")
    n_group, topk_group = config_value(cfg, ("n_group",)), config_value(cfg, ("topk_group",))
    m = get_method(recipe.method)
    t0 = time.perf_counter()
    scores = m.from_files(path, progress)  # decoder layer -> [E] (or a rule's features: STUN's distances, Gram)
    E = int(config_value(cfg, EXPERT_COUNT_KEYS))
    t_score = time.perf_counter() - t0
    fixed = {l.index for l in moe_adapter_for(ckpt.model).moe_layers() if l.fixed_routing}  # (hash layers: whole)
    layers = [SimpleNamespace(index=j, num_experts=E, top_k=int(top_k), n_group=n_group, topk_group=topk_group,
                              fixed_routing=j in fixed) for j in scores]
    res = LayerwiseScores(scores={m.name: list(scores.values())}, layer_index=list(scores))
    grain = get_grain(recipe.grain)
    grain.check_layerwise(recipe, layers)  # (a global budget on a group-limited router is refused)
    plan = grain.plan_layerwise(recipe, layers, res)
    report = finish(stage_report(recipe, plan), recipe, {},
                    {"source": str(path), "model_type": cfg.get("model_type")})
    report.removed = _removed(ckpt, report)
    if verbose:
        for line in grain.layer_lines(report.layers):
            print(line)
        print(f"  scored {len(scores)} layers from the checkpoint files in {t_score:.2f}s (model not loaded)")
    transform, changes = grain.transform(plan, ckpt, recipe)
    write_streamed(path, out, report, transform, changes, overwrite, progress)
    return report


def _removed(ckpt, report: PruneReport) -> dict:
    """pruning.json's `removed` for whole experts dropped: every routed expert's weights (from the skeleton's
    shapes) and those of the dropped ones (the in-memory count's value for weights without exact zeros)."""
    from ..apply.experts import removed_record
    from ..models import adapter_for

    layers = {layer.index: layer for layer in adapter_for(ckpt.model).moe_layers()}
    total = kept = 0
    for entry in report.layers:
        experts = layers[entry["layer"]].experts
        per = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()  # meta tensors: shapes only
        total += entry["num_experts"] * per
        kept += len(entry["kept"]) * per
    return removed_record((total, total), (kept, kept))
