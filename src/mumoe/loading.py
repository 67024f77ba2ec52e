"""Loading models: the bundled default, tiny random configs, HF checkpoints and mumoe's own exports.

    load("default")              the bundled qwen3_moe (mumoe/assets/model)
    load("tiny:qwen3_moe")       a tiny random model of a supported architecture
    load("path/or/hub-id")       AutoModelForCausalLM.from_pretrained, or mumoe's loader when the
                                 checkpoint's pruning.json says its form is "mumoe" (per-layer shapes)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .apply.forms import get_form
from .errors import MumoeError

from .paths import ASSETS, DATA, DEFAULT_MODEL  # noqa: F401  (re-exported: mumoe.loading.DATA)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MumoeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve(name_or_path: str | Path | None) -> str:
    """Map `None`/"default" to the bundled model's folder; keep everything else."""
    if name_or_path is None or str(name_or_path) == "default":
        if not (DEFAULT_MODEL / "config.json").exists():
            raise MumoeError(f"the bundled model is not installed at {DEFAULT_MODEL}")
        return str(DEFAULT_MODEL)
    return str(name_or_path)


def check_model(name_or_path: str | Path | None) -> str:
    """The cheap checks of `load`, without reading weights: a local path must exist and hold config.json.
    -> the resolved name."""
    name = resolve(name_or_path)
    if name.startswith("tiny:"):
        return name
    path = Path(name)
    looks_local = path.is_absolute() or name.startswith(".") or path.exists() or name.count("/") != 1
    if looks_local and not path.exists():
        raise MumoeError(f"model not found: {name}")
    if path.is_dir() and not (path / "config.json").exists():
        raise MumoeError(f"{name} is not a model folder (no config.json)")
    return name


def load(name_or_path: str | Path | None = "default", dtype: str | torch.dtype = "fp32") -> nn.Module:
    """Load a causal LM in eval mode (see module doc for the accepted names)."""
    name = check_model(name_or_path)
    if name.startswith("tiny:"):
        from .models.tiny import tiny_model

        return tiny_model(name[len("tiny:"):]).to(_dtype(dtype))
    path = Path(name)
    report = path / "pruning.json"
    form = get_form(json.loads(report.read_text()).get("form", "hf") if report.exists() else "hf")
    if form.read is not None:  # mumoe's own forms: shapes an HF config cannot hold
        return form.read(path, _dtype(dtype))
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=_dtype(dtype))
    except (OSError, ValueError, KeyError) as e:
        raise MumoeError(f"cannot load {name}: {str(e).splitlines()[0]}") from e
    return model.eval()


def load_tokenizer(name_or_path: str | Path | None = "default"):
    """The tokenizer saved beside a model, or None (tiny random models have none)."""
    name = resolve(name_or_path)
    if name.startswith("tiny:"):
        return None
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError):
            return None


def load_default(dtype: str | torch.dtype = "fp32") -> tuple[nn.Module, object]:
    """The bundled model and its tokenizer."""
    return load("default", dtype), load_tokenizer("default")
