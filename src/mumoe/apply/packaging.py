"""What an export carries besides its weights, kept as the source had it, so that every engine reads the export
the way it read the source: the tokenizer and other side files copied byte for byte, config.json with the
source's own spelling (only values change; the key older transformers and llama.cpp read for the expert count
added when the source lacks it), and the weights in the source's dtype unless the user asked for another.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

# never copied from the source: weights and records an export writes itself
SKIP_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "pruning.json", "config.json",
              "card.json", "CARD.md")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx")
_NOT_CHANGES = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures", "auto_map"}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def source_folder(model: nn.Module) -> Path | None:
    """The folder a model's files came from: a local checkpoint, or the hub cache's snapshot of a hub id; None
    for a model built from a config (tiny:ARCH, from_config)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    if Path(name).is_dir():
        return Path(name) if (Path(name) / "config.json").exists() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(name, "config.json", local_files_only=True)
    except Exception:  # not a hub id, or not in the cache: no source files to copy
        return None
    return Path(found).parent if found else None


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy every file of `src` that is not weights or a record (tokenizer.json, tokenizer_config.json,
    generation_config.json, chat templates, licences, modelling code ...) byte for byte. -> the names."""
    names = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in SKIP_FILES \
                and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
            names.append(f.name)
    return names


def _changed(before: dict, after: dict) -> dict:
    return {k: v for k, v in after.items() if k not in _NOT_CHANGES and not k.startswith("_")
            and isinstance(v, (int, float, str, bool, list, type(None))) and before.get(k, object()) != v}


def _spell(cfg: dict, changes: dict, aliases: dict[str, str]) -> None:
    """Set each change under the key the source uses: the key itself, or an alias of it (attribute_map)."""
    for key, value in changes.items():
        spelled = [a for a, real in aliases.items() if real == key and a in cfg]
        if key in cfg or not spelled:
            cfg[key] = value
        for alias in spelled:
            cfg[alias] = value


def export_config(source_json: dict, before, after, expert_count_key: str | None = None,
                  dtype: torch.dtype | None = None) -> dict:
    """The source's config.json with the values pruning changed (`before` -> `after`: the source's and the
    pruned model's transformers configs) written under the source's own keys; `expert_count_key` (the key
    transformers 4.x and llama.cpp's converter read) added when the expert count changed and the source
    lacks it; `dtype` recorded under the dtype keys the source has ("dtype" when none)."""
    cfg = json.loads(json.dumps(source_json))  # a copy
    changes = _changed(before.to_dict(), after.to_dict())
    _spell(cfg, changes, getattr(after, "attribute_map", {}) or {})
    for sub in ("text_config", "language_config", "llm_config"):
        b, a = getattr(before, sub, None), getattr(after, sub, None)
        if isinstance(cfg.get(sub), dict) and hasattr(a, "to_dict") and hasattr(b, "to_dict") and a is not after:
            _spell(cfg[sub], _changed(b.to_dict(), a.to_dict()), getattr(a, "attribute_map", {}) or {})
    if "quantization_config" in cfg and getattr(after, "quantization_config", None) is None:
        del cfg["quantization_config"]  # loaded dequantized (gpt-oss's MXFP4 experts): the export is written so
    n = getattr(after, expert_count_key, None) if expert_count_key else None
    changed = isinstance(n, int) and n != getattr(before, expert_count_key, n)
    if "mumoe_base_architecture" in cfg:  # re-pruning a mumoe-form export: its form adds these back if it needs them
        cfg["architectures"] = [cfg.pop("mumoe_base_architecture")]
        for key in ("auto_map", "mumoe_layers"):
            cfg.pop(key, None)
    return reader_keys(cfg, expert_count_key, n if changed else None, dtype)


def reader_keys(cfg: dict, expert_count_key: str | None, experts: int | None, dtype: torch.dtype | None) -> dict:
    """What older readers need in a config.json, set in place (both export paths): the expert count under the key
    transformers 4.x and llama.cpp's converter read (`expert_count_key`), added when the source lacks it and the
    count changed (`experts`); the export's `dtype` under the dtype keys the source has ("dtype" when none)."""
    if expert_count_key and experts is not None and expert_count_key not in cfg:
        cfg[expert_count_key] = experts
    if dtype is not None:
        for k in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            cfg[k] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return cfg


@contextmanager
def stored_as(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """The model's floating-point parameters and saved buffers (DeepSeek's correction bias) cast to `dtype` for
    writing, one tensor at a time (no second copy of the model), and cast back afterwards. Buffers that are not
    saved (rotary frequencies) are left alone. A value written in `dtype` reads back as that rounding, so the
    model is left equal to its export."""
    if dtype is None:
        yield
        return
    params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
    buffers = [(m, n) for m in model.modules() for n, b in m._buffers.items()
               if b is not None and n not in m._non_persistent_buffers_set and b.is_floating_point()
               and b.dtype != dtype]
    original = {id(p): p.dtype for p in params}
    kept = {(id(m), n): m._buffers[n].dtype for m, n in buffers}
    for p in params:
        p.data = p.data.to(dtype)
    for m, n in buffers:
        m._buffers[n] = m._buffers[n].to(dtype)
    try:
        yield
    finally:
        for p in params:
            p.data = p.data.to(original[id(p)])
        for m, n in buffers:
            m._buffers[n] = m._buffers[n].to(kept[(id(m), n)])
