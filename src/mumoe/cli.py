"""`mumoe` command line: demo, info, prune, compare, eval, generate, taer, serve, report. Bad input ends in one line on
stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import MumoeError
from .settings import SETTINGS


def say(*args, **kwargs) -> None:
    """A stage line (what is being done, how long it took): printed unless --quiet."""
    if not SETTINGS.quiet:
        print(*args, **kwargs)


MODEL_HELP = ("model: 'default' (the bundled qwen3_moe, also when omitted), a local HF checkpoint folder, "
              "a hub id, or 'tiny:ARCH' for a tiny random model (e.g. tiny:mixtral)")


def _param_counts(model, adapter) -> dict:
    total = sum(p.numel() for p in model.parameters())
    layers = adapter.moe_layers() if adapter.is_moe else []
    expert = sum(layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel() for layer in layers)
    inactive = sum((layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel())
                   * (1 - layer.top_k / layer.num_experts) for layer in layers)
    return {"total": total, "active": int(total - inactive), "routed_experts": expert}


def cmd_info(args) -> int:
    from .models import adapter_for

    model = _load_model(args.model, args.dtype, args.device)
    adapter = adapter_for(model)
    layers = adapter.moe_layers()
    counts = _param_counts(model, adapter)
    info = {
        "model": args.model, "model_type": model.config.model_type,
        "architecture": type(model).__name__, "decoder_layers": len(adapter.decoder_layers()),
        "moe_layers": [layer.index for layer in layers], "params": counts,
    }
    if layers:
        first = layers[0]
        info.update({
            "experts_per_layer": [layer.num_experts for layer in layers], "top_k": first.top_k,
            "expert_intermediate_size": first.intermediate_size, "router": first.scoring,
            "norm_topk_prob": first.norm_topk_prob, "shared_expert": first.shared is not None,
            "n_group": first.n_group, "topk_group": first.topk_group,
        })
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"model          {args.model}  ({info['model_type']}, {info['architecture']})")
    print(f"decoder layers {info['decoder_layers']}; MoE layers: {len(layers)}"
          + (f" ({', '.join(map(str, info['moe_layers']))})" if layers else " (dense model)"))
    if layers:
        experts = sorted(set(info["experts_per_layer"]))
        groups = f", groups {first.n_group} (top {first.topk_group})" if first.n_group else ""
        print(f"experts        {'/'.join(map(str, experts))} routed per layer, top_k {first.top_k}, "
              f"expert width {first.intermediate_size}, router {first.scoring}"
              f"{' (top-k renormalized)' if first.norm_topk_prob else ''}{groups}, "
              f"shared expert: {'yes' if first.shared is not None else 'no'}")
    t = counts["total"]
    print(f"parameters     total {t:,} | active/token {counts['active']:,} ({100 * counts['active'] / t:.1f}%) | "
          f"routed experts {counts['routed_experts']:,} ({100 * counts['routed_experts'] / t:.1f}% of total)")
    return 0


PRUNE_FLAGS = ("method", "ratio", "calib", "nsamples", "seqlen", "seed", "batch_size", "budget", "order", "form",
               "scope", "structure", "width_multiple")


def _recipe_from_args(args):
    """The run's Recipe: replayed from --recipe, or built from the flags; validated before anything loads."""
    from .recipe import Recipe

    if args.recipe:
        given = [f"--{f.replace('_', '-')}" for f in PRUNE_FLAGS + ("then",) if getattr(args, f) is not None]
        if given:
            raise MumoeError(f"--recipe replays a run as recorded; drop {', '.join(given)} (or drop --recipe)")
        recipe = Recipe.load(args.recipe)
        overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
        return Recipe.from_dict({**recipe.to_dict(), **overrides}) if overrides else recipe
    missing = [f"--{f}" for f in ("method", "ratio") if getattr(args, f) is None]
    if missing:
        raise MumoeError(f"prune needs {' and '.join(missing)} (or --recipe RUN/pruning.json to replay a run)")
    opts = {f: getattr(args, f) for f in PRUNE_FLAGS[3:] if getattr(args, f) is not None}
    recipe = Recipe.build(args.method, args.ratio, calib=args.calib, dtype=args.dtype or "auto",
                          device=args.device or "cpu", **opts)
    if args.then:
        from dataclasses import replace

        from .recipe import parse_stage

        recipe = replace(recipe, later=tuple(parse_stage(t) for t in args.then))
    return recipe


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


def _model_config(name: str):
    from .drivers.inputs import model_config

    return model_config(name)


def cmd_prune(args) -> int:
    from . import api
    from .apply.export import check_output_dir
    from .loading import check_model
    from .observe.calib import check_sources

    recipe = _recipe_from_args(args)
    model_name = _replay_model(args)
    _check_prune_args(args, recipe)
    if recipe.calib.sources:  # a missing calibration file fails first, whatever else is wrong
        check_sources(recipe.calib.sources, read=False)
    check_output_dir(args.out, args.overwrite, _source_dir(check_model(model_name)))
    config = _model_config(model_name)
    if config is not None:
        recipe.check_config(config)
    _check_device(recipe.device)
    _check_space(args.out, model_name, recipe)
    t0 = time.perf_counter()
    report = api.prune(model_name, recipe, out=args.out, overwrite=args.overwrite,
                       layerwise={"on": True, "off": False}.get(args.layerwise, "auto"), work_dir=args.work_dir,
                       stream_files=not args.in_memory, verbose=not SETTINGS.quiet, say=say,
                       spill_bytes=int(args.spill_gb * 2**30))
    if not _lead():  # torchrun: rank 0 speaks for all
        return 0
    from .apply.forms import get_form

    print(f"wrote {args.out} (loads with {get_form(report.form).loads_with}) in {time.perf_counter() - t0:.1f}s total")
    return 0


def _lead() -> bool:
    """Rank 0 of a torchrun job (or no job): the one that speaks."""
    from .observe.sequential import dist_world

    return dist_world()[0] == 0


def _check_prune_args(args, recipe) -> None:
    """Flags that do not apply to the method's grain, and the layer-sequential options, before anything runs."""
    from .files import check_positive

    from .grains import GRAINS, get_grain

    flags = [f for f in PRUNE_FLAGS if any(f in g.flags for g in GRAINS.values())]
    wrong = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f, None) is not None
             and f not in get_grain(recipe.grain).flags]
    if wrong and not args.recipe:
        raise MumoeError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to {recipe.method} "
                         f"({recipe.grain} grain); see `mumoe prune --help`")
    check_positive(args.spill_gb, "--spill-gb", 0, integer=False)
    if args.work_dir:
        from .observe.workdir import check_work_dir

        check_work_dir(args.work_dir, _source_dir_if_local(args), args.out)


