"""Export: HF checkpoint (safetensors) + pruning.json, written atomically (temp dir, then rename)."""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import MumoeError
from ..version import __version__


@dataclass
class PruneReport:
    """What a pruning run did; serializes to the `pruning.json` schema of DESIGN.md."""

    method: str
    grain: str
    ratio: float
    budget: str = "uniform"
    scoring_order: str = "one-shot"
    calibration: dict = field(default_factory=dict)  # {source, nsamples, seqlen} or {}
    model: dict = field(default_factory=dict)  # {source, model_type, num_experts}
    layers: list[dict] = field(default_factory=list)  # {layer, num_experts, kept, scores}
    form: str = "hf"  # "hf": from_pretrained loads it; "mumoe": only mumoe.load (per-layer shapes differ)
    recipe: dict = field(default_factory=dict)  # the Recipe that replays this run (mumoe prune --recipe)
    mumoe_version: str = __version__

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"mumoe_version": d.pop("mumoe_version"), **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "PruneReport":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def kept(self) -> dict[int, list[int]]:
        return {entry["layer"]: list(entry["kept"]) for entry in self.layers}


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output directory unless overwrite; call before any expensive work."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MumoeError(f"output directory {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise MumoeError(f"output path {out} exists and is not a directory")
    return out


@contextmanager
def atomic_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it replaces `out` by rename, on any error it is removed."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "x")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pruned(model: nn.Module, out: str | Path, report: PruneReport, tokenizer=None, overwrite: bool = False) -> Path:
    """Write model (+ tokenizer) and pruning.json to `out` atomically; nothing is left half-written."""
    with atomic_output(out, overwrite) as tmp:
        if report.form == "mumoe":  # per-layer shapes: keep the fused layout, mumoe.load rebuilds it
            from safetensors.torch import save_model

            model.config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))
        elif report.form == "mumoe-atoms":  # per-expert widths: store only the kept rows / columns
            from safetensors.torch import save_file

            model.config.save_pretrained(tmp)
            save_file(compact_atom_state(model, report), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "pruning.json").write_text(report.to_json())
    return Path(out)


def compact_atom_state(model: nn.Module, report: PruneReport) -> dict:
    """State dict with each routed expert stored at its own width: `<experts>.<e>.gate_up` [2k_e, H] and
    `<experts>.<e>.down` [H, k_e]; the fused expert tensors and tied copies are left out."""
    from ..models import moe_adapter_for

    names = {id(m): n for n, m in model.named_modules()}
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # tied tensors (lm_head = embeddings) are stored once
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[k] = v.contiguous()
    layers = {layer.index: layer for layer in moe_adapter_for(model).moe_layers()}
    for entry in report.layers:
        layer = layers[entry["layer"]]
        prefix = names[id(layer.experts)]
        del state[f"{prefix}.gate_up_proj"], state[f"{prefix}.down_proj"]
        I = layer.intermediate_size
        for ex in entry["experts"]:
            e, k = ex["expert"], torch.tensor(ex["kept"], dtype=torch.long)
            gu = layer.experts.gate_up_proj[e]
            state[f"{prefix}.{e}.gate_up"] = torch.cat([gu[k], gu[k + I]]).contiguous()
            state[f"{prefix}.{e}.down"] = layer.experts.down_proj[e][:, k].contiguous()
    return state
