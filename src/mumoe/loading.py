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


def load(name_or_path: str | Path | None = "default", dtype: str | torch.dtype = "fp32") -> nn.Module:
    """Load a causal LM in eval mode (see module doc for the accepted names)."""
    name = resolve(name_or_path)
    if name.startswith("tiny:"):
        from .models.tiny import tiny_model

        return tiny_model(name[len("tiny:"):]).to(_dtype(dtype))
    path = Path(name)
    looks_local = path.is_absolute() or name.startswith(".") or path.exists() or name.count("/") != 1
    if looks_local and not path.exists():
        raise MumoeError(f"model not found: {name}")
    if path.is_dir() and not (path / "config.json").exists():
        raise MumoeError(f"{name} is not a model folder (no config.json)")
    report = path / "pruning.json"
    form = json.loads(report.read_text()).get("form") if report.exists() else "hf"
    if form == "mumoe":
        return _load_mumoe_form(path, _dtype(dtype))
    if form == "mumoe-atoms":
        return _load_atom_form(path, _dtype(dtype))
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=_dtype(dtype))
    except (OSError, ValueError, KeyError) as e:
        raise MumoeError(f"cannot load {name}: {str(e).splitlines()[0]}") from e
    return model.eval()


def _load_checked(model: nn.Module, state: dict, path: Path, filled: set[str] = frozenset()) -> None:
    """load_state_dict that accepts as missing only tensors filled in already (`filled`) and, when the
    config ties them, the tied output embeddings."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if model.config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied and k not in filled]
    if missing or unexpected:
        raise MumoeError(f"{path}: checkpoint does not match pruning.json (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.tie_weights()


def _load_mumoe_form(path: Path, dtype: torch.dtype) -> nn.Module:
    """Rebuild an export whose layers hold different expert counts: build from config, slice, load weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .apply.experts import remove_experts
    from .apply.export import PruneReport

    report = PruneReport.from_dict(json.loads((path / "pruning.json").read_text()))
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    remove_experts(model, report.kept())
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    _load_checked(model, state, path)
    return model.to(dtype).eval()


def _load_atom_form(path: Path, dtype: torch.dtype) -> nn.Module:
    """Rebuild an atom-pruned export whose experts have different widths: full-width fused tensors with the
    kept rows/columns filled in and the removed atoms zero (the same function as the sliced experts)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .apply.export import PruneReport
    from .models import moe_adapter_for

    report = PruneReport.from_dict(json.loads((path / "pruning.json").read_text()))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    state = load_file(path / "model.safetensors")
    names = {id(m): n for n, m in model.named_modules()}
    layers = {layer.index: layer for layer in moe_adapter_for(model).moe_layers()}
    fused = set()
    with torch.no_grad():
        for entry in report.layers:
            layer = layers[entry["layer"]]
            prefix = names[id(layer.experts)]
            fused |= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
            layer.experts.gate_up_proj.zero_()
            layer.experts.down_proj.zero_()
            I = layer.intermediate_size
            for ex in entry["experts"]:
                e, k = ex["expert"], torch.tensor(ex["kept"], dtype=torch.long)
                gu = state.pop(f"{prefix}.{e}.gate_up")
                layer.experts.gate_up_proj[e, k] = gu[: len(k)].to(dtype)
                layer.experts.gate_up_proj[e, k + I] = gu[len(k):].to(dtype)
                layer.experts.down_proj[e][:, k] = state.pop(f"{prefix}.{e}.down").to(dtype)
    _load_checked(model, state, path, filled=fused)
    return model.to(dtype).eval()


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
