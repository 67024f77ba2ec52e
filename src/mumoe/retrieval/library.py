"""PreMoe TAER: a task library of expert patterns, matched per query on the first MoE router's logits.

Offline, per task (a calibration text set): PEP scores per layer (TCESS or PEU), the top-M experts per
layer, and a retrieval key — the task's mean first-MoE-layer TCESS vector (option: all MoE layers
concatenated). Stored as LIB/library.json (+ LIB/tensors.safetensors for keys and scores); validated on load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..criteria.expert import peu, tcess
from ..criteria.stats import collect_stats
from ..errors import MumoeError
from ..models import MoELayer, moe_adapter_for
from ..select import rank

VERSION = 1
SCORES = {"tcess": tcess, "peu": peu}


def model_fingerprint(model: nn.Module) -> dict:
    """What a library must agree with: type, MoE layers, expert counts, top_k, and a hash of the routers."""
    layers = moe_adapter_for(model).moe_layers()
    h = hashlib.sha256()
    for layer in layers:
        h.update(layer.router_weight.detach().float().contiguous().numpy().tobytes())
    return {"model_type": model.config.model_type, "moe_layers": [l.index for l in layers],
            "num_experts": [l.num_experts for l in layers], "top_k": layers[0].top_k,
            "router_sha256": h.hexdigest()[:16]}


@dataclass
class TaskLibrary:
    fingerprint: dict
    keep: int  # M experts kept per layer
    score: str  # tcess | peu
    key_mode: str  # first | all
    tasks: dict[str, dict] = field(default_factory=dict)  # name -> {"kept": {layer: [...]}, "source": str}
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> key vector
    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> per-layer [E]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"mumoe_taer_version": VERSION, "fingerprint": self.fingerprint, "keep": self.keep,
                "score": self.score, "key_mode": self.key_mode, "tasks": self.tasks}
        tensors = {f"key/{n}": k.contiguous() for n, k in self.keys.items()}
        for n, per_layer in self.scores.items():
            tensors.update({f"scores/{n}/{i}": s.contiguous() for i, s in enumerate(per_layer)})
        save_file(tensors, path / "tensors.safetensors")
        (path / "library.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TaskLibrary":
        path = Path(path)
        try:
            meta = json.loads((path / "library.json").read_text())
            tensors = load_file(path / "tensors.safetensors")
            if meta.get("mumoe_taer_version") != VERSION:
                raise ValueError(f"version {meta.get('mumoe_taer_version')} (expected {VERSION})")
            lib = cls(meta["fingerprint"], int(meta["keep"]), meta["score"], meta["key_mode"], meta["tasks"])
            n_layers = len(lib.fingerprint["moe_layers"])
            for name, task in lib.tasks.items():
                lib.keys[name] = tensors[f"key/{name}"]
                lib.scores[name] = [tensors[f"scores/{name}/{i}"] for i in range(n_layers)]
                task["kept"] = {int(k): v for k, v in task["kept"].items()}
                if sorted(task["kept"]) != lib.fingerprint["moe_layers"] or any(
                        len(v) != lib.keep for v in task["kept"].values()):
                    raise ValueError(f"task {name!r} has inconsistent kept sets")
        except FileNotFoundError as e:
            raise MumoeError(f"task library not found: {e.filename}") from e
        except (ValueError, KeyError, TypeError, json.JSONDecodeError, OSError) as e:
            raise MumoeError(f"corrupted task library {path}: {e}") from e
        if not lib.tasks:
            raise MumoeError(f"task library {path} holds no tasks")
        return lib

    def check_model(self, model: nn.Module) -> None:
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            diff = [k for k in fp if fp[k] != self.fingerprint.get(k)]
            raise MumoeError(f"task library was built for another model (differs in: {', '.join(diff)})")

    def task(self, name: str) -> dict:
        if name not in self.tasks:
            raise MumoeError(f"unknown task {name!r}; library holds: {', '.join(sorted(self.tasks))}")
        return self.tasks[name]


def build_library(model: nn.Module, tasks: dict[str, torch.Tensor], keep: int, score: str = "tcess",
                  key_mode: str = "first", batch_size: int = 8, progress: bool = True) -> TaskLibrary:
    """tasks: name -> calibration windows [N, L]. Keeps the top-`keep` experts per layer for each task."""
    if score not in SCORES:
        raise MumoeError(f"unknown PEP score {score!r}; use tcess or peu")
    if key_mode not in ("first", "all"):
        raise MumoeError(f"unknown key mode {key_mode!r}; use first or all")
    layers = moe_adapter_for(model).moe_layers()
    top_k, E = layers[0].top_k, min(l.num_experts for l in layers)
    if not top_k <= keep <= E:
        raise MumoeError(f"--keep {keep} must be between top_k={top_k} and the expert count {E}")
    if any(l.n_group and l.n_group > 1 for l in layers):
        raise MumoeError("task libraries for group-limited routers are not supported yet")
    lib = TaskLibrary(model_fingerprint(model), keep, score, key_mode)
    for name, wins in tasks.items():
        stats = collect_stats(model, layers, wins, batch_size, experts=False, progress=progress)
        per_layer = [SCORES[score](st) for st in stats]
        lib.scores[name] = [s.float() for s in per_layer]
        lib.tasks[name] = {"kept": {l.index: sorted(rank(s)[:keep].tolist()) for l, s in zip(layers, per_layer)},
                           "windows": int(wins.shape[0])}
        keys = [tcess(st).float() for st in stats]
        lib.keys[name] = keys[0] if key_mode == "first" else torch.cat(keys)
    return lib


class _Stop(Exception):
    pass


@torch.no_grad()
def prompt_key(model: nn.Module, ids: torch.Tensor, key_mode: str = "first", layers: list[MoELayer] | None = None) -> torch.Tensor:
    """The prompt's key: mean TCESS vector of its tokens at the first MoE router (the forward stops there)
    or, key_mode="all", at every MoE layer concatenated. ids [L] or [1, L]."""
    ids = ids.reshape(1, -1)
    if ids.numel() == 0:
        raise MumoeError("empty prompt")
    layers = layers or moe_adapter_for(model).moe_layers()
    wanted = layers[:1] if key_mode == "first" else layers
    keys: dict[int, torch.Tensor] = {}

    def hook(module, args, output, index):
        logits = output[0].detach().double().reshape(-1, output[0].shape[-1])  # [T, E]
        top = logits.argmax(-1)
        keys[index] = (torch.zeros(logits.shape[-1], dtype=torch.float64)
                       .index_add_(0, top, logits.gather(-1, top[:, None])[:, 0]) / logits.shape[0]).float()
        if len(keys) == len(wanted):
            raise _Stop  # nothing after the last router we need is computed

    handles = [l.router.register_forward_hook(lambda m, a, o, i=l.index: hook(m, a, o, i)) for l in wanted]
    try:
        model(input_ids=ids.to(model.device), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat([keys[l.index] for l in wanted])


@dataclass
class Match:
    task: str
    distance: float
    runner_up: str | None
    runner_up_distance: float | None


def match(model: nn.Module, lib: TaskLibrary, ids: torch.Tensor) -> Match:
    """Nearest task by L2 between the prompt's key and each task's key (with the runner-up, to see ambiguity)."""
    key = prompt_key(model, ids, lib.key_mode)
    dist = sorted((float(torch.dist(key, k)), name) for name, k in lib.keys.items())
    second = dist[1] if len(dist) > 1 else (None, None)
    return Match(dist[0][1], dist[0][0], second[1], second[0])
