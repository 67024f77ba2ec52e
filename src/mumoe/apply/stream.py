"""Streamed export: the pruned checkpoint written shard by shard from the source safetensors files (experts and
router rows sliced on the way), the model never loaded. Reading: `mumoe.checkpoint`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoint import FUSED, KIND, LEGACY, ROUTER, read_header, shard_files  # noqa: F401
from ..errors import MumoeError
from ..models.base import EXPERT_COUNT_KEYS
from .export import PruneReport, atomic_output

def _rewrite_config(cfg: dict, n: int) -> None:
    for key in EXPERT_COUNT_KEYS:
        if key in cfg:
            cfg[key] = n
    for sub in ("text_config", "language_config", "llm_config"):
        if isinstance(cfg.get(sub), dict):
            _rewrite_config(cfg[sub], n)


def prune_checkpoint(path: str | Path, out: str | Path, report: PruneReport, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Write `path` with only the experts kept in `report`, shard by shard, atomically (temp dir + rename)."""
    path = Path(path)
    keep = report.kept()
    counts = {len(v) for v in keep.values()}
    if len(counts) != 1:
        raise MumoeError("streamed export needs the same expert count in every layer (uniform budget)")
    with atomic_output(out, overwrite) as tmp:
        weight_map = {}
        files = shard_files(path)
        for file in tqdm(files, desc="writing pruned shards", disable=not progress, unit="shard"):
            tensors = _pruned_shard(file, keep)
            save_file(tensors, tmp / file.name, metadata={"format": "pt"})
            weight_map.update({k: file.name for k in tensors})
            del tensors
        if len(files) > 1:
            index = {"metadata": {}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        for extra in path.iterdir():
            if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name not in (
                    "model.safetensors.index.json", "pruning.json", "config.json", "card.json", "CARD.md"):
                shutil.copy2(extra, tmp / extra.name)
        cfg = json.loads((path / "config.json").read_text())
        _rewrite_config(cfg, counts.pop())
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "pruning.json").write_text(report.to_json())
    return Path(out)


def _pruned_shard(file: Path, keep: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """One shard's tensors with dropped experts removed (legacy experts renumbered), router rows sliced."""
    tensors = {}
    with safe_open(file, "pt") as f:
        for key in f.keys():
            if (m := LEGACY.match(key)) and int(m["layer"]) in keep:
                kept = keep[int(m["layer"])]
                if int(m["e"]) in kept:
                    tensors[f"{m['pre']}.{kept.index(int(m['e']))}.{m['kind']}.weight"] = f.get_tensor(key)
            elif (m := FUSED.match(key)) and int(m["layer"]) in keep:
                sl = f.get_slice(key)
                tensors[key] = torch.stack([sl[e] for e in keep[int(m["layer"])]])
            elif (m := ROUTER.match(key)) and int(m["layer"]) in keep:
                tensors[key] = f.get_tensor(key).index_select(0, torch.tensor(keep[int(m["layer"])]))
            else:
                tensors[key] = f.get_tensor(key)
    return tensors
