"""`mumoe eval`: perplexity, the test-time protocol, lm-eval tasks."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MumoeError
from ..settings import SETTINGS
from .common import check_device, load_model, model_config, write_json, model_args, say
from .serve import _check_experts_flag
from .skipping import add_skip_args, check_skip_args, prepare

def _eval_texts(spec: str) -> dict[str, str]:
    """--eval/--ppl: 'domain' = every bundled eval split; else one .txt file or folder. -> {name: text}"""
    from ..observe.calib import read_text
    from ..paths import DATA

    if spec == "domain":
        texts = {p.parent.name: p for p in sorted(DATA.glob("*/eval.txt"))}
        if not texts:
            raise MumoeError(f"no bundled eval splits under {DATA}")
    else:
        texts = {Path(spec).stem: spec}
    return {name: read_text(path) for name, path in texts.items()}


def _write_tasks(args) -> int:
    """eval --write-tasks DIR: the local offline tasks for plain lm_eval, and the command that runs them."""
    from ..eval.harness import export_tasks

    if args.tasks or args.ppl:
        raise MumoeError("--write-tasks only writes the task files; drop --tasks / --ppl (or --write-tasks)")
    names = export_tasks(args.write_tasks, args.limit or 100)
    print(f"wrote {len(names)} lm-eval tasks to {args.write_tasks}: {', '.join(names)}")
    print(f"  lm_eval --model hf --model_args pretrained=PATH --include_path {Path(args.write_tasks).resolve()} "
          f"--tasks {','.join(names)}")
    return 0


def _check_eval_args(args) -> None:
    """eval's options, the --json target and the device, before any text or weight is read."""
    from ..files import check_new_file, check_positive

    check_positive(args.seqlen, "--seqlen", 2)
    check_positive(args.batch_size, "--batch-size")
    check_positive(args.max_windows, "--max-windows")
    check_positive(args.limit, "--limit")
    check_positive(args.prompt_len, "--prompt-len")
    if args.testtime:
        from ..recipe import parse_structure
        from ..select.weights import check_active

        check_active(args.active)
        parse_structure(args.structure)
        check_positive(args.calib_windows, "--calib-windows")
        _check_experts_flag(args)
        if args.library and args.experts is None:
            raise MumoeError("--library is compared at the expert grain: add --experts K")
        if args.calib:
            from ..observe.calib import check_sources

            check_sources([args.calib])
    if args.skip is not None and args.testtime:
        raise MumoeError("--skip is its own test-time mode; drop --testtime")
    check_skip_args(args)
    if args.json:
        check_new_file(args.json, args.overwrite, "--json")
    check_device(args.device)


