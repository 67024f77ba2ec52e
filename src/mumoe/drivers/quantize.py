"""The PMQ driver (MC#'s mixed-precision experts): one calibration pass for the statistics, one bit width per
expert per layer, the experts quantized in place (round-to-nearest), and the record the `mumoe-quant` export
form writes and reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..apply.report import PruneReport
from ..errors import MumoeError
from ..select.bits import BITS


@dataclass(frozen=True)
class QuantPlan:
    """(decoder layer, expert) -> the expert's (gate_up, down) as `apply.quant.Quantized`: what the export packs."""

    quantized: dict


def check_quant_args(avg_bits: float, bits=BITS, group: int = 128) -> tuple[float, tuple[int, ...], int]:
    """The options, before anything is loaded: widths 1..8 (two or more, distinct), an average the allocation can
    meet (at least one expert at the two highest widths, the rest at the lowest, needs E large enough: checked
    per layer), a group ≥ 1."""
    bits = tuple(sorted(set(bits)))
    if len(bits) < 2 or any(not isinstance(b, int) or not 1 <= b <= 8 for b in bits):
        raise MumoeError(f"--bits must list two or more widths in 1..8, got {','.join(map(str, bits)) or 'none'}")
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not bits[0] <= avg_bits <= bits[-1]:
        raise MumoeError(f"--avg-bits must lie between the lowest and highest width ({bits[0]}..{bits[-1]}), "
                         f"got {avg_bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise MumoeError(f"--group must be a positive integer, got {group!r}")
    return float(avg_bits), bits, group


def quantize_loaded(model: nn.Module, windows: tuple, avg_bits: float, bits=BITS, group: int = 128,
                    batch_size: int = 8, source: str = "", progress: bool = False,
                    say: Callable[[str], None] | None = None) -> PruneReport:
    """PMQ on a loaded model, in place: statistics over `windows` ((ids [N, L], groups, info)), the allocation
    per MoE layer (budget floor(avg_bits·E) bits), every expert quantized at its width. -> the record (form
    `mumoe-quant`; per layer and expert: φ, w normalised, the losses per width, the width)."""
    from ..criteria.pmq import PMQStats, allocate_layer, quantize_layer
    from ..models import moe_adapter_for
    from ..observe.runner import run

    from ..apply.report import RECORDS

    avg_bits, bits, group = check_quant_args(avg_bits, bits, group)
    earlier = RECORDS.get(model)
    if earlier is not None and earlier.form == "mumoe-quant":
        raise MumoeError("this model's experts are quantized already (PMQ in this process); quantize the source")
    if earlier is not None and earlier.form != "hf":
        raise MumoeError(f"this model was pruned to per-layer shapes only mumoe.load reads ({earlier.form} form); "
                         "PMQ's export rebuilds the model from its config: quantize a standard checkpoint (a "
                         "uniform expert budget, the uniform atom form)")
    wins, _, info = windows
    if wins is None:
        raise MumoeError("PMQ needs calibration data: pass --calib PATH (or 'domain')")
    layers = moe_adapter_for(model).moe_layers()
    t0 = time.perf_counter()
    stats = run(model, wins, [PMQStats(layers, bits, group)], batch_size=batch_size, progress=progress,
                desc="PMQ statistics")[0].result()
    if say is not None:
        say(f"  statistics: {len(bits)} widths x every expert's output error over {wins.shape[0]} windows in "
            f"{time.perf_counter() - t0:.1f}s")
    entries, quantized = [], {}
    for layer, st in zip(layers, stats):
        widths = allocate_layer(st, avg_bits)
        for e, q in enumerate(quantize_layer(layer, widths, group)):
            quantized[(layer.index, e)] = q
        entries.append(layer_entry(layer.index, st, widths, bits, say))
    report = _report(entries, avg_bits, bits, group, info, source, model.config.model_type, layers,
                     QuantPlan(quantized))
    if earlier is not None:  # pruned before in this process (e.g. REAP, then PMQ): one record of both stages
        report = report.compose(earlier)
    RECORDS[model] = report
    return report


def layer_entry(index: int, st, widths: list[int], bits, say: Callable[[str], None] | None = None) -> dict:
    """One MoE layer's record: per expert φ and w normalised, the losses per width, the width."""
    from ..select.bits import normalised

    phi, w = normalised(st.phi.tolist()), normalised(st.w.tolist())
    if say is not None:
        counts = ", ".join(f"{widths.count(b)}x{b}" for b in bits if widths.count(b))
        say(f"  layer {index:3d}: {counts} bits ({sum(widths) / len(widths):.2f} on average)")
    return {"layer": index, "num_experts": len(widths), "experts": [
        {"expert": e, "phi": round(phi[e], 8), "w": round(w[e], 8),
         "loss": {str(b): round(float(st.loss[e, j]), 8) for j, b in enumerate(bits)}, "bits": widths[e]}
        for e in range(len(widths))]}


def _report(entries: list[dict], avg_bits: float, bits, group: int, info: dict, source: str, model_type: str,
            layers, plan) -> PruneReport:
    recipe = {"method": "pmq", "avg_bits": avg_bits, "bits": list(bits), "group": group, "calib": info}
    return PruneReport(method="pmq", grain="quant", ratio=0.0, budget=f"{avg_bits:g} bits on average",
                       calibration=info, model={"source": source, "model_type": model_type,
                                                "num_experts": layers[0].num_experts if layers else None},
                       layers=entries, form="mumoe-quant", recipe=recipe, plan=plan)


def _cache_fits(layers, bits) -> bool:
    """Whether one layer's quantized integers at every width (one byte per expert weight and width) take under a
    quarter of the memory this process may use: then each expert is quantized once per width, else again in every
    batch (a checkpoint under a tight cap: one resident layer and its activations are all the room there is)."""
    from ..memlimit import available_memory

    largest = max(layer.num_experts * layer.experts.gate_up_proj[0].numel() * 3 // 2 for layer in layers)
    avail = available_memory()
    return avail is None or len(bits) * largest < avail // 4


def quantize_layerwise(path: str, out: str, windows: tuple, avg_bits: float, bits=BITS, group: int = 128,
                       batch_size: int = 8, dtype: str | None = None, device: str | None = None,
                       overwrite: bool = False, progress: bool = False, max_shard_bytes: int = 1 << 30,
                       say: Callable[[str], None] | None = None, earlier: PruneReport | None = None,
                       source: str | None = None) -> PruneReport:
    """PMQ on a checkpoint larger than memory: the statistics in one layer-sequential sweep (one decoder layer
    resident; each layer's widths chosen while it is), then the export written tensor by tensor, each expert
    quantized from the checkpoint's own values (`apply.stream.quant_transform`). Equal to `quantize_loaded` and
    its export, bit for bit. earlier: the record of the run that wrote `path` (pruned before: one record of both);
    source: the model the run started from."""

    from ..apply.stream import quant_transform, write_streamed
    from ..criteria.pmq import PMQStats, allocate_layer
    from ..loading import compute_dtype
    from ..models import adapter_for
    from ..observe.layerwise import LayerwiseCheckpoint
    from ..observe.runner import resolve_device
    from ..observe.sequential import sweep

    avg_bits, bits, group = check_quant_args(avg_bits, bits, group)
    wins, _, info = windows
    if wins is None:
        raise MumoeError("PMQ needs calibration data: pass --calib PATH (or 'domain')")
    dev = resolve_device(device or "cpu")
    ckpt = LayerwiseCheckpoint(path, dtype=compute_dtype(dtype, path, dev), device=dev)
    layers = adapter_for(ckpt.model).moe_layers()
    if not layers:
        raise MumoeError(f"{ckpt.config.model_type} has no routed experts; PMQ sets a bit width per routed expert")
    by_index = {layer.index: layer for layer in layers}
    pmq = PMQStats(layers, bits, group, cache=_cache_fits(layers, bits))
    t0 = time.perf_counter()
    if say is not None:
        say(f"  layer-sequential on {dev}: {len(ckpt.decoder.layers)} decoder layers, largest "
            f"{ckpt.layer_bytes() / 2**20:.1f} MiB resident at a time")

    def on_layer(j: int) -> dict | None:  # layer j's statistics are complete and its weights resident
        if j not in by_index:
            return None
        st = pmq.stats[j]
        entry = layer_entry(j, st, allocate_layer(st, avg_bits), bits, say)
        st._cache.clear()  # this layer's quantized integers (when kept)
        return {"entry": entry}

    results: dict = {}
    sweep(ckpt, wins, [pmq], batch_size=batch_size, on_layer=on_layer, progress=progress, results=results)
    if say is not None:
        say(f"  statistics and widths, layer by layer, in {time.perf_counter() - t0:.1f}s")
    entries = [results[layer.index]["entry"] for layer in layers]
    report = _report(entries, avg_bits, bits, group, info, source or str(path), ckpt.config.model_type, layers, None)
    if earlier is not None:
        report = report.compose(earlier)
    widths = {e["layer"]: [x["bits"] for x in e["experts"]] for e in entries}
    gated = all(layer.gated for layer in layers)
    write_streamed(Path(path), out, report, quant_transform(widths, group, ckpt.rename, gated), {}, overwrite, progress,
                   max_shard_bytes)
    return report


QUANT_METHODS = ("pmq",)  # what `mumoe prune --then` takes as a last, quantizing stage


def quant_stage(text: str) -> tuple[float, tuple[int, ...], int] | None:
    """`--then pmq:B[:bits=1,2,3][:group=G]` -> (avg_bits, bits, group), checked; None for any other stage."""
    name, _, rest = text.partition(":")
    if name not in QUANT_METHODS:
        return None
    parts = [p for p in rest.split(":") if p] if rest else []
    if not parts:
        raise MumoeError(f"--then {text}: give the average bits, e.g. --then {name}:2.5")
    try:
        avg = float(parts[0])
        opts = dict(p.split("=", 1) for p in parts[1:])
        bits = tuple(int(b) for b in opts.pop("bits", "1,2,3").split(","))
        group = int(opts.pop("group", "128"))
    except ValueError:
        raise MumoeError(f"--then {text}: expected {name}:AVG_BITS[:bits=1,2,3][:group=128]") from None
    if opts:
        raise MumoeError(f"--then {text}: unknown option {sorted(opts)[0]!r} (bits, group)")
    return check_quant_args(avg, bits, group)


def prune_then_quantize(name: str, recipe, quant: tuple[float, tuple[int, ...], int], out: str | Path, *,
                        layerwise="auto", overwrite: bool = False, verbose: bool = True,
                        say: Callable[[str], None] | None = None) -> PruneReport:
    """`mumoe prune ... --then pmq:B`: the recipe's stages, then PMQ on what they left, calibrated on the recipe's
    windows; one record of every stage, written in the `mumoe-quant` form. Layer by layer (the model does not
    fit, or asked): the pruned checkpoint goes to a folder of mumoe's own beside `out` (removed at the end) and is
    quantized from there; else in memory."""
    from ..apply.export import check_output_dir, save_pruned
    from ..grains import get_grain
    from ..loading import load_tokenizer
    from .choose import use_layerwise
    from .inputs import calibration, load_model
    from .memory import prune_loaded

    last = recipe.stages[-1]
    if not get_grain(last.grain).leaves_hf(last):
        raise MumoeError(f"{get_grain(last.grain).describe(last)} leaves per-layer shapes; PMQ after it is not "
                         "supported (it quantizes a uniform model)")
    avg_bits, bits, group = quant
    check_output_dir(out, overwrite, source=name)
    tok = load_tokenizer(name)
    windows = calibration(recipe, None, tok)
    if use_layerwise(name, recipe, layerwise, say=say):
        from ..files import stage_folder
        from .layerwise import prune_layerwise

        with stage_folder(Path(out)) as scratch:
            first = prune_layerwise(name, recipe, scratch / "pruned", windows, verbose=verbose, say=say)
            if say is not None:
                say(f"then PMQ, {avg_bits:g} bits per expert on average, layer by layer")
            return quantize_layerwise(str(scratch / "pruned"), str(out), windows, avg_bits, bits, group,
                                      recipe.calib.batch_size, recipe.dtype, recipe.device, overwrite,
                                      progress=verbose, say=say, earlier=first, source=name)
    model = load_model(name, recipe.dtype, recipe.device)
    prune_loaded(model, recipe, windows, source=name, say=say)
    if say is not None:
        say(f"then PMQ, {avg_bits:g} bits per expert on average")
    report = quantize_loaded(model, windows, avg_bits, bits, group, recipe.calib.batch_size, source=name,
                             progress=verbose, say=say)
    save_pruned(model, out, report, tok, overwrite=overwrite, dtype=recipe.dtype)
    return report
