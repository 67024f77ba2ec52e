"""PreMoe TAER: a task library of expert patterns, matched per query on the first MoE router's logits.

Offline, per task (a calibration text set): PEP scores per layer (TCESS or PEU), the top-M experts per
layer, and a retrieval key — the mean over the task's tokens of a per-token router statistic at the first
MoE layer (option: all MoE layers concatenated). Stored as LIB/library.json (+ LIB/tensors.safetensors for
keys, scores and the whitening matrix); validated on load.

Key statistic (`key_stat`), per token, from router logits s [E]:
    tcess   s_i·1[i = argmax s] (PreMoe's TCESS vector — the paper's key)
    prob    softmax(s)
    logit   s
Key space (`key_space`): `raw` — plain L2 between keys (the paper's matching); `whitened` — L2 after the
linear map W with W Wᵀ = (Σ + λI)⁻¹, Σ the within-task covariance of the keys of 64-token chunks of the
calibration windows, pooled over tasks (λ = 1% of the chunk keys' mean variance overall): nearest task in
Mahalanobis distance, i.e. a linear discriminant. Defaults (`logit`, `whitened`, first layer) were chosen on held-out calibration
text, not on the evaluation prompts (README, TAER).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import read_header
from ..criteria.expert import peu, tcess
from ..criteria.stats import collect_stats
from ..errors import MumoeError, MumoeFileError
from ..files import read_json
from ..models import MoELayer, moe_adapter_for
from ..observe.runner import RouteEvent
from ..select import rank

VERSION = 2
SCORES = {"tcess": tcess, "peu": peu}
KEY_STATS = ("logit", "prob", "tcess")
KEY_SPACES = ("whitened", "raw")
CHUNK = 64  # tokens per calibration chunk for the within-task covariance (a typical prompt length)
SHRINK = 0.01


def token_stat(logits: torch.Tensor, stat: str) -> torch.Tensor:
    """Per-token key statistic from router logits [..., E] -> [..., E] float64."""
    s = logits.double()
    if stat == "logit":
        return s
    if stat == "prob":
        return torch.softmax(s, dim=-1)
    if stat == "tcess":
        top = s.argmax(-1, keepdim=True)
        return torch.zeros_like(s).scatter(-1, top, s.gather(-1, top))
    raise MumoeError(f"unknown key statistic {stat!r}; use {', '.join(KEY_STATS)}")


def model_fingerprint(model: nn.Module, ckpt=None) -> dict:
    """What a library must agree with: type, MoE layers, expert counts, top_k, and a hash of the routers.
    ckpt: the model's `LayerwiseCheckpoint` when it is a meta skeleton (each router is read on its own)."""
    layers = moe_adapter_for(model).moe_layers()
    names = {id(m): n for n, m in model.named_modules()}
    h = hashlib.sha256()
    for layer in layers:
        if ckpt is None:
            h.update(layer.router_weight.detach().float().contiguous().numpy().tobytes())
            continue
        with ckpt.part(names[id(layer.router)]):
            h.update(layer.router_weight.detach().float().cpu().contiguous().numpy().tobytes())
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
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> key vector [D]
    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> per-layer [E]
    key_stat: str = "tcess"
    key_space: str = "raw"
    whiten: torch.Tensor | None = None  # [D, D] float64 (key_space "whitened")

    def distance(self, key: torch.Tensor, task: str) -> float:
        """L2 between a prompt key and a task's key, in the library's key space."""
        diff = (key.double() - self.keys[task].double())[None]  # [1, D]
        if self.whiten is not None:
            diff = diff @ self.whiten
        return float(diff.norm())

    def nearest(self, key: torch.Tensor) -> "Match":
        """The task whose key is nearest to a prompt key (and the runner-up, to see ambiguity)."""
        dist = sorted((self.distance(key, name), name) for name in self.keys)
        second = dist[1] if len(dist) > 1 else (None, None)
        return Match(dist[0][1], dist[0][0], second[1], second[0])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"mumoe_taer_version": VERSION, "fingerprint": self.fingerprint, "keep": self.keep,
                "score": self.score, "key_mode": self.key_mode, "key_stat": self.key_stat,
                "key_space": self.key_space, "tasks": self.tasks}
        tensors = {f"key/{n}": k.contiguous() for n, k in self.keys.items()}
        if self.whiten is not None:
            tensors["whiten"] = self.whiten.contiguous()
        for n, per_layer in self.scores.items():
            tensors.update({f"scores/{n}/{i}": s.contiguous() for i, s in enumerate(per_layer)})
        save_file(tensors, path / "tensors.safetensors")
        (path / "library.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TaskLibrary":
        path = Path(path)
        if not path.is_dir():
            raise MumoeFileError(f"task library not found: {path} (build one with `mumoe taer build`)")
        meta = read_json(path / "library.json", "the task library")
        tfile = path / "tensors.safetensors"
        if not tfile.is_file():
            raise MumoeFileError(f"task library {path} is incomplete: {tfile.name} is missing")
        read_header(tfile)  # truncated / not safetensors: one line naming the file
        try:
            tensors = load_file(tfile)
            if meta.get("mumoe_taer_version") not in (1, VERSION):  # 1: TCESS keys, raw L2
                raise ValueError(f"version {meta.get('mumoe_taer_version')} (expected {VERSION})")
            lib = cls(meta["fingerprint"], int(meta["keep"]), meta["score"], meta["key_mode"], meta["tasks"],
                      key_stat=meta.get("key_stat", "tcess"), key_space=meta.get("key_space", "raw"))
            if lib.key_stat not in KEY_STATS or lib.key_space not in KEY_SPACES:
                raise ValueError(f"unknown key {lib.key_stat}/{lib.key_space}")
            if lib.key_space == "whitened":
                lib.whiten = tensors["whiten"]
            n_layers = len(lib.fingerprint["moe_layers"])
            for name, task in lib.tasks.items():
                lib.keys[name] = tensors[f"key/{name}"]
                lib.scores[name] = [tensors[f"scores/{name}/{i}"] for i in range(n_layers)]
                task["kept"] = {int(k): v for k, v in task["kept"].items()}
                if lib.whiten is not None and lib.whiten.shape != (lib.keys[name].numel(),) * 2:
                    raise ValueError("whitening matrix does not match the keys")
                if sorted(task["kept"]) != lib.fingerprint["moe_layers"] or any(
                        len(v) != lib.keep for v in task["kept"].values()):
                    raise ValueError(f"task {name!r} has inconsistent kept sets")
        except KeyError as e:
            raise MumoeError(f"corrupted task library {path}: missing entry {e}") from e
        except (ValueError, TypeError, AttributeError, OSError) as e:
            raise MumoeFileError(f"corrupted task library {path}: {str(e).splitlines()[0]}") from e
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
                  key_mode: str = "first", batch_size: int = 8, progress: bool = True, key_stat: str = "logit",
                  key_space: str = "whitened") -> TaskLibrary:
    """tasks: name -> calibration windows [N, L]. Keeps the top-`keep` experts per layer for each task; keys as
    in the module docstring. `model` may be a `LayerwiseCheckpoint`: then every task's windows run through one
    decoder layer at a time, read from the checkpoint files (the model is never loaded; same library)."""
    from ..observe.layerwise import LayerwiseCheckpoint

    ckpt = model if isinstance(model, LayerwiseCheckpoint) else None
    model = ckpt.model if ckpt is not None else model
    if score not in SCORES:
        raise MumoeError(f"unknown PEP score {score!r}; use tcess or peu")
    if key_mode not in ("first", "all"):
        raise MumoeError(f"unknown key mode {key_mode!r}; use first or all")
    if key_stat not in KEY_STATS:
        raise MumoeError(f"unknown key statistic {key_stat!r}; use {', '.join(KEY_STATS)}")
    if key_space not in KEY_SPACES:
        raise MumoeError(f"unknown key space {key_space!r}; use {', '.join(KEY_SPACES)}")
    adapter = moe_adapter_for(model)
    adapter.check_expert_removal(model.config.model_type)  # a task model holds `keep` experts per layer
    layers = adapter.moe_layers()
    top_k, E = layers[0].top_k, min(l.num_experts for l in layers)
    if not top_k <= keep <= E:
        raise MumoeError(f"--keep {keep} must be between top_k={top_k} and the expert count {E}")
    if any(l.n_group and l.n_group > 1 for l in layers):
        raise MumoeError("task libraries for group-limited routers are not supported yet")
    if any(l.fixed_routing for l in layers):
        raise MumoeError("task libraries are not supported where layers pick experts from a fixed token table (hash "
                         "routing)")
    lib = TaskLibrary(model_fingerprint(model, ckpt), keep, score, key_mode, key_stat=key_stat, key_space=key_space)
    chunks = {}
    for name, wins in tasks.items():
        keys = _KeyCollector(_key_layers(layers, key_mode), key_stat, wins.shape[1])
        if ckpt is None:
            stats = collect_stats(model, layers, wins, batch_size, experts=False, progress=progress, on_route=keys)
        else:
            from ..observe.collectors import ExpertStats, OnRoute
            from ..observe.sequential import sweep

            col = ExpertStats(layers, experts=False)
            sweep(ckpt, wins, [col, OnRoute(keys)], batch_size=batch_size, progress=progress)
            stats = col.result()
        per_layer = [SCORES[score](st) for st in stats]
        lib.scores[name] = [s.float() for s in per_layer]
        lib.tasks[name] = {"kept": {l.index: sorted(rank(s)[:keep].tolist()) for l, s in zip(layers, per_layer)},
                           "windows": int(wins.shape[0])}
        lib.keys[name], chunks[name] = keys.result()
    if key_space == "whitened":
        lib.whiten = whitening(chunks)
    return lib


