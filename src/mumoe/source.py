"""What a model name means before anything is loaded: the bundled model's folder, the dtype its weights are
stored in, the dtype it runs in (`--dtype auto`), and the keyword arguments every transformers call gets
(`--trust-remote-code`). At the bottom of the package: loading, export and the layer-sequential reader use it,
and it uses only the file readers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .settings import SETTINGS

from .errors import MumoeError
from .paths import DEFAULT_MODEL

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}




def hf_kwargs() -> dict:
    """Keyword arguments for transformers' from_pretrained calls (trust_remote_code when the user allowed it)."""
    return {"trust_remote_code": True} if SETTINGS.trust_remote_code else {}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name (fp32, bf16, fp16 or their long forms) as a torch dtype; "auto" needs a model:
    `compute_dtype`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MumoeError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


_dtype = parse_dtype


def checkpoint_dtype(name_or_path: str | Path | None) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: its config's `dtype` / `torch_dtype`, else the first
    floating-point tensor of its safetensors headers, else fp32 (tiny:ARCH and unreadable hub ids: fp32)."""
    name = resolve(name_or_path)
    path = Path(name)
    if name.startswith("tiny:") or not (path / "config.json").is_file():
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(name, **hf_kwargs()).to_dict() if not name.startswith("tiny:") else {}
        except Exception:
            cfg = {}
    else:
        import json

        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            cfg = {}
    sub = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    named = cfg.get("dtype") or cfg.get("torch_dtype") or sub.get("dtype") or sub.get("torch_dtype")
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    if path.is_dir():
        from .checkpoint import DTYPES as FILE_DTYPES, read_header, shard_files

        for file in shard_files(path):
            for meta in read_header(file).values():
                dt = FILE_DTYPES.get(meta["dtype"])
                if dt is not None and dt.is_floating_point:
                    return dt
    return torch.float32


def compute_dtype(dtype: str | torch.dtype | None, name_or_path: str | Path | None,
                  device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a model is loaded and run in. "auto" (or None) = the checkpoint's own, except that a bf16 /
    fp16 checkpoint runs in fp32 on the CPU (CPUs without half-precision matrix units run it several times
    slower; exports are still written in the checkpoint's dtype)."""
    if dtype is not None and dtype != "auto":
        return parse_dtype(dtype)
    own = checkpoint_dtype(name_or_path)
    if torch.device(device).type == "cpu" and own in (torch.bfloat16, torch.float16):
        return torch.float32
    return own


def resolve(name_or_path: str | Path | None) -> str:
    """Map `None`/"default" to the bundled model's folder; keep everything else."""
    if name_or_path is None or str(name_or_path) == "default":
        if not (DEFAULT_MODEL / "config.json").exists():
            raise MumoeError(f"the bundled model is not installed at {DEFAULT_MODEL}")
        return str(DEFAULT_MODEL)
    return str(name_or_path)
