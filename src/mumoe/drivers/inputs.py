"""What every driver checks and prepares first: the model argument, its calibration windows, token ids that fit
its vocabulary, weights that are really loaded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..errors import MumoeError
from ..observe.calib import spec_windows, tokenize, windows


def _is_path(calib) -> bool:
    """A path or bundled-split name (else raw calibration text)."""
    if isinstance(calib, Path):
        return True
    if not isinstance(calib, str) or "\n" in calib or len(calib) > 4096:
        return False
    if calib == "domain" or calib.startswith("domain:"):
        return True
    try:
        return Path(calib).exists()
    except OSError:  # a name too long for the file system: text
        return False


def _sources(calib) -> tuple[str, ...]:
    """What a recipe records of the `calib` argument of the Python API."""
    if calib is None:
        return ()
    if isinstance(calib, torch.Tensor):
        return ("tensor",)
    if isinstance(calib, (list, tuple)):
        return tuple(str(c) for c in calib)
    return (str(calib),) if _is_path(calib) else ("text",)


def calibration(recipe, calib=None, tokenizer=None) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """The recipe's calibration windows: (ids [N, L] or None, source index per window [N] or None, info).
    recipe: a Recipe, or a CalibSpec alone (a run that is not a recipe: quantize, eval --skip). `calib` (API
    only) overrides the recipe's sources: token ids [N, L], raw text, or paths."""
    spec = getattr(recipe, "calib", recipe)
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.long, torch.int32, torch.int64):
            raise MumoeError("calib tensor must be integer token ids of shape [N, L]")
        if calib.shape[0] == 0 or calib.shape[1] == 0:
            raise MumoeError(f"calib tensor holds no tokens (shape {list(calib.shape)})")
        return calib.long(), None, {"source": "tensor", "nsamples": calib.shape[0], "seqlen": calib.shape[1]}
    if calib is not None and not isinstance(calib, (list, tuple)) and not _is_path(calib):  # raw text
        if tokenizer is None:
            raise MumoeError("calibration text needs a tokenizer (this model has none); pass token ids [N, L]")
        wins = windows(tokenize(tokenizer, str(calib)), spec.seqlen, spec.nsamples, spec.seed)
        return wins, None, {"source": "text", "nsamples": wins.shape[0], "seqlen": spec.seqlen, "seed": spec.seed}
    if calib is not None:
        spec = replace(spec, sources=_sources(calib))
    if not spec.sources:
        return None, None, {}
    if any(s in ("tensor", "text") for s in spec.sources):
        raise MumoeError("this recipe was calibrated on token ids or text passed in from Python; pass them again "
                         "(mumoe.prune(model, recipe, calib=...))")
    wins, groups, info = spec_windows(tokenizer, spec)
    return wins, (groups if len(info["sources"]) > 1 else None), info


def check_model_arg(model, what: str = "prune") -> nn.Module:
    """The API's `model` argument: a loaded transformers causal LM (not a path, not another object)."""
    if isinstance(model, (str, Path)):
        raise MumoeError(f"mumoe.{what} takes a loaded model, got the path {str(model)!r}: load it first with "
                         "mumoe.load(PATH) (or run `mumoe prune PATH ...`, which never loads more than it needs)")
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise MumoeError(f"mumoe.{what} takes a transformers causal LM (an nn.Module with .config), got "
                         f"{type(model).__name__}")
    return model


def check_token_ids(model: nn.Module, wins: torch.Tensor | None) -> None:
    """Calibration ids must index the model's embedding table (an IndexError deep in the forward otherwise)."""
    if wins is None or not wins.numel():
        return
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    lo, hi = int(wins.min()), int(wins.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise MumoeError(f"calibration token ids span [{lo}, {hi}], outside the model's vocabulary [0, {vocab}); "
                         "were they made with another tokenizer?")


def check_materialised(model: nn.Module) -> None:
    """A model whose weights are on the meta device (built with `torch.device("meta")` or `init_empty_weights`,
    never loaded) cannot be scored or pruned: one line, not a NotImplementedError from deep in torch."""
    meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise MumoeError(f"the model's weights are not loaded (parameter {meta} is on the meta device): load it "
                         "with mumoe.load(PATH), or prune the checkpoint folder with `mumoe prune PATH` "
                         "(layer by layer, never loaded whole)")


def calib_line(recipe, prepared) -> str:
    """What calibration the run got (windows actually cut, and why fewer than asked)."""
    got = prepared[2]["nsamples"]
    return (f"  calibration: {got} windows x {recipe.calib.seqlen} tokens from {', '.join(recipe.calib.sources)}"
            + ("" if recipe.calib.seed is None else f" (random windows, seed {recipe.calib.seed})")
            + ("" if got == recipe.calib.nsamples else f" — {recipe.calib.nsamples} asked for, the text holds fewer"))


def model_config(name: str):
    """The model's config without its weights (for the checks that must run before loading); None if it
    cannot be read cheaply (a hub id that is not cached: the load itself then says what is wrong)."""
    from ..loading import read_config, resolve

    if name.startswith("tiny:"):
        from ..models.tiny import tiny_config

        return tiny_config(name[len("tiny:"):])
    path = Path(resolve(name))
    if not (path / "config.json").exists():
        return None
    return read_config(path)


def load_dtype(dtype: str | None, name: str | None, device: str | None):
    """The dtype the model runs in (`loading.compute_dtype`: "auto" = the checkpoint's own, fp32 on the CPU for
    a bf16/fp16 one) on `device` (None: cpu)."""
    from ..loading import compute_dtype
    from ..observe.runner import resolve_device

    return compute_dtype(dtype or "auto", name, resolve_device(device or "cpu"))


def load_model(name: str, dtype: str | None, device: str | None):
    """load() in `dtype` (default auto: `loading.compute_dtype`), moved to `device` (default cpu)."""
    from ..loading import check_model, compute_dtype, load
    from ..observe.runner import resolve_device

    dev = resolve_device(device or "cpu")  # a missing GPU fails before the weights are read
    check_model(name)  # config, index and safetensors headers: before the weights are read
    model = load(name, compute_dtype(dtype or "auto", name, dev))
    return model.to(dev) if dev.type != "cpu" else model