def _source_dir_if_local(args) -> str | None:
    """The local folder of the model a prune reads (None for tiny/hub models), without loading anything."""
    from .loading import resolve

    name = resolve(_replay_model(args))
    return name if Path(name).is_dir() else None


def _check_space(out: str, model_name: str, recipe) -> None:
    """A lower bound on the export's size — (1 - ratio) of the checkpoint's weights, each in the smaller of its
    file dtype and the load dtype (no grain removes more than `ratio` of them) — against the free space at
    --out, so a full disk is found before the run, not after it."""
    import math

    from .checkpoint import DTYPES, read_header, shard_files
    from .files import check_free_space, human_bytes
    from .loading import resolve

    path = Path(resolve(model_name))
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        return
    load = _dtype_of(recipe.dtype, model_name, recipe.device).itemsize
    need = sum(math.prod(m["shape"]) * min(DTYPES[m["dtype"]].itemsize, load)
               for f in shard_files(path) for m in read_header(f).values() if m["dtype"] in DTYPES)
    check_free_space(out, int((1 - recipe.ratio) * need),
                     f"{1 - recipe.ratio:.0%} of the checkpoint's {human_bytes(need)} of weights")


def _check_device(device: str | None) -> None:
    """A device that is not there (cuda without a GPU) fails before anything is read."""
    from .observe.runner import resolve_device

    resolve_device(device or "cpu")


def _dtype_of(name: str | None, model_name: str | None = None, device: str | None = None):
    """The dtype the model runs in (`loading.compute_dtype`: "auto" = the checkpoint's own, fp32 on the CPU for
    a bf16/fp16 one)."""
    from .loading import compute_dtype
    from .observe.runner import resolve_device

    return compute_dtype(name or "auto", model_name, resolve_device(device or "cpu"))


def _source_dir(model_name: str) -> str | None:
    """The local folder of MODEL (None for hub ids and tiny models): outputs may never replace it."""
    from .loading import resolve

    name = resolve(model_name)
    return name if Path(name).is_dir() else None


def _load_model(name: str, dtype: str | None, device: str | None):
    from .drivers.inputs import load_model

    return load_model(name, dtype, device)


def cmd_compare(args) -> int:
    from . import api
    from .criteria import get_method
    from .eval.compare import compare, markdown
    from .loading import check_model, load_tokenizer
    from .observe.calib import check_sources, tokenize, windows
    from .recipe import Recipe

    from .files import check_positive

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise MumoeError("--methods names no method (e.g. --methods reap,ean,frequency)")
    for value, flag, low in ((args.eval_windows, "--eval-windows", 1), (args.eval_seqlen, "--eval-seqlen", 2),
                             (args.batch_size, "--batch-size", 1)):
        check_positive(value, flag, low)
    _check_device(args.device)
    ratios = args.ratio or [0.5]
    opts = {k: v for k, v in (("nsamples", args.nsamples), ("seqlen", args.seqlen), ("seed", args.seed),
                              ("form", args.form), ("scope", args.scope)) if v is not None}
    opts["batch_size"] = args.batch_size or 8  # one pass: one batch size for every method
    recipes = [Recipe.build(m, r, calib=(args.calib or ["domain"]) if get_method(m).needs_calib else None, dtype=args.dtype or "auto",
                            device=args.device or "cpu", **opts) for m in methods for r in ratios]
    from .eval.compare import check_recipes

    check_recipes(recipes)
    cal = next((r for r in recipes if r.calib.sources), None)
    if cal is not None:
        check_sources(cal.calib.sources, read=False)
    if args.out:
        from .apply.export import check_output_dir

        check_output_dir(args.out, args.overwrite, _source_dir(check_model(args.model)))
        from .files import SMALL_FILE, check_free_space

        check_free_space(args.out, SMALL_FILE, "tables and plots of a few KiB", thing="the report")
    check_model(args.model)
    eval_texts = _eval_texts(args.eval) if args.eval else None
    t0 = time.perf_counter()
    tok = load_tokenizer(args.model)  # calibration windows cut (each text read once) before the weights load
    wins, groups, info = api.calibration(cal, None, tok) if cal is not None else (None, None, {})
    model = _load_model(args.model, args.dtype, args.device)
    evals = None
    if eval_texts:
        if tok is None:
            raise MumoeError(f"{args.model} has no tokenizer; --eval on text needs one")
        evals = {d: windows(tokenize(tok, text), args.eval_seqlen, args.eval_windows) for d, text in eval_texts.items()}
    say(f"compare {', '.join(methods)} at {', '.join(f'{r:.0%}' for r in ratios)} on {args.model}: one calibration "
          f"pass" + (f" over {info['nsamples']} windows x {info['seqlen']} tokens ({info['source']})" if info else "")
          + (f"; eval {args.eval_windows} windows x {args.eval_seqlen} tokens of {', '.join(evals)}" if evals else ""))
    res = compare(model, recipes, wins, groups, evals, calib_label=info.get("source", "-"), progress=not SETTINGS.quiet,
                  log=None)
    print(markdown(res))
    say(f"\none calibration pass for {len(set(methods))} methods: {res.pass_seconds:.1f}s; "
          f"total {time.perf_counter() - t0:.1f}s")
    if args.out:
        from .apply.export import atomic_output
        from .eval.report import write_report

        payload = {"model": args.model, "calibration": info, "pass_seconds": round(res.pass_seconds, 3),
                   "recipes": [r.to_dict() for r in recipes], "rows": res.rows, "reports": res.reports}
        with atomic_output(args.out, args.overwrite) as tmp:
            (tmp / "results.json").write_text(json.dumps(payload, indent=1))
            if evals:
                write_report([r for r in res.rows if "ppl" in r], tmp, f"mumoe compare on {args.model}")
        print(f"wrote {args.out}/ (results.json" + (", report.md, ppl_vs_ratio.png)" if evals else ")"))
    return 0


def _eval_texts(spec: str) -> dict[str, str]:
    """--eval/--ppl: 'domain' = every bundled eval split; else one .txt file or folder. -> {name: text}"""
    from .observe.calib import read_text
    from .paths import DATA

    if spec == "domain":
        texts = {p.parent.name: p for p in sorted(DATA.glob("*/eval.txt"))}
        if not texts:
            raise MumoeError(f"no bundled eval splits under {DATA}")
    else:
        texts = {Path(spec).stem: spec}
    return {name: read_text(path) for name, path in texts.items()}


