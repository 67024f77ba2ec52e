"""Loading models: the bundled default, tiny random configs, HF checkpoints and mumoe's own exports.

    load("default")              the bundled qwen3_moe (mumoe/assets/model)
    load("tiny:qwen3_moe")       a tiny random model of a supported architecture
    load("path/or/hub-id")       AutoModelForCausalLM.from_pretrained, or mumoe's loader when the
                                 checkpoint's pruning.json says its form is "mumoe" (per-layer shapes)
"""

from __future__ import annotations

import functools

import warnings
from pathlib import Path

import torch
from torch import nn

from .apply.forms import get_form
from .errors import MumoeError, MumoeFileError
from .progress import hf_bars

from .paths import ASSETS, DATA, DEFAULT_MODEL  # noqa: F401  (re-exported: mumoe.loading.DATA)
from .source import (  # noqa: F401  (re-exported: what a model name means, before anything is loaded)
    DTYPES, _dtype, checkpoint_dtype, compute_dtype, hf_kwargs, parse_dtype, resolve)


def read_config(path: str | Path):
    """A local model folder's config.json as a transformers config; unreadable, malformed or unknown-architecture
    configs are one-line errors naming the file."""
    from transformers import AutoConfig

    from .files import read_json

    file = Path(path) / "config.json"
    cfg = read_json(file, "the model config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise MumoeFileError(f"{file}: no model_type (not a transformers model config)")
    try:
        return AutoConfig.from_pretrained(str(path), **hf_kwargs())
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if cfg["model_type"] not in _known_model_types():
            msg = (f"model_type {cfg['model_type']!r} is not an architecture this transformers knows (upgrade "
                   "transformers, or check the config)")
        raise MumoeFileError(f"cannot read {file}: {msg}") from e


def _known_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def check_model(name_or_path: str | Path | None) -> str:
    """The cheap checks of `load`, without reading weights: a local path must exist and hold a config.json that
    parses, and its safetensors files sane headers (every shard the index names present, sizes that fit,
    floating-point parameters: `checkpoint.check_files`). -> the resolved name."""
    name = resolve(name_or_path)
    if name.startswith("tiny:"):
        return name
    path = Path(name)
    looks_local = path.is_absolute() or name.startswith(".") or path.exists() or name.count("/") != 1
    if looks_local and not path.exists():
        raise MumoeFileError(f"model not found: {name}")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MumoeFileError(f"{name} is not a model folder (no config.json)")
        config = read_config(path)
        from .checkpoint import check_files

        if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
            check_files(path)
            check_layout(path, config.model_type)
        elif not any(path.glob("pytorch_model*.bin")):  # .bin checkpoints: transformers reads them (in memory)
            raise MumoeFileError(f"{name} holds no weights (no .safetensors or pytorch_model*.bin files)")
    elif path.exists():
        raise MumoeFileError(f"{name} is a file; MODEL is a checkpoint folder, a hub id, 'default' or tiny:ARCH")
    return name


def check_layout(path: Path, model_type: str | None) -> None:
    """config.json against the tensors of a checkpoint of a supported architecture, from the headers only
    (`LayerwiseCheckpoint`'s checks, both ways): every parameter the config declares is in the files with its
    shape, and every tensor in the files belongs to a layer / expert the config declares. mumoe's own export
    forms (shapes an HF config cannot hold) and architectures without an adapter are left to their loaders."""
    from .models.registry import ADAPTERS

    if model_type not in ADAPTERS or export_form(path).read is not None:
        return
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    _check_layout_of(str(path.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def export_form(path: Path):
    """The export form a checkpoint folder is stored in: its pruning.json's "form", else "hf"."""
    report = path / "pruning.json"
    if not report.exists():
        return get_form("hf")
    from .files import read_json

    rep = read_json(report, "the pruning record")
    return get_form(rep.get("form", "hf") if isinstance(rep, dict) else "hf")


def _remember_record(model: nn.Module, path: Path) -> None:
    """A mumoe-form export's record, kept as the model's: pruning it again writes one record of every run, whose
    layers keep the shapes the loader rebuilds (`PruneReport.compose`)."""
    from .apply.report import RECORDS, PruneReport
    from .files import read_json

    RECORDS[model] = PruneReport.from_dict(read_json(path / "pruning.json", "the pruning record"))


@functools.lru_cache(maxsize=8)
def _check_layout_of(path: str, identity: tuple) -> None:
    from .observe.layerwise import LayerwiseCheckpoint

    try:
        LayerwiseCheckpoint(path)
    except MumoeFileError:
        raise
    except Exception:  # noqa: BLE001 - a layout the header mapping does not know: transformers' loader decides
        return


def check_weights(model: nn.Module, source: str | Path | None = None) -> nn.Module:
    """model unchanged, or a one-line MumoeDataError naming the first parameter (and, for a local checkpoint,
    the file and tensor it came from) that holds NaN or inf."""
    from .checkpoint import check_finite

    for name, p in model.named_parameters():
        try:
            check_finite(p, name)
        except MumoeError:
            if source is not None and Path(source).is_dir():
                _locate_nonfinite(Path(source), name)
            raise
    return model


def _explain_mismatch(path: Path) -> None:
    """On transformers' size-mismatch error: raise the one line naming the tensor (from the headers), if the
    checkpoint is one mumoe can map tensor by tensor."""
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        return
    from .observe.layerwise import LayerwiseCheckpoint

    try:
        LayerwiseCheckpoint(path)
    except MumoeFileError:
        raise
    except Exception:  # an architecture the layer-sequential mapping does not know: the generic line
        return


def _locate_nonfinite(path: Path, param: str) -> None:
    """Raise the error for the checkpoint tensor behind parameter `param` that is not finite (the error path
    only: reads the tensors of that module)."""
    from .checkpoint import read_header, read_tensor, shard_files

    layer = param.rsplit(".", 1)[0]  # e.g. model.layers.1.mlp.experts
    for file in shard_files(path):
        for key, meta in read_header(file).items():
            if key.startswith(layer) or key.startswith(param):
                read_tensor(file, meta)  # raises, naming file and tensor, on the first non-finite one
    return None


def load(name_or_path: str | Path | None = "default", dtype: str | torch.dtype = "auto") -> nn.Module:
    """Load a causal LM in eval mode, on the CPU (see module doc for the accepted names). dtype: fp32, bf16,
    fp16, or "auto" = the checkpoint's own (fp32 for a bf16/fp16 checkpoint: `compute_dtype`)."""
    name = check_model(name_or_path)
    dtype = compute_dtype(dtype, name, "cpu")
    if name.startswith("tiny:"):
        from .models.tiny import tiny_model

        return tiny_model(name[len("tiny:"):]).to(_dtype(dtype))
    path = Path(name)
    form = export_form(path)
    if form.read is not None:  # mumoe's own forms: shapes an HF config cannot hold
        model = check_weights(form.read(path, _dtype(dtype)), path)
        _remember_record(model, path)
        return model
    from transformers import AutoModelForCausalLM

    try:
        with hf_bars():
            model, info = AutoModelForCausalLM.from_pretrained(name, dtype=_dtype(dtype), output_loading_info=True,
                                                               **hf_kwargs(), **dequantizing(name))
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, MumoeError):
            raise
        raise MumoeFileError(f"cannot load {name}: {str(e).splitlines()[0]}") from e
    except RuntimeError as e:  # transformers refuses tensors of the wrong shape (a multi-line report)
        if "mismatched" not in str(e) and "size mismatch" not in str(e):
            raise
        _explain_mismatch(path)
        raise MumoeFileError(f"cannot load {name}: weights of the wrong shape for its config.json") from e
    except Exception as e:  # safetensors' own error type (a corrupt file the header checks did not catch)
        if type(e).__name__ != "SafetensorError":
            raise
        raise MumoeFileError(f"cannot load {name}: {str(e).splitlines()[0]}") from e
    missing = sorted(info.get("missing_keys") or []) + [str(k[0]) if isinstance(k, tuple) else str(k)
                                                      for k in info.get("mismatched_keys") or []]
    if missing:  # transformers would have initialised them at random: a silently wrong model
        raise MumoeFileError(f"{name}: {len(missing)} weight(s) missing from the checkpoint files or of the wrong "
                             f"shape (first: {missing[0]}); an incomplete download or another architecture's "
                             "checkpoint")
    from .models import in_mumoe_layout

    return check_weights(in_mumoe_layout(model.eval()), name if path.is_dir() else None)


def dequantizing(name: str) -> dict:
    """from_pretrained arguments that load a quantized checkpoint mumoe can prune as plain weights: MXFP4 experts
    (the released gpt-oss checkpoints) dequantized — on a machine with Triton transformers would otherwise keep
    them packed, which no pruning can read. {} for everything else."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name, **hf_kwargs())
    except Exception:  # noqa: BLE001 - from_pretrained itself reports an unreadable config
        return {}
    q = getattr(cfg, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if str(getattr(method, "value", method)) != "mxfp4":
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def load_tokenizer(name_or_path: str | Path | None = "default"):
    """The tokenizer saved beside a model, or None (tiny random models have none)."""
    name = resolve(name_or_path)
    if name.startswith("tiny:"):
        return None
    from transformers import AutoTokenizer

    path = Path(name)
    local = path.is_dir()
    if local and not any((path / f).exists() for f in TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer from the model type: every text 0 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tok = AutoTokenizer.from_pretrained(name, **hf_kwargs())
        except Exception as e:  # noqa: BLE001 - corrupt files raise anything from JSON to Rust panics
            if not local:
                return None
            present = ", ".join(f for f in TOKENIZER_FILES if (path / f).exists())
            raise MumoeFileError(f"cannot load the tokenizer of {name} ({present}): "
                                 f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from e
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "spiece.model", "vocab.txt", "sentencepiece.bpe.model")


def load_default(dtype: str | torch.dtype = "auto") -> tuple[nn.Module, object]:
    """The bundled model and its tokenizer."""
    return load("default", dtype), load_tokenizer("default")
