"""`mumoe prune`: flags -> a validated Recipe, the checks that need no weights, then `mumoe.prune` (the library
picks the driver)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import MumoeError
from ..settings import SETTINGS
from .common import check_device, lead, method_names, model_config, source_dir, model_args, say

def grain_flags() -> dict[str, dict]:
    """Every grain's options as argparse specs: name -> kwargs. A name several grains declare (--budget,
    --order) is one flag: its choices the union of theirs, its help theirs joined; each grain checks its own."""
    from ..grains import GRAINS

    out: dict[str, dict] = {}
    for g in GRAINS.values():
        for name, spec in g.cli.items():
            if name not in out:
                out[name] = dict(spec)
                continue
            have = out[name]
            if "choices" in spec and "choices" in have:
                have["choices"] = list(dict.fromkeys([*have["choices"], *spec["choices"]]))
            if spec.get("help") and spec["help"] not in have.get("help", "") and not spec["help"].startswith("see "):
                have["help"] = f"{have.get('help', '')}; {spec['help']}"
    return out


PRUNE_FLAGS = ("method", "ratio", "calib", "nsamples", "seqlen", "seed", "batch_size", *grain_flags())


def _recipe_from_args(args):
    """The run's Recipe: replayed from --recipe, or built from the flags; validated before anything loads."""
    from ..recipe import Recipe

    if args.recipe:
        given = [f"--{f.replace('_', '-')}" for f in PRUNE_FLAGS + ("then", "expert_params", "expert_share")
                 if getattr(args, f) is not None]
        if given:
            raise MumoeError(f"--recipe replays a run as recorded; drop {', '.join(given)} (or drop --recipe)")
        recipe = Recipe.load(args.recipe)
        overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
        return Recipe.from_dict({**recipe.to_dict(), **overrides}) if overrides else recipe
    split = args.expert_params is not None or args.expert_share is not None
    if split and args.ratio is not None:
        raise MumoeError("--expert-params sets the stage ratios (the expert stage's and the --then stage's); drop "
                         "--ratio")
    missing = [f"--{f}" for f in ("method", "ratio") if getattr(args, f) is None and not (split and f == "ratio")]
    if missing:
        raise MumoeError(f"prune needs {' and '.join(missing)} (or --recipe RUN/pruning.json to replay a run)")
    opts = {f: getattr(args, f) for f in PRUNE_FLAGS[3:] if getattr(args, f) is not None}
    recipe = Recipe.build(args.method, 0.0 if split else args.ratio, calib=args.calib, dtype=args.dtype or "auto",
                          device=args.device or "cpu", **opts)
    if args.then:
        from dataclasses import replace

        from ..recipe import parse_stage

        recipe = replace(recipe, later=tuple(parse_stage(t, split) for t in args.then))
    return recipe.split(args.expert_params, args.expert_share) if split else recipe


def _replay_model(args) -> str:
    """MODEL as given, else the model a replayed pruning.json names, else the bundled one."""
    if args.model is not None:
        return args.model
    if args.recipe:
        p = Path(args.recipe)
        p = p / "pruning.json" if p.is_dir() else p
        try:
            source = json.loads(p.read_text("utf-8")).get("model", {}).get("source")
        except (OSError, ValueError, AttributeError):
            source = None
        if source:
            return source
    return "default"


def cmd_prune(args) -> int:
    from .. import api
    from ..apply.export import check_output_dir
    from ..apply.forms import get_form
    from ..drivers.quantize import quant_stage
    from ..loading import check_model
    from ..observe.calib import check_sources

    quants = [q for q in (quant_stage(t) for t in args.then or ()) if q is not None]
    if quants:
        if quant_stage(args.then[-1]) is None or len(quants) > 1:
            raise MumoeError("--then pmq:B quantizes what the stages before it left: give it once, as the last stage")
        if args.recipe or args.expert_params is not None or args.work_dir:
            raise MumoeError("--then pmq:B runs after the pruning stages of this command; drop --recipe / "
                             "--expert-params / --work-dir (or quantize the export with `mumoe quantize`)")
        args.then = args.then[:-1] or None
    recipe = _recipe_from_args(args)
    model_name = _replay_model(args)
    _check_prune_args(args, recipe)
    if recipe.calib.sources:  # a missing calibration file fails first, whatever else is wrong
        check_sources(recipe.calib.sources, read=False)
    check_output_dir(args.out, args.overwrite, source_dir(check_model(model_name)))
    config = model_config(model_name)
    if config is not None:
        recipe.check_config(config)
    check_device(recipe.device)
    t0 = time.perf_counter()
    if quants:
        from ..drivers.quantize import prune_then_quantize

        report = prune_then_quantize(check_model(model_name), recipe, quants[0], args.out, overwrite=args.overwrite,
                                     layerwise={"on": True, "off": False}.get(args.layerwise, "auto"),
                                     verbose=not SETTINGS.quiet, say=say)
        print(f"wrote {args.out} (loads with {get_form(report.form).loads_with}) in "
              f"{time.perf_counter() - t0:.1f}s total")
        return 0
    report = api.prune(model_name, recipe, out=args.out, overwrite=args.overwrite,
                       layerwise={"on": True, "off": False}.get(args.layerwise, "auto"), work_dir=args.work_dir,
                       stream_files=not args.in_memory, verbose=not SETTINGS.quiet, say=say,
                       spill_bytes=int(args.spill_gb * 2**30))
    if not lead():  # torchrun: rank 0 speaks for all
        return 0

    if report.removed and recipe.later:  # (every run records it in pruning.json)
        r = report.removed
        say(f"routed-expert weights removed: {r['expert_params_removed']:,} of {r['expert_params']:,} "
            f"({r['share']:.2%})")
    print(f"wrote {args.out} (loads with {get_form(report.form).loads_with}) in {time.perf_counter() - t0:.1f}s total")
    return 0


