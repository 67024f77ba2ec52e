"""Work on a checkpoint's safetensors files without loading the model: AIMER scoring and expert slicing.

Tensors are memory-mapped and read one at a time (fused expert tensors one expert slice at a time), so the
peak memory is about one tensor, whatever the model size. Both expert layouts are understood:
    fused   model.layers.L.mlp.experts.gate_up_proj [E, 2I, H], ...experts.down_proj [E, H, I]
    legacy  model.layers.L.mlp.experts.J.{gate,up,down}_proj.weight  (what save_pretrained writes by default)
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..criteria.expert import aimer_from_norms, matrix_norms
from ..errors import MumoeError
from ..models.base import EXPERT_COUNT_KEYS
from .export import PruneReport, atomic_output

# The MoE block is `mlp` in v5 and in most hub checkpoints, `block_sparse_moe` in Mixtral's; Mixtral's
# legacy expert matrices are w1 (gate), w3 (up), w2 (down).
_BLOCK = r"^(?P<pre>.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts)"
FUSED = re.compile(_BLOCK + r"\.(?P<kind>gate_up_proj|down_proj)$")
LEGACY = re.compile(_BLOCK + r"\.(?P<e>\d+)\.(?P<kind>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
ROUTER = re.compile(r"^.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.gate\.(?P<kind>weight|bias|e_score_correction_bias)$")
KIND = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj", "w1": "gate_proj", "w3": "up_proj",
        "w2": "down_proj"}


def shard_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, in index order."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MumoeError(f"{path} holds no .safetensors files")
    return files


ORDER = ("gate_proj", "up_proj", "down_proj")  # the in-memory AIMER's summation order


def _expert_matrices(f, key: str):
    """Yield (layer, expert, kind, matrix) for an expert tensor key; fused gate_up is split into gate and up."""
    if m := LEGACY.match(key):
        yield int(m["layer"]), int(m["e"]), KIND[m["kind"]], f.get_tensor(key)
    elif m := FUSED.match(key):
        sl = f.get_slice(key)
        E, rows = sl.get_shape()[0], sl.get_shape()[1]
        for e in range(E):
            w = sl[e]  # one expert at a time: [2I, H] or [H, I]
            if m["kind"] == "gate_up_proj":
                yield int(m["layer"]), e, "gate_proj", w[: rows // 2]
                yield int(m["layer"]), e, "up_proj", w[rows // 2 :]
            else:
                yield int(m["layer"]), e, "down_proj", w


def stream_aimer(path: str | Path, progress: bool = True) -> dict[int, torch.Tensor]:
    """AIMER scores per decoder layer, read straight from the checkpoint. -> {layer: [E] float64}

    Bit-identical to the in-memory `criteria.expert.aimer` (same per-matrix reductions, same order)."""
    path = Path(path)
    norms: dict[int, dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))  # (l1, l2², numel)
    for file in tqdm(shard_files(path), desc="aimer (streamed)", disable=not progress, unit="shard"):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                for L, e, kind, mat in _expert_matrices(f, key):
                    norms[L][e][kind] = (*matrix_norms(mat), mat.numel())
    if not norms:
        raise MumoeError(f"{path}: no routed-expert tensors found (is it an MoE checkpoint?)")
    out = {}
    for L in sorted(norms):
        E = max(norms[L]) + 1
        if len(norms[L]) != E or any(set(norms[L][e]) != set(ORDER) for e in range(E)):
            raise MumoeError(f"{path}: layer {L} has incomplete expert tensors")
        l1 = torch.zeros(E, dtype=torch.float64)
        l2 = torch.zeros(E, dtype=torch.float64)
        for e in range(E):
            for kind in ORDER:
                l1[e] += norms[L][e][kind][0]
                l2[e] += norms[L][e][kind][1]
        out[L] = aimer_from_norms(l1, l2, sum(norms[L][0][k][2] for k in ORDER))
    return out


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