def cmd_eval(args) -> int:
    from ..eval.perplexity import perplexity
    from ..loading import check_model, load_tokenizer

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
    config = model_config(check_model(args.model))
    ctx = (getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None) or 2048
    seqlen = args.seqlen or min(2048, ctx)
    if seqlen > ctx:
        raise MumoeError(f"seqlen {seqlen} exceeds the model's context ({ctx})")
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise MumoeError(f"{args.model} has no tokenizer; perplexity on text needs one")
    model = load_model(args.model, args.dtype, args.device)
    if args.testtime:
        return _eval_testtime(args, model, tokenizer, texts, seqlen)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    from ..testtime.skip import skipping_with

    setup = prepare(args, model, tokenizer, seqlen, args.batch_size)
    say(f"perplexity with seqlen={seqlen} (non-overlapping windows, dtype {dtype}) of {args.model}"
        + ("" if setup is None else "; " + setup.line))
    results = {}
    for name, text in texts.items():
        with skipping_with(model, setup) as count:
            res = perplexity(model, tokenizer, text, seqlen, args.batch_size, args.max_windows)
        if count is not None:
            res["skipped"] = round(count.share(), 6)
        results[name] = res
        print(f"  {name:10s} ppl {res['ppl']:9.3f}  ({res['tokens']:,} predicted tokens, {res['windows']} windows, "
              f"{res['seconds']:.1f}s)" + (f"; {count.share():.1%} of expert calls skipped" if count else ""))
    if args.json:
        payload = {"model": args.model, "dtype": dtype, "seqlen": seqlen, "ppl_source": args.ppl,
                   "results": results}
        write_json(args.json, json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


def _eval_testtime_experts(args, model, tokenizer, texts: dict, seqlen: int) -> int:
    """Per-prompt expert pruning (K experts per layer from each prompt's own TCESS) against dense, offline TCESS
    and REAP at the same K (calibrated on --calib, default the bundled domains' calibration splits) and TAER
    (--library), all in the test-time protocol."""
    from ..api import calibration
    from ..models import moe_adapter_for
    from ..observe.calib import tokenize, windows
    from ..recipe import Recipe
    from ..testtime.evaluate import expert_continuation_perplexity, offline_expert_keeps, taer_chooser
    from ..testtime.experts import check_experts, prompt_keep

    K = check_experts(model, args.experts)
    P = args.prompt_len or seqlen // 2
    lib = None
    if args.library:
        from ..retrieval import TaskLibrary

        lib = TaskLibrary.load(args.library)
        lib.check_model(model)
    calib = args.calib or "domain"
    recipe = Recipe.build("reap", 0.0, calib=(calib,), nsamples=args.calib_windows, seqlen=seqlen)
    wins_c, groups, _ = calibration(recipe, None, tokenizer)
    say(f"offline baselines: TCESS and REAP scores from {wins_c.shape[0]} windows of {calib}")
    fixed = offline_expert_keeps(model, ["tcess", "reap"], wins_c, groups, K, progress=not SETTINGS.quiet)
    layers = moe_adapter_for(model).moe_layers()
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
        write_json(args.json, json.dumps({"model": args.model, "seqlen": seqlen, "prompt_len": P, "experts": K,
                                               "calib": calib, "library": args.library, "results": results},
                                              indent=1))
        print(f"wrote {args.json}")
    return 0


def _eval_testtime(args, model, tokenizer, texts: dict, seqlen: int) -> int:
    if args.experts is not None:
        return _eval_testtime_experts(args, model, tokenizer, texts, seqlen)
    from ..observe.calib import calibration_windows, tokenize, windows
    from ..select.weights import check_active
    from ..testtime import continuation_perplexity, offline_masks

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
        write_json(args.json, json.dumps({"model": args.model, "seqlen": seqlen, "prompt_len": P,
                                               "active": args.active, "structure": args.structure,
                                               "results": results}, indent=1))
    return 0


def _eval_tasks(args) -> int:
    from ..eval.harness import run_lm_eval
    from ..loading import load_tokenizer

    model = load_model(args.model, args.dtype, args.device)
    tokenizer = load_tokenizer(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    pruning = None
    if args.testtime:
        from ..serve.engine import Pruning

        pruning = Pruning(active=args.active, structure=args.structure, experts=args.experts)
    say(f"lm-eval on {args.model} (in memory): {', '.join(tasks)}" + (f", limit {args.limit}" if args.limit else "")
        + ("" if pruning is None else f"; every request pruned for itself ({pruning.kind}), as `mumoe serve` does"))
    res = run_lm_eval(model, tokenizer, tasks, batch_size=args.batch_size, limit=args.limit, pruning=pruning)
    for task, metrics in res.items():
        print(f"  {task:28s} " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.json:
        write_json(args.json, json.dumps({"model": args.model, "tasks": res}, indent=1))
        print(f"wrote {args.json}")
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("eval", help="paper-exact perplexity (non-overlapping windows)",
                        description="Perplexity = exp(mean NLL over every predicted token) of the text cut into "
                        "non-overlapping windows of --seqlen tokens (tokenized once, remainder dropped).")
    model_args(sp)
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
                    "the offline TCESS/REAP baselines, default 'domain'); --skip: for the thresholds (default 'domain')")
    sp.add_argument("--experts", type=int, help="--testtime at the expert grain: keep K experts per layer chosen from "
                    "each prompt's own routing (TCESS), against dense, offline TCESS/REAP at the same K and TAER "
                    "(--library); with --tasks: every lm-eval request pruned to its own K experts")
    sp.add_argument("--calib-windows", type=int, default=32, help="--testtime --experts: calibration windows for the "
                    "offline baselines; --skip: for the thresholds (default 32)")
    sp.add_argument("--library", help="--testtime --experts: a TAER task library to compare with")
    add_skip_args(sp, calib=False)
    sp.add_argument("--json", help="also write the result as JSON to this path (refused if it exists, unless "
                    "--overwrite)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    sp.set_defaults(func=cmd_eval)