def _key_layers(layers: list[MoELayer], key_mode: str) -> list[MoELayer]:
    return layers[:1] if key_mode == "first" else layers


class _KeyCollector:
    """Key material from the route events of the calibration forward (no second pass): per key layer, the sum
    of the token statistic over all tokens and the keys of the windows' CHUNK-token chunks."""

    def __init__(self, layers: list[MoELayer], stat: str, seqlen: int) -> None:
        self.slot = {l.index: i for i, l in enumerate(layers)}
        self.stat, self.seqlen = stat, seqlen
        self.sums: list = [0] * len(layers)
        self.tokens = 0
        self.chunks: list[list[torch.Tensor]] = [[] for _ in layers]

    def __call__(self, event: RouteEvent) -> None:
        i = self.slot.get(event.layer.index)
        if i is None:
            return
        f = token_stat(event.logits, self.stat).reshape(-1, self.seqlen, event.logits.shape[-1])  # [B, L, E]
        self.sums[i] = self.sums[i] + f.sum((0, 1))
        if i == 0:
            self.tokens += f.shape[0] * f.shape[1]
        self.chunks[i] += [c.mean(1) for c in f.split(CHUNK, dim=1)]  # each [B, E]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean key over every token [D] float32, chunk keys [n, D] float64), layers concatenated."""
        mean = torch.cat([s / self.tokens for s in self.sums]).float().cpu()
        return mean, torch.cat([torch.cat(c) for c in self.chunks], dim=-1).cpu()


