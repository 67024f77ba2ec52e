"""Partial loading and serving for TAER: a task's model built from only its kept experts.

`load_task_model` reads the checkpoint's safetensors files and materializes only the kept experts (router rows
and biases sliced, expert count = M, top_k unchanged): the pruned shards are written to a temporary
directory (skipped experts are never read) and loaded by `from_pretrained`, so the result is exactly what
loading the full model and pruning it in memory gives. Matching runs a truncated model (layers up to the
first MoE router) so the full model is never needed at query time.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..apply.export import PruneReport
from ..apply.gemv import fast_decode
from ..apply.step import build as build_step
from ..apply.stream import prune_checkpoint
from ..checkpoint import shard_files
from ..models.keys import TOP_K_KEYS, config_value
from ..errors import MumoeError
from ..loading import compute_dtype, hf_kwargs, resolve
from ..progress import hf_bars
from .library import Match, TaskLibrary, match


def checkpoint_fingerprint(path: str | Path) -> dict:
    """`model_fingerprint` computed from the checkpoint files (router tensors only), without loading the model."""
    from ..apply.stream import meta_model
    from ..models import moe_adapter_for
    from ..models.keys import canonical, model_renamer

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    skeleton = meta_model(path)  # where the family keeps each layer's router rows (no weight read)
    layers = moe_adapter_for(skeleton).moe_layers()
    names = {id(m): n for n, m in skeleton.named_modules()}
    wanted = {canonical(f"{names[id(rt.module)]}.{rt.name}"): layer.index for layer in layers
              for rt in layer.router_tensors if rt.tensor is layer.router_weight}
    tails = {layer.index: layer.identity_experts for layer in layers}  # router rows after the routed experts
    rename = model_renamer(skeleton)  # the model built (multimodal: the text model's renames)
    routers: dict[int, torch.Tensor] = {}
    for file in shard_files(path):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                if (L := wanted.get(canonical(rename(key)))) is not None:
                    routers[L] = f.get_tensor(key)
    h = hashlib.sha256()
    for L in sorted(routers):
        h.update(routers[L].float().contiguous().numpy().tobytes())
    top_k = config_value(cfg, TOP_K_KEYS)
    return {"model_type": skeleton.config.model_type, "moe_layers": sorted(routers),
            "num_experts": [routers[L].shape[0] - tails[L] for L in sorted(routers)], "top_k": top_k,
            "router_sha256": h.hexdigest()[:16]}


def check_library(path: str | Path, lib: TaskLibrary) -> None:
    fp = checkpoint_fingerprint(path)
    if fp != lib.fingerprint:
        diff = [k for k in fp if fp[k] != lib.fingerprint.get(k)]
        raise MumoeError(f"task library was built for another model (differs in: {', '.join(diff)})")


def load_task_model(model: str | Path, lib: TaskLibrary, task: str, dtype: str | torch.dtype = "auto") -> nn.Module:
    """The model with only `task`'s kept experts, read from the checkpoint files."""
    from transformers import AutoModelForCausalLM

    path = Path(resolve(model))
    entry = lib.task(task)
    E = lib.fingerprint["num_experts"][0]
    report = PruneReport(method=f"taer:{task}", grain="expert", ratio=1 - lib.keep / E, budget="uniform",
                         model={"source": str(path), "model_type": lib.fingerprint["model_type"], "num_experts": E},
                         layers=[{"layer": L, "num_experts": E, "kept": kept, "scores": lib.scores[task][i].tolist()}
                                 for i, (L, kept) in enumerate(sorted(entry["kept"].items()))])
    with tempfile.TemporaryDirectory(prefix="mumoe-taer-") as tmp:
        out = prune_checkpoint(path, Path(tmp) / "task", report, progress=False)
        with hf_bars():
            return AutoModelForCausalLM.from_pretrained(out, dtype=compute_dtype(dtype, path), **hf_kwargs()).eval()


