"""`mumoe quantize`: PMQ (MC#'s mixed-precision experts) — one bit width per routed expert from calibration,
the experts quantized round-to-nearest, exported packed (the `mumoe-quant` form, read by mumoe.load)."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import MumoeError
from ..settings import SETTINGS
from .common import check_device, model_args, say, source_dir


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise MumoeError(f"--bits {text}: give widths as integers, e.g. 1,2,3") from None


def cmd_quantize(args) -> int:
    from ..apply.export import check_output_dir, save_pruned
    from ..apply.forms import get_form
    from ..drivers.inputs import calibration, load_model
    from ..drivers.quantize import check_quant_args, quantize_loaded
    from ..files import check_positive
    from ..loading import check_model, export_form, load_tokenizer
    from ..models.base import config_experts
    from ..observe.calib import check_sources
    from ..recipe import CalibSpec
    from ..select.bits import layer_budget, least_budget
    from .common import model_config

    avg_bits, bits, group = check_quant_args(args.avg_bits, _bits(args.bits), args.group)
    check_positive(args.batch_size, "--batch-size", 1)
    spec = CalibSpec(tuple(args.calib or ["domain"]), args.nsamples, args.seqlen, args.seed, args.batch_size)
    check_sources(spec.sources, read=False)
    name = check_model(args.model)
    if Path(name).is_dir() and export_form(Path(name)).name != "hf":
        raise MumoeError(f"{args.model} is a mumoe export with per-layer shapes ({export_form(Path(name)).name} form); "
                         "PMQ quantizes a standard checkpoint (a uniform expert budget, the uniform atom form)")
    check_output_dir(args.out, args.overwrite, source_dir(name))
    check_device(args.device)
    config = model_config(name)
    if config is not None:
        E, _ = config_experts(config)
        if E is None:
            raise MumoeError(f"{config.model_type} has no routed experts; PMQ sets a bit width per routed expert")
        if layer_budget(avg_bits, E) < least_budget(E, bits):
            raise MumoeError(f"--avg-bits {avg_bits:g} over {E} experts cannot hold one expert at {bits[-1]} bits "
                             f"and one at {bits[-2]} (the others at {bits[0]} or more)")
    t0 = time.perf_counter()
    loads = get_form("mumoe-quant").loads_with
    tok = load_tokenizer(name)
    windows = calibration(spec, None, tok)
    if _layerwise(args, name):
        from ..drivers.quantize import quantize_layerwise

        say(f"PMQ layer by layer: {avg_bits:g} bits per expert on average (widths {','.join(map(str, bits))}, "
            f"groups of {group}); calibration {windows[0].shape[0]} windows x {windows[0].shape[1]} tokens from "
            f"{windows[2].get('source', '-')}")
        quantize_layerwise(name, args.out, windows, avg_bits, bits, group, args.batch_size, args.dtype, args.device,
                           args.overwrite, progress=not SETTINGS.quiet, say=say)
        print(f"wrote {args.out} (loads with {loads}) in {time.perf_counter() - t0:.1f}s total")
        return 0
    model = load_model(name, args.dtype, args.device)
    say(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; PMQ: {avg_bits:g} bits per expert on average "
        f"(widths {','.join(map(str, bits))}, groups of {group}); calibration {windows[0].shape[0]} windows x "
        f"{windows[0].shape[1]} tokens from {windows[2].get('source', '-')}")
    report = quantize_loaded(model, windows, avg_bits, bits, group, args.batch_size, source=name,
                             progress=not SETTINGS.quiet, say=say)
    save_pruned(model, args.out, report, tok, overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote {args.out} (loads with {loads}) in {time.perf_counter() - t0:.1f}s total")
    return 0


def _layerwise(args, name: str) -> bool:
    """--layerwise on, or auto and the checkpoint would not fit in the memory this process may use."""
    from ..drivers.choose import local_checkpoint, too_big

    if args.layerwise == "off":
        return False
    local = local_checkpoint(name)
    if args.layerwise == "on" and not local:
        raise MumoeError(f"--layerwise on reads a local safetensors checkpoint folder; {args.model} is not one")
    if args.layerwise == "on" and args.dtype not in (None, "auto"):
        raise MumoeError("--layerwise on writes every tensor but the experts in the checkpoint's own dtype; drop "
                         "--dtype (or run in memory with --layerwise off)")
    return args.layerwise == "on" or (local and args.dtype in (None, "auto")
                                       and too_big(name, args.dtype, args.device, say=say))


def add_parser(sub) -> None:
    sp = sub.add_parser("quantize", help="mixed-precision experts (PMQ): a bit width per routed expert, packed export",
                        description="PMQ (MC-MoE / MC#): one calibration pass measures, for every routed expert, how "
                        "often it is chosen, its router mass, and the MoE layer's output error with only that "
                        "expert quantized at each width; an exact solver then gives each expert a width so that the "
                        "layer averages --avg-bits, with at least one expert at each of the two highest widths. "
                        "Experts are quantized round-to-nearest (asymmetric min-max, groups of --group input "
                        "columns) and written packed: the export's expert bytes are what the widths say. Everything "
                        "else (attention, router, embeddings) stays as it is.")
    model_args(sp)
    sp.add_argument("--method", default="pmq", choices=["pmq"], help="quantization method (default pmq, the only one so far)")
    sp.add_argument("--avg-bits", type=float, default=2.5, help="average bits per expert weight in every layer "
                    "(default 2.5)")
    sp.add_argument("--bits", default="1,2,3", help="the widths an expert may take (default 1,2,3)")
    sp.add_argument("--group", type=int, default=128, help="input columns per scale and zero (default 128)")
    sp.add_argument("--calib", action="append", help="calibration text as for prune (default: domain)")
    sp.add_argument("--nsamples", type=int, default=128, help="calibration windows in all (default 128)")
    sp.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    sp.add_argument("--seed", type=int, help="random window offsets (default: the first windows)")
    sp.add_argument("--batch-size", type=int, default=8, help="windows per forward: one calibration batch each, "
                    "over which the output error is measured (default 8)")
    sp.add_argument("--layerwise", choices=["auto", "on", "off"], default="auto", help="auto (default): layer by "
                    "layer when the checkpoint would not fit in 80%% of the memory this process may use (one decoder "
                    "layer resident, the export written tensor by tensor; the same widths and bytes as in memory); "
                    "on / off: always / never")
    sp.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    sp.set_defaults(func=cmd_quantize)