def whitening(chunks: dict[str, torch.Tensor]) -> torch.Tensor:
    """W [D, D] with W Wᵀ = (Σ_w + λI)⁻¹: Σ_w the within-task covariance of chunk keys pooled over tasks
    (name -> [n, D]), λ = SHRINK × the mean variance of all chunk keys around their overall mean (so that
    tasks whose keys never vary do not blow the map up); identity when no key varies at all."""
    keys = torch.cat(list(chunks.values())).double()  # [n, D]
    centred = torch.cat([c.double() - c.double().mean(0) for c in chunks.values()])
    cov = centred.T @ centred / keys.shape[0]
    scale = float((keys - keys.mean(0)).pow(2).mean(0).mean())
    D = cov.shape[0]
    if scale <= 0:
        return torch.eye(D, dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(cov + SHRINK * scale * torch.eye(D, dtype=torch.float64)))


class _Stop(Exception):
    pass


@torch.no_grad()
def router_logits(model: nn.Module, ids: torch.Tensor, wanted: list[MoELayer]) -> list[torch.Tensor]:
    """Router logits [B, L, E] of the `wanted` MoE layers for ids [B, L]; the forward stops after the last of
    them (nothing later is computed)."""
    out: dict[int, torch.Tensor] = {}

    def hook(module, args, output, index, E):
        out[index] = output[0].detach().reshape(*ids.shape, -1)[..., :E]  # (identity experts' columns left out)
        if len(out) == len(wanted):
            raise _Stop

    handles = [l.router.register_forward_hook(lambda m, a, o, i=l.index, E=l.num_experts: hook(m, a, o, i, E))
               for l in wanted]
    try:
        model(input_ids=ids.to(model.device), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return [out[l.index].cpu() for l in wanted]


@torch.no_grad()
def prompt_key(model: nn.Module, ids: torch.Tensor, key_mode: str = "first", layers: list[MoELayer] | None = None,
               key_stat: str = "tcess") -> torch.Tensor:
    """The prompt's key: the mean over its tokens of the key statistic at the first MoE router (the forward
    stops there) or, key_mode="all", at every MoE layer concatenated. ids [L] or [1, L] -> [D] float32."""
    ids = ids.reshape(1, -1)
    if ids.numel() == 0:
        raise MumoeError("empty prompt")
    wanted = _key_layers(layers or moe_adapter_for(model).moe_layers(), key_mode)
    return key_from_logits([lg[0] for lg in router_logits(model, ids, wanted)], key_stat)


def key_from_logits(logits: list[torch.Tensor], key_stat: str) -> torch.Tensor:
    """A prompt's key from its router logits at the key layers (each [T, E]): the mean over its tokens of the
    key statistic, layers concatenated. -> [D] float32"""
    return torch.cat([token_stat(lg, key_stat).mean(0) for lg in logits]).float().cpu()


@dataclass
class Match:
    task: str
    distance: float
    runner_up: str | None
    runner_up_distance: float | None


def match(model: nn.Module, lib: TaskLibrary, ids: torch.Tensor) -> Match:
    """Nearest task by L2 (in the library's key space) between the prompt's key and each task's key, with the
    runner-up, to see ambiguity."""
    return lib.nearest(prompt_key(model, ids, lib.key_mode, key_stat=lib.key_stat))