def _write_tasks(args) -> int:
    """eval --write-tasks DIR: the local offline tasks for plain lm_eval, and the command that runs them."""
    from .eval.harness import export_tasks

    if args.tasks or args.ppl:
        raise MumoeError("--write-tasks only writes the task files; drop --tasks / --ppl (or --write-tasks)")
    names = export_tasks(args.write_tasks, args.limit or 100)
    print(f"wrote {len(names)} lm-eval tasks to {args.write_tasks}: {', '.join(names)}")
    print(f"  lm_eval --model hf --model_args pretrained=PATH --include_path {Path(args.write_tasks).resolve()} "
          f"--tasks {','.join(names)}")
    return 0


def _check_eval_args(args) -> None:
    """eval's options, the --json target and the device, before any text or weight is read."""
    from .files import check_new_file, check_positive

    check_positive(args.seqlen, "--seqlen", 2)
    check_positive(args.batch_size, "--batch-size")
    check_positive(args.max_windows, "--max-windows")
    check_positive(args.limit, "--limit")
    check_positive(args.prompt_len, "--prompt-len")
    if args.testtime:
        from .recipe import parse_structure
        from .select.weights import check_active

        check_active(args.active)
        parse_structure(args.structure)
        check_positive(args.calib_windows, "--calib-windows")
        _check_experts_flag(args)
        if args.library and args.experts is None:
            raise MumoeError("--library is compared at the expert grain: add --experts K")
        if args.calib:
            from .observe.calib import check_sources

            check_sources([args.calib])
    if args.json:
        check_new_file(args.json, args.overwrite, "--json")
    _check_device(args.device)


def _write_json(path: str, text: str) -> None:
    """eval --json: written atomically (temp file, then rename); a full disk is one line naming the path."""
    from .files import write_file_atomic

    write_file_atomic(path, text, "--json")