def load_matcher(model: str | Path, lib: TaskLibrary, dtype: str | torch.dtype = "auto") -> nn.Module:
    """A truncated model holding the decoder layers up to the first MoE router (enough to build keys);
    with key_mode="all" every layer is needed, so the full model is loaded."""
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(resolve(model))
    cfg = AutoConfig.from_pretrained(path, **hf_kwargs())
    if lib.key_mode == "first":
        from ..models import ADAPTERS

        ADAPTERS[cfg.model_type].keep_layers(cfg, lib.fingerprint["moe_layers"][0] + 1)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # the later layers' tensors are skipped on purpose
    try:
        with hf_bars():
            return AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=compute_dtype(dtype, path),
                                                        **hf_kwargs()).eval()
    finally:
        hf_logging.set_verbosity(level)


class TaskModels:
    """Task models, each loaded from the checkpoint with only its task's experts, the `capacity` most recently
    used kept in memory (an LRU): the one cache of `TaskServer` and the server's engine."""

    def __init__(self, model: str | Path, library: TaskLibrary, dtype: torch.dtype, device, capacity: int = 2,
                 int4: bool = False) -> None:
        """int4: each task model's decode steps read int4 copies of its weights (`apply.int4`, made at its load)."""
        if capacity < 1:
            raise MumoeError(f"the task-model cache holds at least 1 model, got {capacity}")
        self.model, self.library, self.dtype, self.device, self.capacity = model, library, dtype, device, capacity
        self.models: OrderedDict[str, nn.Module] = OrderedDict()
        self.int4 = int4

    def get(self, task: str) -> tuple[nn.Module, bool, float]:
        """The task's model, from the cache (made most recent) or loaded. -> (model, cached, load seconds)"""
        if task in self.models:
            self.models.move_to_end(task)
            return self.models[task], True, 0.0
        while len(self.models) >= self.capacity:
            self.models.popitem(last=False)
        t0 = time.perf_counter()
        model = load_task_model(self.model, self.library, task, self.dtype).to(self.device)
        fast_decode(model, int4_copies=self.int4)  # one-token steps as the full model's in `mumoe serve` (apply.gemv)
        build_step(model)  # and its lean one-token step (apply.step)
        self.models[task] = model
        return model, False, time.perf_counter() - t0

    def __len__(self) -> int:
        return len(self.models)

    def __contains__(self, task: str) -> bool:
        return task in self.models

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.models.values() for p in m.parameters())


@dataclass
class Served:
    text: str
    match: Match
    match_seconds: float
    load_seconds: float
    cached: bool


class TaskServer:
    """match → partial load (cached per task) → generate."""

    def __init__(self, model: str | Path, library: str | Path | TaskLibrary, dtype: str = "auto",
                 device: str | None = None, capacity: int = 2) -> None:
        from ..loading import load_tokenizer
        from ..observe.runner import resolve_device

        self.device = resolve_device(device or "cpu")

        self.model = str(model)
        self.lib = library if isinstance(library, TaskLibrary) else TaskLibrary.load(library)
        check_library(resolve(model), self.lib)
        self.dtype = compute_dtype(dtype, resolve(model), self.device)  # auto: `loading.compute_dtype`
        self.tokenizer = load_tokenizer(model)
        if self.tokenizer is None:
            raise MumoeError(f"{model} has no tokenizer")
        self.matcher = load_matcher(model, self.lib, dtype).to(self.device)
        self.cache = TaskModels(self.model, self.lib, self.dtype, self.device, capacity)

    def task_model(self, task: str) -> tuple[nn.Module, float, bool]:
        model, cached, seconds = self.cache.get(task)
        return model, seconds, cached

    def match(self, prompt: str) -> tuple[Match, torch.Tensor, float]:
        """The nearest task of a prompt. -> (match, prompt ids [1, L], seconds)"""
        ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        if ids.numel() == 0:
            raise MumoeError("empty prompt")
        t0 = time.perf_counter()
        m = match(self.matcher, self.lib, ids)
        return m, ids, time.perf_counter() - t0

    def generate(self, prompt: str, max_new_tokens: int = 48, **kwargs) -> Served:
        m, ids, t_match = self.match(prompt)
        model, t_load, cached = self.task_model(m.task)
        kwargs.setdefault("do_sample", False)
        with torch.no_grad():
            out = model.generate(ids.to(self.device), max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.eos_token_id, **kwargs)
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return Served(text, m, t_match, t_load, cached)
