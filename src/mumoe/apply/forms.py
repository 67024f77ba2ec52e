"""Export forms: how a pruned model is written and read back, each form's writer and reader side by side.

    hf           a standard transformers checkpoint (save_pretrained); AutoModelForCausalLM.from_pretrained reads it
    mumoe        expert counts differ per layer: the tensors as save_pretrained writes them, rebuilt by mumoe.load
    mumoe-atoms  expert widths differ (HEAPr's global form): only the kept rows/columns, rebuilt by mumoe.load
    mumoe-quant  experts at their own bit widths (PMQ): packed integers, scales and zeros, dequantized by mumoe.load
                 (or by the shipped modelling code when each expert runs)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import MumoeError
from ..models import moe_adapter_for
from ..models.keys import as_loaded
from ..models.layout import family_names_of, renamed_tensors
from .atoms import kept_part, shared_atom_keys
from .experts import remove_experts
from .report import PruneReport


@dataclass(frozen=True)
class Form:
    name: str
    loads_with: str  # what a user calls to load it
    write: Callable[[nn.Module, Path, PruneReport], None]  # (model, folder, report): the weights + config
    read: Callable[[Path, torch.dtype], nn.Module] | None  # None: transformers' own from_pretrained
    # (config.json dict, folder, report) -> the config to write, after adding what the form needs (its modelling
    # code for trust_remote_code); None: the config as it is
    package: Callable[[dict, Path, PruneReport], dict] | None = None


def _write_hf(model: nn.Module, tmp: Path, report: PruneReport) -> None:
    from ..progress import hf_bars

    with hf_bars():
        model.save_pretrained(tmp)


def _write_experts(model: nn.Module, tmp: Path, report: PruneReport) -> None:
    """Per-layer expert counts: the tensors as `save_pretrained` writes them (the family's own names and layout, as
    a streamed export keeps them); mumoe.load rebuilds the shapes from pruning.json."""
    model.save_pretrained(tmp)


def _state_once(model: nn.Module) -> dict:
    """The state dict with tied tensors stored once, under the first name (the input embeddings, which
    transformers loads and ties lm_head to; safetensors' save_model would keep `lm_head.weight` instead)."""
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[k] = v.contiguous()
    return state


def _write_atoms(model: nn.Module, tmp: Path, report: PruneReport) -> None:
    """Per-expert widths: store only the kept rows / columns."""
    from safetensors.torch import save_file

    model.config.save_pretrained(tmp)
    save_file(compact_atom_state(model, report), str(tmp / "model.safetensors"), metadata={"format": "pt"})


def compact_atom_state(model: nn.Module, report: PruneReport) -> dict:
    """State dict with each routed expert stored at its own width: `<experts>.<e>.gate_up` [2k_e, H] and
    `<experts>.<e>.down` [H, k_e]; the fused expert tensors and tied copies are left out."""
    layers = {layer.index: layer for layer in moe_adapter_for(model).moe_layers()}  # first: it may swap modules
    names = {id(m): n for n, m in model.named_modules()}
    state = _state_once(model)  # tied tensors (lm_head = embeddings) are stored once
    for entry in report.layers:
        layer = layers[entry["layer"]]
        prefix = names[id(layer.experts)]
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias", *family_names(layer)):
            state.pop(f"{prefix}.{name}", None)
        I = layer.intermediate_size
        gu_bias, dn_bias = layer.gate_up_bias, layer.down_bias  # [E, 2I] (gate, then up), [E, H] or None
        for ex in entry["experts"]:
            e, k = ex["expert"], torch.tensor(ex["kept"], dtype=torch.long)
            gu = layer.experts.gate_up_proj[e]
            if layer.gated:
                state[f"{prefix}.{e}.gate_up"] = torch.cat([gu[k], gu[k + I]]).contiguous()
            else:  # ungated experts (Nemotron-H): the up rows only
                state[f"{prefix}.{e}.up"] = gu[k + I].contiguous()
            state[f"{prefix}.{e}.down"] = layer.experts.down_proj[e][:, k].contiguous()
            if gu_bias is not None:
                state[f"{prefix}.{e}.gate_up_bias"] = torch.cat([gu_bias[e][k], gu_bias[e][k + I]]).contiguous()
                state[f"{prefix}.{e}.down_bias"] = dn_bias[e].contiguous()
    for name, (kind, k) in shared_atom_keys(model, _shared_kept(report)).items():  # at their kept width
        state[name] = kept_part(state[name], kind, k).contiguous()
    return state


def family_names(layer) -> tuple[str, ...]:
    """The names the layer's experts module gives its fused tensors in its state dict where they are not mumoe's
    (Nemotron-H's up_proj: `Layout.family_names`)."""
    return tuple(family_names_of(layer.experts).values())


def _shared_kept(report: PruneReport) -> dict[int, torch.Tensor]:
    """decoder layer -> the shared expert's kept neurons, where the record has them (CAMERA-P's global form)."""
    return {e["layer"]: torch.tensor(e["shared"]["kept"], dtype=torch.long) for e in report.layers if "shared" in e}


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


def _load_state(path: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def fuse_legacy_experts(state: dict, model: nn.Module) -> dict:
    """Per-expert keys (`experts.J.{gate,up,down}_proj.weight`, or an architecture's legacy spelling: `models.keys`,
    as the streamed export keeps them) stacked into the model's fused `experts.gate_up_proj` / `down_proj`."""
    from ..checkpoint import KIND, LEGACY
    from ..models.keys import canonical

    parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    names = {n for n, _ in chain(model.named_parameters(), model.named_buffers())}  # (selection biases are buffers)
    names |= set(renamed_tensors(model).values())  # a layout's own names (Nemotron-H's up_proj)
    for key, t in state.items():
        m = LEGACY.match(key)
        if m is None:
            out[key if key in names else canonical(key)] = t
            continue
        pre = m["pre"] if f"{m['pre']}.gate_up_proj" in names else canonical(m["pre"])
        parts.setdefault(pre, {}).setdefault(int(m["e"]), {})[KIND[m["kind"]]] = t
    for pre, experts in parts.items():
        order = sorted(experts)
        gated = getattr(model.get_submodule(pre), "gated", True)  # Nemotron-H's experts: up and down only
        if order != list(range(len(order))) or any(len(experts[e]) != 2 + gated for e in order):
            raise MumoeError(f"{pre}: per-expert tensors are incomplete")
        if gated:
            out[f"{pre}.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]])
                                                      for e in order])
        else:  # the family's own name: its experts module converts it on loading
            out[f"{pre}.up_proj"] = torch.stack([experts[e]["up_proj"] for e in order])
        out[f"{pre}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
    return out


def _read_experts(path: Path, dtype: torch.dtype) -> nn.Module:
    """Rebuild an export whose layers hold different expert counts: build from config, slice, load weights
    (fused tensors, or the per-expert keys of a streamed export)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    report = PruneReport.from_dict(json.loads((path / "pruning.json").read_text()))
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    from .merge import bind_layers

    slots, maps = report.expert_slots(), report.expert_maps()
    remove_experts(model, {j: s for j, s in slots.items() if j not in maps})
    bind_layers(model, slots, maps)
    _load_checked(model, fuse_legacy_experts(as_loaded(_load_state(path), model), model), path)
    return model.to(dtype).eval()


def _rebuild(path: Path, dtype: torch.dtype) -> tuple[PruneReport, nn.Module, dict, dict, dict]:
    """What a reader of a mumoe form starts from: the record, the model built from the export's config, the
    export's tensors, its MoE layers by decoder index (made first: an adapter may swap modules) and every
    module's name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    report = PruneReport.from_dict(json.loads((path / "pruning.json").read_text()))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    state = as_loaded(_load_state(path), model)  # a streamed export keeps its source's spelling
    layers = {layer.index: layer for layer in moe_adapter_for(model).moe_layers()}
    names = {id(m): n for n, m in model.named_modules()}
    return report, model, state, layers, names


def _read_atoms(path: Path, dtype: torch.dtype) -> nn.Module:
    """Rebuild an atom-pruned export whose experts have different widths: full-width fused tensors with the
    kept rows/columns filled in and the removed atoms zero (the same function as the sliced experts)."""
    report, model, state, layers, names = _rebuild(path, dtype)
    fused = set()
    with torch.no_grad():
        for entry in report.layers:
            layer = layers[entry["layer"]]
            prefix = names[id(layer.experts)]
            fused |= {f"{prefix}.{n}" for n in ("gate_up_proj", "down_proj", *family_names(layer))}
            layer.experts.gate_up_proj.zero_()
            layer.experts.down_proj.zero_()
            gu_bias, dn_bias = layer.gate_up_bias, layer.down_bias  # experts with biases (GPT-OSS)
            if gu_bias is not None:
                fused |= {f"{prefix}.gate_up_proj_bias", f"{prefix}.down_proj_bias"}
                gu_bias.zero_()
            I = layer.intermediate_size
            for ex in entry["experts"]:
                e, k = ex["expert"], torch.tensor(ex["kept"], dtype=torch.long)
                if layer.gated:
                    gu = state.pop(f"{prefix}.{e}.gate_up")
                    layer.experts.gate_up_proj[e, k] = gu[: len(k)].to(dtype)
                    layer.experts.gate_up_proj[e, k + I] = gu[len(k):].to(dtype)
                else:  # ungated experts: the up rows (the gate half stays zero)
                    layer.experts.gate_up_proj[e, k + I] = state.pop(f"{prefix}.{e}.up").to(dtype)
                layer.experts.down_proj[e][:, k] = state.pop(f"{prefix}.{e}.down").to(dtype)
                if gu_bias is not None:
                    b = state.pop(f"{prefix}.{e}.gate_up_bias").to(dtype)
                    gu_bias[e, k], gu_bias[e, k + I] = b[: len(k)], b[len(k):]
                    dn_bias[e] = state.pop(f"{prefix}.{e}.down_bias").to(dtype)
        params = dict(model.named_parameters())
        for name, (kind, k) in shared_atom_keys(model, _shared_kept(report)).items():  # kept neurons, the rest 0
            fused.add(name)
            full, kept = params[name], state.pop(name).to(dtype)
            full.zero_()
            if kind == "rows":
                full[k] = kept
            else:
                full[:, k] = kept
    _load_checked(model, fuse_legacy_experts(state, model), path, filled=fused)
    return model.to(dtype).eval()


def _write_quant(model: nn.Module, tmp: Path, report: PruneReport) -> None:
    """Experts at their own bit widths (PMQ): each expert's matrices as packed integers with per-group scales
    and zeros (`apply.quant`); every other tensor as it is."""
    from safetensors.torch import save_file

    from .quant import packed_tensors

    quantized = getattr(report.plan, "quantized", None)  # (decoder layer, expert) -> (gate_up, down) Quantized
    if quantized is None:
        raise MumoeError("a quantized model is written by the run that quantized it (its integers are in that "
                         "run's record); quantize the source again")
    model.config.save_pretrained(tmp)
    layers = {layer.index: layer for layer in moe_adapter_for(model).moe_layers()}
    names = {id(m): n for n, m in model.named_modules()}
    state = _state_once(model)
    for entry in report.layers:
        layer = layers[entry["layer"]]
        prefix = names[id(layer.experts)]
        for name in ("gate_up_proj", "down_proj", *family_names(layer)):
            state.pop(f"{prefix}.{name}", None)
        for ex in entry["experts"]:
            gu, down = quantized[(entry["layer"], ex["expert"])]
            if layer.gated:
                state.update(packed_tensors(f"{prefix}.{ex['expert']}.gate_up", gu))
            else:  # experts without a gate (Nemotron-H): the up rows (the gate half is zeros nothing reads)
                state.update(packed_tensors(f"{prefix}.{ex['expert']}.up", gu.rows(layer.intermediate_size)))
            state.update(packed_tensors(f"{prefix}.{ex['expert']}.down", down))
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def _read_quant(path: Path, dtype: torch.dtype) -> nn.Module:
    """Rebuild a PMQ export: every expert dequantized from its integers, scales and zeros at its recorded width."""
    from .quant import from_packed

    report, model, state, layers, names = _rebuild(path, dtype)
    group = int(report.recipe["group"])
    filled = set()
    with torch.no_grad():
        for entry in report.layers:
            layer = layers[entry["layer"]]
            prefix = names[id(layer.experts)]
            filled |= {f"{prefix}.{n}" for n in ("gate_up_proj", "down_proj", *family_names(layer))}
            I = layer.intermediate_size
            for ex in entry["experts"]:
                e, b = ex["expert"], int(ex["bits"])
                down = from_packed(state, f"{prefix}.{e}.down", b, group, tuple(layer.experts.down_proj.shape[1:]))
                if layer.gated:
                    gu = from_packed(state, f"{prefix}.{e}.gate_up", b, group,
                                     tuple(layer.experts.gate_up_proj.shape[1:]))
                    layer.experts.gate_up_proj[e] = gu.dequantize(dtype)
                else:  # the up rows; the gate half zero
                    up = from_packed(state, f"{prefix}.{e}.up", b, group, (I, layer.hidden_size))
                    layer.experts.gate_up_proj[e, :I] = 0
                    layer.experts.gate_up_proj[e, I:] = up.dequantize(dtype)
                layer.experts.down_proj[e] = down.dequantize(dtype)
    _load_checked(model, fuse_legacy_experts(state, model), path, filled=filled)  # a streamed export's own spelling
    return model.to(dtype).eval()


REMOTE_FILE = "mumoe_modeling.py"
REMOTE_CLASS = "MumoeForCausalLM"


def remote_code(cfg: dict, folder: Path, report: PruneReport) -> dict:
    """Ship the modelling file (`remote/mumoe_modeling.py`, its base class set to the source architecture's)
    and describe each MoE layer's shape in the config, so that transformers alone loads the export with
    trust_remote_code=True. The architecture is renamed: engines that build models from the config refuse it
    instead of reading the wrong shapes."""
    base = cfg.get("mumoe_base_architecture") or (cfg.get("architectures") or [None])[0]
    import transformers

    if not isinstance(base, str):  # a model built from a config (no "architectures"): the type's CausalLM class
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        base = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.get("model_type"))
    if not isinstance(base, str) or not hasattr(transformers, base):
        raise MumoeError(f"cannot ship modelling code for architecture {base!r}: transformers has no such class")
    template = (Path(__file__).parent / "remote" / REMOTE_FILE).read_text()
    line = 'BASE_CLASS = "Qwen3MoeForCausalLM"'
    (folder / REMOTE_FILE).write_text(template.replace(line, f'BASE_CLASS = "{base}"', 1))
    if report.form == "mumoe":
        layers = report.moe_shapes()
    elif report.form == "mumoe-quant":
        group = int(report.recipe["group"])
        layers = [{"layer": e["layer"], "bits": [int(x["bits"]) for x in e["experts"]], "group": group}
                  for e in report.layers]
    else:
        layers = [{"layer": e["layer"], "widths": [len(x["kept"]) for x in e["experts"]],
                   **({"shared_width": len(e["shared"]["kept"])} if "shared" in e else {})} for e in report.layers]
    cfg = dict(cfg)
    cfg["architectures"] = [REMOTE_CLASS]
    cfg["mumoe_base_architecture"] = base
    cfg["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_FILE[:-3]}.{REMOTE_CLASS}"}
    cfg["mumoe_layers"] = layers
    return cfg


FORMS: dict[str, Form] = {f.name: f for f in (
    Form("hf", "AutoModelForCausalLM.from_pretrained", _write_hf, None),
    Form("mumoe", "mumoe.load, or from_pretrained(..., trust_remote_code=True)", _write_experts, _read_experts,
         remote_code),
    Form("mumoe-atoms", "mumoe.load, or from_pretrained(..., trust_remote_code=True)", _write_atoms, _read_atoms,
         remote_code),
    Form("mumoe-quant", "mumoe.load, or from_pretrained(..., trust_remote_code=True)", _write_quant, _read_quant,
         remote_code),
)}


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise MumoeError(f"unknown export form {name!r} in pruning.json; this mumoe reads {', '.join(FORMS)}")
    return FORMS[name]