def _check_prune_args(args, recipe) -> None:
    """Flags that do not apply to the method's grain, and the layer-sequential options, before anything runs."""
    from ..files import check_positive

    from ..grains import GRAINS, get_grain

    flags = [f for f in PRUNE_FLAGS if any(f in g.flags for g in GRAINS.values())]
    wrong = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f, None) is not None
             and f not in get_grain(recipe.grain).flags]
    if wrong and not args.recipe:
        raise MumoeError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to {recipe.method} "
                         f"({recipe.grain} grain); see `mumoe prune --help`")
    check_positive(args.spill_gb, "--spill-gb", 0, integer=False)
    if args.work_dir:
        from ..observe.workdir import check_work_dir

        check_work_dir(args.work_dir, source_dir(_replay_model(args)), args.out)


def add_parser(sub) -> None:
    sp = sub.add_parser("prune", help="prune experts, atoms or weights and export an HF checkpoint + pruning.json",
                        description="Score, select and apply one method at one ratio (and any later stages, "
                        "--then), then export atomically. The driver is chosen for the model: from the checkpoint "
                        "files alone (aimer), layer by layer when it would not fit in memory (--layerwise), else "
                        "loaded whole. The run is recorded as a recipe in pruning.json: `mumoe prune --recipe "
                        "OUT/pruning.json --out DIR` replays it exactly. Everything is validated before the model "
                        "is loaded.")
    model_args(sp, model_default=None)
    sp.add_argument("--method", help="scoring method: " + ", ".join(method_names()))
    sp.add_argument("--ratio", type=float, help="fraction removed, in [0, 1): of the routed experts of every layer "
                    "(expert methods), of the atoms (HEAPr), or of the weights (wanda, magnitude)")
    sp.add_argument("--recipe", help="replay a recorded run: a pruning.json (or its folder) or a recipe JSON; "
                    "MODEL defaults to the model it names")
    sp.add_argument("--then", action="append", metavar="METHOD:RATIO[:OPTION=VALUE...]",
                    help="a later stage, run after --method on the model it left with the same calibration "
                    "(repeatable, in order): e.g. --method reap --ratio 0.2 --then wanda:0.5 removes 20%% of the "
                    "experts, then half of the remaining weights; options of that stage's grain as "
                    "wanda:0.5:structure=2:4 or heapr:0.25:form=global. Last, pmq:B[:bits=1,2,3][:group=128] "
                    "quantizes what the stages left (PMQ, B average bits per expert; the mumoe-quant export, as "
                    "`mumoe quantize`); no later stage by default")
    sp.add_argument("--expert-params", type=float, metavar="X",
                    help="one budget over two stages (--method EXPERT-METHOD --then WEIGHT-METHOD, no ratios): remove "
                    "X of all routed-expert weights, the expert stage taking --expert-share of it (whole experts) "
                    "and the weight stage the rest from the experts left, e.g. --method stun --then wanda "
                    "--expert-params 0.4; pruning.json's `removed` counts what was removed")
    sp.add_argument("--expert-share", type=float, metavar="S",
                    help="--expert-params: the expert stage's part of X (default 0.5, STUN's split: 20%% of the "
                    "experts for a 40%% target)")
    for flag, spec in grain_flags().items():  # each grain's options (`Grain.cli`), in registry order
        sp.add_argument(f"--{flag.replace('_', '-')}", **spec)
    sp.add_argument("--in-memory", action="store_true", help="aimer: load the model instead of streaming the files")
    sp.add_argument("--layerwise", choices=["auto", "on", "off"], default="auto",
                    help="calibrated methods on a local checkpoint: on = layer-sequential (one decoder layer "
                    "resident at a time, read from the safetensors files; the pruned checkpoint written tensor by "
                    "tensor); off = load the whole model; auto (default) = on when the model would not fit in "
                    "80%% of the available memory. Runs under torchrun (data-parallel windows)")
    sp.add_argument("--work-dir", help="layer-sequential: checkpoint every finished layer here; the same command "
                    "again resumes after the last finished layer (removed when the run completes)")
    sp.add_argument("--spill-gb", type=float, default=8.0,
                    help="layer-sequential: activations beyond this many GiB go to disk (default 8)")
    sp.add_argument("--batch-size", type=int, help="calibration windows per forward (default 8; 4 for atom methods)")
    sp.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    sp.add_argument("--calib", action="append", help="calibration text: a .txt file, a folder of .txt files, 'domain' "
                    "(every bundled calib split, one source each) or 'domain:NAME' (one of prose, docs, code, "
                    "kernel); repeat for several sources (the windows are split evenly over them)")
    sp.add_argument("--nsamples", type=int, help="calibration windows in all (default 128)")
    sp.add_argument("--seqlen", type=int, help="calibration window length in tokens (default 512)")
    sp.add_argument("--seed", type=int, help="default: the first windows of each source, consecutive; a seed draws "
                    "windows at random offsets and seeds the random method (default 0)")
    sp.set_defaults(func=cmd_prune)
