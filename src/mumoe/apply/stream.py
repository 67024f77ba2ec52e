"""Work on a checkpoint's safetensors files without loading the model: AIMER scoring and expert slicing.

For scoring, each tensor is memory-mapped on its own and released before the next (fused expert tensors one
expert slice at a time), so resident memory stays at about one tensor, whatever the shard or model size. Both expert layouts are understood:
    fused   model.layers.L.mlp.experts.gate_up_proj [E, 2I, H], ...experts.down_proj [E, H, I]
    legacy  model.layers.L.mlp.experts.J.{gate,up,down}_proj.weight  (what save_pretrained writes by default)
"""

from __future__ import annotations

import json
import mmap
import re
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..criteria.expert import NormWorkspace, aimer_from_norms, matrix_norms
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


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def read_header(file: Path) -> dict[str, dict]:
    """The safetensors header: {key: {"dtype", "shape", "data_offsets"}} (offsets relative to the data start)."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    for meta in header.values():
        meta["start"] = 8 + n + meta["data_offsets"][0]
    return header


class MappedTensor:
    """One tensor (or one leading-dim slice of it) memory-mapped on its own: only its pages are ever mapped,
    so resident memory stays at about one tensor however large the shard is."""

    def __init__(self, file: Path, meta: dict, index: int | None = None) -> None:
        shape, dtype = list(meta["shape"]), _DTYPES[meta["dtype"]]
        size = dtype.itemsize
        for d in shape:
            size *= d
        start = meta["start"]
        if index is not None:  # one slice along dim 0 (one expert of a fused tensor)
            size //= shape[0]
            start += index * size
            shape = shape[1:]
        self.shape, self.dtype, self.start, self.size, self.file = shape, dtype, start, size, file

    def __enter__(self) -> torch.Tensor:
        aligned = self.start - self.start % mmap.ALLOCATIONGRANULARITY
        self._fh = open(self.file, "rb")
        self._map = mmap.mmap(self._fh.fileno(), self.start - aligned + self.size, offset=aligned,
                              access=mmap.ACCESS_READ)
        buf = memoryview(self._map)[self.start - aligned :]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: we never write to it
            return torch.frombuffer(buf, dtype=self.dtype).view(self.shape)

    def __exit__(self, *exc) -> None:
        try:  # callers `del` the tensor inside the block, which releases the buffer
            self._map.close()
        except BufferError:  # a view is still alive: the map is freed with it
            pass
        self._fh.close()


def _expert_matrices(file: Path, key: str, meta: dict):
    """Yield (layer, expert, kind, MappedTensor) for an expert tensor key; a fused gate_up is read per expert
    and split into gate and up by the caller (kind "gate_up_proj")."""
    if m := LEGACY.match(key):
        yield int(m["layer"]), int(m["e"]), KIND[m["kind"]], MappedTensor(file, meta)
    elif m := FUSED.match(key):
        for e in range(meta["shape"][0]):
            yield int(m["layer"]), e, m["kind"], MappedTensor(file, meta, e)


def stream_aimer(path: str | Path, progress: bool = True) -> dict[int, torch.Tensor]:
    """AIMER scores per decoder layer, read straight from the checkpoint. -> {layer: [E] float64}

    Bit-identical to the in-memory `criteria.expert.aimer` (same per-matrix reductions, same order)."""
    path = Path(path)
    norms: dict[int, dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))  # (l1, l2², numel)
    ws = NormWorkspace()  # one fp32 buffer of the largest matrix, reused
    for file in tqdm(shard_files(path), desc="aimer (streamed)", disable=not progress, unit="shard"):
        for key, meta in read_header(file).items():
            for L, e, kind, mapped in _expert_matrices(file, key, meta):
                with mapped as w:
                    if kind == "gate_up_proj":
                        half = w.shape[0] // 2
                        norms[L][e]["gate_proj"] = (*matrix_norms(w[:half], ws), w[:half].numel())
                        norms[L][e]["up_proj"] = (*matrix_norms(w[half:], ws), w[half:].numel())
                    else:
                        norms[L][e][kind] = (*matrix_norms(w, ws), w.numel())
                    del w
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