def cmd_eval(args) -> int:
    from .eval.perplexity import perplexity
    from .loading import check_model, load_tokenizer

    if args.write_tasks:
        return _write_tasks(args)
    if args.tasks:
        _check_eval_args(args)
        return _eval_tasks(args)
    if args.ppl is None:
        raise MumoeError("nothing to evaluate: pass --ppl PATH (or --ppl domain for the bundled eval splits) "
                         "or --tasks NAMES")
    _check_eval_args(args)
    texts = _eval_texts(args.ppl)
    config = _model_config(check_model(args.model))
    ctx = (getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None) or 2048
    seqlen = args.seqlen or min(2048, ctx)
    if seqlen > ctx:
        raise MumoeError(f"seqlen {seqlen} exceeds the model's context ({ctx})")
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise MumoeError(f"{args.model} has no tokenizer; perplexity on text needs one")
    model = _load_model(args.model, args.dtype, args.device)
    if args.testtime:
        return _eval_testtime(args, model, tokenizer, texts, seqlen)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    say(f"perplexity with seqlen={seqlen} (non-overlapping windows, dtype {dtype}) of {args.model}")
    results = {}
    for name, text in texts.items():
        res = perplexity(model, tokenizer, text, seqlen, args.batch_size, args.max_windows)
        results[name] = res
        print(f"  {name:10s} ppl {res['ppl']:9.3f}  ({res['tokens']:,} predicted tokens, {res['windows']} windows, "
              f"{res['seconds']:.1f}s)")
    if args.json:
        payload = {"model": args.model, "dtype": dtype, "seqlen": seqlen, "ppl_source": args.ppl,
                   "results": results}
        _write_json(args.json, json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


def _check_library_args(args) -> None:
    """--keep against the model's experts and top_k, window options and device, before the model loads."""
    from .files import check_positive
    from .models.base import config_experts

    check_positive(args.nsamples, "--nsamples")
    check_positive(args.seqlen, "--seqlen", 2)
    config = _model_config(args.model)
    if config is not None:
        cfg = config.get_text_config()
        E, k = config_experts(config)
        if E is None:
            raise MumoeError(f"{args.model} is a dense model; a task library keeps routed experts")
        if k is not None and args.keep < k:
            raise MumoeError(f"--keep {args.keep} is fewer than the router's top_k={k}")
        if args.keep > E:
            raise MumoeError(f"--keep {args.keep} is more than the {E} experts per layer")
        ctx = getattr(cfg, "max_position_embeddings", None)
        if ctx and args.seqlen > ctx:
            raise MumoeError(f"--seqlen {args.seqlen} exceeds the model's context ({ctx} tokens)")
    _check_device(args.device)


def _check_library_space(args) -> None:
    """A lower bound on a task library's size — one fp32 score per expert per MoE layer for each task — against
    the free space at --out, before the model is read."""
    from .files import SMALL_FILE, check_free_space
    from .models.base import config_experts

    config = _model_config(args.model)
    E, _ = config_experts(config) if config is not None else (None, None)
    layers = getattr(config.get_text_config(), "num_hidden_layers", 1) if config is not None else 1
    need = SMALL_FILE + len(args.task) * (E or 1) * (layers or 1) * 4
    check_free_space(args.out, need, f"{len(args.task)} task(s) x {layers} layers x {E} experts of scores",
                     thing="the task library")


def cmd_taer_build(args) -> int:
    from .apply.export import atomic_output, check_output_dir
    from .loading import DATA, check_model, load_tokenizer
    from .observe.calib import calibration_windows, read_text
    from .retrieval import build_library

    check_output_dir(args.out, args.overwrite, _source_dir(check_model(args.model)))
    _check_library_space(args)
    specs = {}
    for spec in args.task:
        if spec == "domain":
            specs.update({p.parent.name: p for p in sorted(DATA.glob("*/calib.txt"))})
            continue
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise MumoeError(f"--task takes NAME=PATH (or 'domain'), got {spec!r}")
        specs[name] = path
    for path in specs.values():
        read_text(path)  # missing or empty texts fail before the model loads
    _check_library_args(args)
    if args.layerwise:
        from .loading import resolve
        from .observe.layerwise import LayerwiseCheckpoint, is_layerwise_source
        from .observe.runner import resolve_device

        if not is_layerwise_source(resolve(args.model)):
            raise MumoeError(f"--layerwise reads a local safetensors checkpoint folder; {args.model} is not one")
        model = LayerwiseCheckpoint(resolve(args.model), _dtype_of(args.dtype, resolve(args.model), args.device),
                                    resolve_device(args.device or "cpu"))
    else:
        model = _load_model(args.model, args.dtype, args.device)
    tok = load_tokenizer(args.model)
    if tok is None:
        raise MumoeError(f"{args.model} has no tokenizer")
    tasks = {name: calibration_windows(tok, path, args.nsamples, args.seqlen) for name, path in specs.items()}
    t0 = time.perf_counter()
    lib = build_library(model, tasks, args.keep, args.score, args.key, key_stat=args.key_stat,
                        key_space=args.key_space)
    with atomic_output(args.out, args.overwrite) as tmp:
        lib.save(tmp)
    print(f"built {len(tasks)} task patterns (keep {args.keep} of {lib.fingerprint['num_experts'][0]} experts per "
          f"layer, {args.score} scores, {args.key}-layer {args.key_stat} key, {args.key_space} L2) in "
          f"{time.perf_counter() - t0:.1f}s -> {args.out}")
    return 0


def _task_server(args):
    """The model and its task library, with one line saying what was loaded and how long it took."""
    from .retrieval import TaskServer

    t0 = time.perf_counter()
    server = TaskServer(args.model, args.library, args.dtype, args.device)
    say(f"loaded {args.model} and the task library {args.library} ({len(server.lib.tasks)} tasks, keep "
          f"{server.lib.keep} experts per layer) in {time.perf_counter() - t0:.1f}s")
    return server


def cmd_taer_match(args) -> int:
    if not args.prompt.strip():
        raise MumoeError("empty prompt")
    _check_generate_args(args)
    server = _task_server(args)
    m, ids, seconds = server.match(args.prompt)
    print(f"task {m.task} (distance {m.distance:.4f}); runner-up {m.runner_up} (distance {m.runner_up_distance:.4f}); "
          f"{ids.shape[-1]} prompt tokens, {seconds:.2f}s")
    return 0


def cmd_taer_generate(args) -> int:
    if not args.prompt.strip():
        raise MumoeError("empty prompt")
    _check_generate_args(args)
    server = _task_server(args)
    res = server.generate(args.prompt, max_new_tokens=args.max_new_tokens)
    print(f"matched task {res.match.task} (distance {res.match.distance:.4f}, runner-up {res.match.runner_up} "
          f"{res.match.runner_up_distance:.4f}) in {res.match_seconds:.2f}s; loaded its "
          f"{server.lib.keep} experts per layer in {res.load_seconds:.2f}s")
    print(args.prompt + res.text)
    return 0


def _eval_testtime_experts(args, model, tokenizer, texts: dict, seqlen: int) -> int:
    """Per-prompt expert pruning (K experts per layer from each prompt's own TCESS) against dense, offline TCESS
    and REAP at the same K (calibrated on --calib, default the bundled domains' calibration splits) and TAER
    (--library), all in the test-time protocol."""
    from .api import calibration
    from .criteria import score_methods
    from .models import moe_adapter_for
    from .observe.calib import tokenize, windows
    from .recipe import Recipe
    from .select import rank
    from .testtime.evaluate import expert_continuation_perplexity, taer_chooser
    from .testtime.experts import check_experts, prompt_keep

    K = check_experts(model, args.experts)
    P = args.prompt_len or seqlen // 2
    lib = None
    if args.library:
        from .retrieval import TaskLibrary

        lib = TaskLibrary.load(args.library)
        lib.check_model(model)
    calib = args.calib or "domain"
    recipe = Recipe.build("reap", 0.0, calib=(calib,), nsamples=args.calib_windows, seqlen=seqlen)
    wins_c, groups, _ = calibration(recipe, None, tokenizer)
    say(f"offline baselines: TCESS and REAP scores from {wins_c.shape[0]} windows of {calib}")
    scores = score_methods(model, ["tcess", "reap"], wins_c, groups, progress=True)
    layers = moe_adapter_for(model).moe_layers()
    fixed = {m: {l.index: sorted(rank(s)[:K].tolist()) for l, s in zip(layers, scores[m])} for m in scores}
    choosers = {"dense": lambda r, ids: None, f"per-prompt K={K}": lambda r, ids: prompt_keep(r, K),
                f"tcess[{calib}]": lambda r, ids: fixed["tcess"], f"reap[{calib}]": lambda r, ids: fixed["reap"]}
    if lib is not None:
        choosers[f"taer K={lib.keep}"] = taer_chooser(lib)
    say(f"test-time protocol, expert grain: windows of {seqlen} tokens, prompt {P} (dense prefill), continuation "
        f"scored with {K} of {layers[0].num_experts} experts per layer")
    results = {}
    for name, text in texts.items():
        wins = windows(tokenize(tokenizer, text), seqlen, args.max_windows or 16)
        for c in choosers.values():
            getattr(c, "matched", []).clear()
        row = {k: expert_continuation_perplexity(model, wins, P, c)["ppl"] for k, c in choosers.items()}
        if lib is not None:
            tasks = choosers[f"taer K={lib.keep}"].matched
            row["taer matched"] = {t: tasks.count(t) for t in sorted(set(tasks))}
        results[name] = row
        print(f"  {name:10s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()))
    if args.json:
        _write_json(args.json, json.dumps({"model": args.model, "seqlen": seqlen, "prompt_len": P, "experts": K,
                                               "calib": calib, "library": args.library, "results": results},
                                              indent=1))
        print(f"wrote {args.json}")
    return 0


def _eval_testtime(args, model, tokenizer, texts: dict, seqlen: int) -> int:
    if args.experts is not None:
        return _eval_testtime_experts(args, model, tokenizer, texts, seqlen)
    from .observe.calib import calibration_windows, tokenize, windows
    from .select.weights import check_active
    from .testtime import continuation_perplexity, offline_masks

    check_active(args.active)
    P = args.prompt_len or seqlen // 2
    fixed = None
    if args.calib:
        fixed = offline_masks(model, calibration_windows(tokenizer, args.calib, 32, seqlen), args.active, args.structure)
    say(f"test-time protocol: windows of {seqlen} tokens, prompt {P} (dense prefill), continuation scored; "
          f"active rho={args.active}, structure {args.structure}")
    results = {}
    for name, text in texts.items():
        wins = windows(tokenize(tokenizer, text), seqlen, args.max_windows or 16)
        row = {"dense": continuation_perplexity(model, wins, P, masks=None, per_prompt=False)["ppl"],
               "mu-moe": continuation_perplexity(model, wins, P, args.active, args.structure, progress=True)["ppl"]}
        if fixed is not None:
            row[f"wanda[{args.calib}]"] = continuation_perplexity(model, wins, P, args.active, args.structure, fixed,
                                                                   per_prompt=False)["ppl"]
        results[name] = row
        print(f"  {name:10s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    if args.json:
        _write_json(args.json, json.dumps({"model": args.model, "seqlen": seqlen, "prompt_len": P,
                                               "active": args.active, "structure": args.structure,
                                               "results": results}, indent=1))
    return 0


def _eval_tasks(args) -> int:
    from .eval.harness import run_lm_eval
    from .loading import load_tokenizer

    model = _load_model(args.model, args.dtype, args.device)
    tokenizer = load_tokenizer(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    pruning = None
    if args.testtime:
        from .serve.engine import Pruning

        pruning = Pruning(active=args.active, structure=args.structure, experts=args.experts)
    say(f"lm-eval on {args.model} (in memory): {', '.join(tasks)}" + (f", limit {args.limit}" if args.limit else "")
        + ("" if pruning is None else f"; every request pruned for itself ({pruning.kind}), as `mumoe serve` does"))
    res = run_lm_eval(model, tokenizer, tasks, batch_size=args.batch_size, limit=args.limit, pruning=pruning)
    for task, metrics in res.items():
        print(f"  {task:28s} " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.json:
        _write_json(args.json, json.dumps({"model": args.model, "tasks": res}, indent=1))
        print(f"wrote {args.json}")
    return 0


def _check_generate_args(args) -> None:
    from .files import check_positive
    from .loading import check_model
    from .recipe import parse_structure

    check_positive(getattr(args, "max_new_tokens", None), "--max-new-tokens", 0)
    if getattr(args, "structure", None) is not None:
        parse_structure(args.structure)
    check_model(args.model)
    _check_device(args.device)


def _check_context(model_name: str, prompt_tokens: int, new_tokens: int) -> None:
    """The prompt and the tokens to generate must fit the model's context (max_position_embeddings)."""
    from .loading import check_model

    config = _model_config(check_model(model_name))
    if config is None:
        return
    ctx = getattr(config.get_text_config(), "max_position_embeddings", None)
    if ctx and prompt_tokens + new_tokens > ctx:
        raise MumoeError(f"this model's maximum context length is {ctx} tokens; the prompt has {prompt_tokens} and "
                         f"--max-new-tokens asks for {new_tokens} more ({prompt_tokens + new_tokens}): shorten the "
                         "prompt or lower --max-new-tokens")


def cmd_generate(args) -> int:
    import torch

    from .loading import load_tokenizer
    from .select.weights import check_active
    from .testtime import generate

    check_active(args.active)
    if not args.prompt.strip():
        raise MumoeError("empty prompt")
    _check_generate_args(args)
    tok = load_tokenizer(args.model)
    if tok is None:
        raise MumoeError(f"{args.model} has no tokenizer")
    ids = torch.tensor([tok(args.prompt, add_special_tokens=False)["input_ids"]])
    _check_context(args.model, ids.shape[1], args.max_new_tokens)  # as the server does, before the weights
    t_load = time.perf_counter()
    model = _load_model(args.model, args.dtype, args.device)
    say(f"loaded {args.model} in {time.perf_counter() - t_load:.1f}s; μ-MoE at ρ={args.active:g} "
        f"({args.structure}), {ids.shape[1]} prompt tokens, up to {args.max_new_tokens} new")
    with torch.no_grad():  # a plain dense prefill, timed for reference
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True)
        t_plain = time.perf_counter() - t0
    from transformers import TextStreamer

    print(args.prompt, end="", flush=True)  # then each new piece of text as it is decoded
    res = generate(model, ids, args.active, args.structure, max_new_tokens=args.max_new_tokens,
                   do_sample=False, pad_token_id=tok.eos_token_id,
                   streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    stats = res.statistics_seconds  # measured inside the hooks
    print(f"\n[μ-MoE] {ids.shape[1]} prompt tokens; active weights {res.active_weights:,}/{res.total_weights:,} "
          f"({res.active_weights / res.total_weights:.1%}, structure {args.structure}); dense prefill {t_plain:.3f}s, "
          f"statistics {stats:.3f}s + selection and {'compaction' if args.structure == 'column' else 'masking'} "
          f"{res.select_seconds:.3f}s "
          f"= {(stats + res.select_seconds) / t_plain:.0%} of the prefill")
    if res.read_weights is not None:
        print(f"[μ-MoE] compacted decoding reads {res.read_weights:,} weights ({res.read_weights / res.total_weights:.1%}): "
              f"MLP rows whose outputs the masked down projection drops are not computed")
    return 0


def _serve_defaults(args):
    from .serve import Pruning

    return Pruning(active=args.active, structure=args.structure, experts=args.experts, task=args.task)


def _check_experts_flag(args) -> None:
    """--experts K against the model's config (top_k <= K <= experts per layer), before any weight is read."""
    if getattr(args, "experts", None) is None:
        return
    from .loading import check_model
    from .models.base import config_experts

    config = _model_config(check_model(args.model))
    if config is None:
        return  # not readable without loading: the engine checks it after the load
    E, top_k = config_experts(config)
    if E is None:
        raise MumoeError(f"--experts needs an MoE model; {args.model} has no routed experts")
    if not (top_k or 1) <= args.experts <= E:
        raise MumoeError(f"--experts must be between top_k={top_k} and the expert count {E}, got {args.experts}")


def _check_listen(host: str, port: int) -> None:
    """The address can be listened on (before the model is loaded): in use, or not this machine's -> one line."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MumoeError(f"--host {host}: {e.strerror}") from e
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise MumoeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def cmd_serve(args) -> int:
    """Check everything cheap, load once, then serve until SIGTERM / Ctrl-C (in-flight requests finish)."""
    from .files import check_positive
    from .serve import require_extra

    from .select.weights import check_active

    require_extra()
    check_active(args.active)
    check_positive(args.experts, "--experts", 1)
    check_positive(args.max_queue, "--max-queue", 1)
    check_positive(args.max_body_mb, "--max-body-mb", 0.001, integer=False)
    check_positive(args.max_task_models, "--max-task-models", 1)
    if args.timeout <= 0:
        raise MumoeError(f"--timeout must be positive, got {args.timeout}")
    if not 0 < args.port < 65536:
        raise MumoeError(f"--port must be in 1..65535, got {args.port}")
    _check_generate_args(args)
    _check_experts_flag(args)
    _check_listen(args.host, args.port)
    if args.taer_only:
        if not args.library:
            raise MumoeError("--taer-only needs --library LIB (a task library from `mumoe taer build`)")
        if args.active < 1 or args.experts is not None:
            raise MumoeError("--taer-only serves task requests only: drop --active / --experts")
        args.task = args.task or "auto"
    if args.task is not None and not args.library:
        raise MumoeError("--task needs --library LIB (a task library from `mumoe taer build`)")
    if sum(x for x in (args.active < 1, args.experts is not None, args.task is not None)) > 1:
        raise MumoeError("choose one default pruning: --active, --experts or --task")
    template = None
    if args.chat_template:
        from .files import read_utf8

        template = read_utf8(args.chat_template)
    library = None
    if args.library:
        from .retrieval import TaskLibrary
        from .retrieval.partial import check_library

        if _source_dir(args.model) is None:
            raise MumoeError("--library needs MODEL to be a local checkpoint folder (task models are read from its "
                             "safetensors files)")
        library = TaskLibrary.load(args.library)
        check_library(_source_dir(args.model), library)
    import uvicorn

    from .loading import load_tokenizer
    from .serve import Engine, ServerConfig, create_app

    tok = load_tokenizer(args.model)
    if tok is None:
        raise MumoeError(f"{args.model} has no tokenizer; mumoe serve needs one")
    t0 = time.perf_counter()
    if args.taer_only:  # the layers up to the first MoE router: enough to match; task models load on demand
        from .observe.runner import resolve_device
        from .retrieval.partial import load_matcher

        model = load_matcher(args.model, library, args.dtype or "auto").to(resolve_device(args.device or "cpu"))
    else:
        model = _load_model(args.model, args.dtype, args.device)
    name = args.served_model_name or args.model
    engine = Engine(model, tok, name, _serve_defaults(args), library, _source_dir(args.model), args.max_task_models,
                    template, taer_only=args.taer_only)
    d = engine.defaults
    mode = {"dense": "dense", "mu-moe": f"μ-MoE ρ={d.active:g} ({d.structure})", "experts": f"{d.experts} experts "
            "per layer per prompt", "task": f"TAER task {d.task}"}[d.kind]
    say(f"loaded {'the TAER matcher of ' if args.taer_only else ''}{args.model} ({engine.total_weights:,} weights) in "
        f"{time.perf_counter() - t0:.1f}s; default pruning: {mode}"
        + (f"; task library {args.library} ({len(library.tasks)} tasks)" if library else ""))
    app = create_app(engine, ServerConfig(max_queue=args.max_queue, timeout=args.timeout,
                                                max_body_bytes=int(args.max_body_mb * 2**20)), worker_thread=False)
    print(f"serving '{name}' on http://{args.host}:{args.port}/v1 (OpenAI-compatible; Ctrl-C or SIGTERM stops "
          "after the requests in flight)", flush=True)
    import signal
    import threading

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning" if SETTINGS.quiet else "info",
                            access_log=not SETTINGS.quiet, timeout_graceful_shutdown=args.timeout)
    server = uvicorn.Server(config)
    # HTTP in a thread, the model on the main thread (torch runs faster there). SIGTERM / Ctrl-C: uvicorn stops
    # listening and waits for the requests in flight, which the worker below keeps decoding; a second one forces.
    def stop(signum, frame):
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    http = threading.Thread(target=server.run, name="mumoe-http", daemon=True)
    try:
        http.start()
        app.state.worker.run(alive=http.is_alive)
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise MumoeError(f"could not listen on {args.host}:{args.port} (in use, or not an address of this machine)")
    say("mumoe serve: stopped")
    return 0


def cmd_demo(args) -> int:
    from .apply.export import check_output_dir
    from .eval.demo import run_demo

    check_output_dir(args.out, True)
    run_demo(args.out, args.eval_windows, args.calib_windows)
    return 0


def cmd_report(args) -> int:
    from .eval.report import read_rows, write_report
    from .files import check_writable

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise MumoeError(f"--out {args.out} is a file; give a folder")
    check_writable(args.out)
    rows = read_rows(args.runs)
    md = write_report(rows, Path(args.out), args.title)
    print(md.read_text().split("![")[0].strip())
    print(f"\nwrote {md} and {Path(args.out) / 'ppl_vs_ratio.png'}")
    return 0


def _method_names() -> list[str]:
    from .criteria import METHODS

    return [f"{m.name}" for m in METHODS.values()]


def _local_checkpoint(model: str) -> bool:
    from .drivers.choose import local_checkpoint

    return local_checkpoint(model)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one `mumoe: error:` line of every other bad input."""

    def error(self, message: str):
        sys.stderr.write(f"mumoe: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mumoe", description="Prune Mixture-of-Experts language models without "
                                "retraining: expert, atom and weight grain; offline, per task, per prompt.")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--verbose", action="store_true", help="also show the libraries' own warnings (transformers' "
                   "are silenced by default: they are about its internals, not about what you asked)")
    p.add_argument("--quiet", action="store_true", help="print only the result (the 'wrote ...' line, the table, "
                   "the generated text) and errors: no stage lines, no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp, model_default="default"):
        sp.add_argument("model", nargs="?", default=model_default, help=MODEL_HELP)
        sp.add_argument("--dtype", default=None if model_default is None else "auto",
                        choices=["auto", "fp32", "bf16", "fp16"],
                        help="dtype the model is loaded and run in (default auto: the checkpoint's own, except fp32 "
                        "on the CPU for a bf16/fp16 checkpoint); exports are written in the checkpoint's dtype "
                        "unless --dtype is given. Statistics are accumulated in fp32/fp64 whatever it is")
        sp.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or auto (cuda when available): "
                        "where the model runs")
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the modelling / tokenizer code the checkpoint ships (off by "
                        "default; mumoe reads its own exports without it)")

    sp = sub.add_parser("info", help="architecture, layers, experts, top_k and parameter counts",
                        description="Print architecture, MoE layers, experts, top_k and parameter counts "
                        "(total / active per token / routed-expert share).")
    common(sp)
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("prune", help="prune experts, atoms or weights and export an HF checkpoint + pruning.json",
                        description="Score, select and apply one method at one ratio, then export atomically. The "
                        "run is recorded as a recipe in pruning.json: `mumoe prune --recipe OUT/pruning.json --out "
                        "DIR` replays it exactly. Everything is validated before the model is loaded.")
    common(sp, model_default=None)
    sp.add_argument("--method", help="scoring method: " + ", ".join(_method_names()))
    sp.add_argument("--ratio", type=float, help="fraction removed, in [0, 1): of the routed experts of every layer "
                    "(expert methods), of the atoms (HEAPr), or of the weights (wanda, magnitude)")
    sp.add_argument("--recipe", help="replay a recorded run: a pruning.json (or its folder) or a recipe JSON; "
                    "MODEL defaults to the model it names")
    sp.add_argument("--then", action="append", metavar="METHOD:RATIO[:OPTION=VALUE...]",
                    help="a later stage, run after --method on the model it left with the same calibration "
                    "(repeatable, in order): e.g. --method reap --ratio 0.2 --then wanda:0.5 removes 20%% of the "
                    "experts, then half of the remaining weights; options of that stage's grain as "
                    "wanda:0.5:structure=2:4 or heapr:0.25:form=global")
    sp.add_argument("--budget", choices=["uniform", "global"],
                    help="expert methods: uniform = round(ratio*E) dropped in every layer (a standard checkpoint every engine reads, "
                    "default); global = one ranking over all layers (scores normalized per layer, floor of top_k), "
                    "exported for mumoe.load")
    sp.add_argument("--order", choices=["one-shot", "progressive"],
                    help="expert methods and wanda: one-shot = every layer scored on the unpruned model (default); "
                    "progressive = layer l scored after layers < l are pruned (llm-compressor's REAP order; the "
                    "Wanda authors' order, layer-sequential only)")
    sp.add_argument("--form", choices=["uniform", "global"],
                    help="atom methods: uniform = same width for every expert (a standard checkpoint, default); "
                    "global = HEAPr's one ranking, per-expert widths (mumoe.load, or transformers with "
                    "trust_remote_code=True)")
    sp.add_argument("--scope", choices=["global", "layer"],
                    help="atom methods with --form global: rank over all layers (default) or per layer")
    sp.add_argument("--width-multiple", type=int, metavar="N",
                    help="atom methods, uniform form: kept expert widths are multiples of N (default 64, what GPU "
                    "kernels tile by; 256 for llama.cpp's Q4_K/Q5_K/Q6_K, whose blocks span 256 values of a row)")
    sp.add_argument("--structure",
                    help="weight methods (wanda): row (unstructured per row, default), N:M (e.g. 2:4, then --ratio "
                    "is 1 - N/M) or column")
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

    sp = sub.add_parser("compare", help="score several methods from ONE calibration pass, apply and evaluate each",
                        description="Every method's statistics come from a single calibration pass (forward, plus "
                        "backward when HEAPr is among them); each method is then applied to a copy of the model and, "
                        "with --eval, scored by perplexity. Expert and atom methods; one-shot scoring.")
    common(sp)
    sp.add_argument("--methods", required=True, help="comma-separated methods, e.g. reap,ean,frequency,peu,heapr")
    sp.add_argument("--ratio", type=float, action="append",
                    help="fraction removed (experts per layer, or atoms); repeat for several (default 0.5)")
    sp.add_argument("--calib", action="append", help="calibration sources as for prune (default: domain)")
    sp.add_argument("--nsamples", type=int, help="calibration windows in all (default 128)")
    sp.add_argument("--seqlen", type=int, help="calibration window length (default 512)")
    sp.add_argument("--seed", type=int, help="random windows / random scores seed (default: first windows)")
    sp.add_argument("--batch-size", type=int, help="calibration windows per forward (default 8)")
    sp.add_argument("--form", choices=["uniform", "global"], help="atom methods: uniform (default) or global")
    sp.add_argument("--scope", choices=["global", "layer"], help="atom methods, global form: ranking scope")
    sp.add_argument("--eval", help="evaluate each pruned copy: 'domain' (bundled eval splits) or a .txt file/folder")
    sp.add_argument("--eval-windows", type=int, default=12, help="eval windows per text (default 12)")
    sp.add_argument("--eval-seqlen", type=int, default=512, help="eval window length (default 512)")
    sp.add_argument("--out", help="write results.json (+ report.md and ppl_vs_ratio.png with --eval) here")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("eval", help="paper-exact perplexity (non-overlapping windows)",
                        description="Perplexity = exp(mean NLL over every predicted token) of the text cut into "
                        "non-overlapping windows of --seqlen tokens (tokenized once, remainder dropped).")
    common(sp)
    sp.add_argument("--ppl", help="text to score: a .txt file, a folder of .txt files, or 'domain' for every "
                    "bundled eval split (prose, docs, code, kernel)")
    sp.add_argument("--seqlen", type=int, default=None, help="window length (default min(2048, model context))")
    sp.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    sp.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    sp.add_argument("--tasks", help="lm-eval tasks, comma-separated ('local' = the offline mumoe_nextline_<domain> "
                    "tasks built from the bundled eval splits); needs the eval extra")
    sp.add_argument("--limit", type=int, default=None, help="lm-eval: documents per task (default: all; "
                    "with --write-tasks: documents written per local task, default 100)")
    sp.add_argument("--write-tasks", metavar="DIR", help="write the local offline tasks (YAML + JSONL) to DIR for "
                    "plain `lm_eval --include_path DIR` and print that command; loads no model")
    sp.add_argument("--testtime", action="store_true",
                    help="μ-MoE protocol: prompt = first --prompt-len tokens of each window (dense prefill), the "
                    "continuation is scored with masks from that prompt; compared with dense (and offline Wanda "
                    "calibrated on --calib)")
    sp.add_argument("--active", type=float, default=0.5, help="--testtime: active-weight ratio rho in (0, 1] "
                    "(default 0.5)")
    sp.add_argument("--prompt-len", type=int, default=None, help="--testtime: prompt tokens (default seqlen/2)")
    sp.add_argument("--structure", default="row", help="--testtime: row (default), N:M or column")
    sp.add_argument("--calib", help="--testtime: calibration text for the offline Wanda baseline (with --experts: for "
                    "the offline TCESS/REAP baselines, default 'domain')")
    sp.add_argument("--experts", type=int, help="--testtime at the expert grain: keep K experts per layer chosen from "
                    "each prompt's own routing (TCESS), against dense, offline TCESS/REAP at the same K and TAER "
                    "(--library); with --tasks: every lm-eval request pruned to its own K experts")
    sp.add_argument("--calib-windows", type=int, default=32, help="--testtime --experts: calibration windows for the "
                    "offline baselines (default 32)")
    sp.add_argument("--library", help="--testtime --experts: a TAER task library to compare with")
    sp.add_argument("--json", help="also write the result as JSON to this path (refused if it exists, unless "
                    "--overwrite)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("generate", help="μ-MoE: prune per prompt from its own activations, then generate",
                        description="Dense prefill of the prompt collects per-input-feature norms of every linear "
                        "(per expert for routed experts); Wanda masks at active ratio rho are built for this prompt "
                        "and the continuation is decoded with them.")
    common(sp)
    sp.add_argument("--prompt", required=True, help="the prompt text; its own prefill is the calibration")
    sp.add_argument("--active", type=float, default=0.5, help="active-weight ratio rho in (0, 1] (default 0.5)")
    sp.add_argument("--structure", default="row", help="row (default), N:M (e.g. 2:4) or column (compacted "
                    "decode: whole input columns dropped; lossy on a model as narrow as the bundled one)")
    sp.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate, greedy (default 48)")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("serve", help="OpenAI-compatible HTTP server; every request pruned for itself",
                        description="Serve one model over an OpenAI-compatible API (/v1/completions, "
                        "/v1/chat/completions, /v1/models, /health, /metrics). Each request is pruned for itself: the "
                        "server defaults below, overridden per request by a \"mumoe\" object in the body, e.g. "
                        "{\"active\": 0.5, \"structure\": \"column\"} (μ-MoE from the prompt's own prefill), "
                        "{\"experts\": 8} (the 8 experts per layer the prompt routes to most) or {\"task\": \"auto\"} "
                        "(TAER, with --library). One request decodes at a time; needs `pip install 'mumoe[serve]'`.")
    common(sp)
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sp.add_argument("--served-model-name", help="the name clients pass as \"model\" (default: the MODEL argument)")
    sp.add_argument("--active", type=float, default=1.0, help="default μ-MoE active-weight ratio rho in (0, 1] "
                    "(default 1 = dense)")
    sp.add_argument("--structure", default="row", help="default μ-MoE structure: row (default), N:M or column")
    sp.add_argument("--experts", type=int, help="default per-prompt expert pruning: keep this many experts per layer "
                    "(the prompt's own TCESS; default off)")
    sp.add_argument("--library", help="TAER task library (from `mumoe taer build`): enables \"task\" requests")
    sp.add_argument("--task", help="default TAER task: 'auto' (match each prompt) or a task name (needs --library; "
                    "default off)")
    sp.add_argument("--taer-only", action="store_true", help="with --library: never load the full model — only the "
                    "layers up to the first MoE router (to match prompts) and each requested task's experts; every "
                    "request is a TAER request (default --task auto)")
    sp.add_argument("--max-task-models", type=int, default=2, help="TAER task models kept in memory, least recently "
                    "used dropped first (default 2)")
    sp.add_argument("--max-queue", type=int, default=16, help="requests waiting behind the one decoding; more get "
                    "HTTP 503 (default 16)")
    sp.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MiB; larger ones get HTTP "
                    "413 before they are read (default 8)")
    sp.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take from arrival to its last "
                    "token, queueing included; later: HTTP 504 (default 600)")
    sp.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template for /v1/chat/completions when the "
                    "tokenizer has none (default: the tokenizer's own)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("demo", help="the tour on the bundled model (start here)",
                        description="Dense vs expert pruning at 25/50/75% (AIMER, frequency, REAP, PEU), HEAPr at "
                        "10/25/50% of atoms (the curves of one calibration pass), μ-MoE vs offline Wanda under domain shift, TAER matching; writes a folder with "
                        "report.md, plots and JSON.")
    sp.add_argument("--out", default="mumoe-demo", help="output folder (replaced if it exists; default mumoe-demo)")
    sp.add_argument("--eval-windows", type=int, default=8, help="eval windows of 512 tokens per domain (default 8)")
    sp.add_argument("--calib-windows", type=int, default=8, help="calibration windows per domain (default 8)")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("report", help="evaluation JSONs -> markdown table + PNG plots",
                        description="Read result JSONs (files or folders with a 'rows' list) and write report.md "
                        "and ppl_vs_ratio.png (one panel per domain, one line per method).")
    sp.add_argument("runs", nargs="+", help="result JSON files or folders")
    sp.add_argument("--out", default="mumoe-report", help="output folder (default mumoe-report)")
    sp.add_argument("--title", default="mumoe report", help="title of report.md and the plot (default: mumoe "
                    "report)")
    sp.set_defaults(func=cmd_report)

    taer = sub.add_parser("taer", help="PreMoe TAER: task library, matching, partial loading, serving",
                          description="Build a library of per-task expert patterns, match prompts to tasks on the "
                          "first MoE router's logits, and serve each query with only its task's experts loaded.")
    tsub = taer.add_subparsers(dest="taer_command", metavar="ACTION")
    sp = tsub.add_parser("build", help="build a task library",
                         description="Per task: PEP scores (TCESS or PEU) per layer, top-M experts, retrieval key.")
    common(sp)
    sp.add_argument("--task", action="append", required=True,
                    help="NAME=PATH (a .txt file or folder), repeatable; 'domain' adds every bundled calib split")
    sp.add_argument("--keep", type=int, required=True, help="experts kept per layer (M >= top_k)")
    sp.add_argument("--score", default="tcess", choices=["tcess", "peu"], help="PEP score (default tcess)")
    sp.add_argument("--key", default="first", choices=["first", "all"],
                    help="retrieval key from the first MoE layer (default; matching stops there) or all MoE "
                         "layers concatenated")
    sp.add_argument("--key-stat", default="logit", choices=["logit", "prob", "tcess"],
                    help="per-token router statistic averaged into the key: logits (default), routing "
                         "probabilities, or PreMoe's TCESS vector (the paper's key)")
    sp.add_argument("--key-space", default="whitened", choices=["whitened", "raw"],
                    help="L2 after whitening by the within-task covariance of 64-token chunk keys (default; a "
                         "linear discriminant) or plain L2 (the paper's matching)")
    sp.add_argument("--nsamples", type=int, default=64, help="windows per task (default 64)")
    sp.add_argument("--seqlen", type=int, default=512, help="window length (default 512)")
    sp.add_argument("--layerwise", action="store_true",
                    help="run the tasks' windows through one decoder layer at a time, read from a local checkpoint's "
                    "safetensors files (the model is never loaded whole; same library)")
    sp.add_argument("--out", required=True, help="library directory")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing library directory")
    sp.set_defaults(func=cmd_taer_build)
    for name, fn, helptext in (("match", cmd_taer_match, "match a prompt to the nearest task"),
                               ("generate", cmd_taer_generate, "match, load the task's experts only, generate")):
        sp = tsub.add_parser(name, help=helptext, description=helptext)
        common(sp)
        sp.add_argument("library", help="task library directory (from `mumoe taer build`)")
        sp.add_argument("--prompt", required=True, help="the query text")
        if name == "generate":
            sp.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate, greedy (default 48)")
        sp.set_defaults(func=fn)
    taer.set_defaults(func=lambda a: (taer.print_help(), 0)[1])
    _add_verbose(p)
    return p


def _version() -> str:
    from .version import __version__

    return f"mumoe {__version__}"


class Terminated(BaseException):
    """SIGTERM (a scheduler stopping the job): unwinds like Ctrl-C, so temp folders are removed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """--verbose on every (sub)command too (SUPPRESS: a subcommand never resets the top-level flag)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                                help="also show the libraries' own warnings (default: transformers' are silenced)")
                sp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                                help="print only the result and errors: no stage lines, no progress bars")
                _add_verbose(sp)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verbose", False):  # read by transformers when it is first imported
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    SETTINGS.quiet = bool(getattr(args, "quiet", False))
    SETTINGS.trust_remote_code = bool(getattr(args, "trust_remote_code", False))
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except MumoeError as e:
        print(f"mumoe: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not the input: disk full, read-only or vanished files
        from .errors import os_message

        print(f"mumoe: error: {os_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mumoe: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("mumoe: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
