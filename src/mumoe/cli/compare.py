"""`mumoe compare`: several methods from one calibration pass, each applied and evaluated."""

from __future__ import annotations

import json
import time

from ..errors import MumoeError
from ..settings import SETTINGS
from .common import check_device, load_model, source_dir, model_args, say
from .evaluate import _eval_texts

def cmd_compare(args) -> int:
    from .. import api
    from ..criteria import get_method
    from ..eval.compare import compare, label, markdown, shares_pass
    from ..loading import check_model, load_tokenizer
    from ..observe.calib import check_sources, tokenize, windows
    from ..recipe import Recipe

    from ..files import check_positive

    from ..recipe import parse_method

    specs = [[parse_method(p.strip()) for p in m.split("+")] for m in args.methods.split(",") if m.strip()]
    methods = [name for spec in specs for name, _ in spec]
    if not methods:
        raise MumoeError("--methods names no method (e.g. --methods reap,ean,frequency)")
    for value, flag, low in ((args.eval_windows, "--eval-windows", 1), (args.eval_seqlen, "--eval-seqlen", 2),
                             (args.batch_size, "--batch-size", 1)):
        check_positive(value, flag, low)
    check_device(args.device)
    ratios = args.ratio or [0.5]
    opts = {k: v for k, v in (("nsamples", args.nsamples), ("seqlen", args.seqlen), ("seed", args.seed),
                              ("form", args.form), ("scope", args.scope)) if v is not None}
    opts["batch_size"] = args.batch_size or 8  # one pass: one batch size for every method
    def recipe(spec, r):
        """One row: a method at ratio r, or stages joined by '+' under one budget (r of the routed-expert
        weights, split between an expert stage and a weight stage: `Recipe.split`)."""
        calib = (args.calib or ["domain"]) if any(get_method(m).needs_calib for m, _ in spec) else None
        (m, own), later = spec[0], spec[1:]
        rec = Recipe.build(m, 0.0 if later else r, calib=calib, dtype=args.dtype or "auto",
                           device=args.device or "cpu", **{**opts, **own})
        for name, options in later:
            rec = rec.then(name, 0.0, **options)
        return rec.split(r, args.expert_share) if later else rec

    if args.expert_share is not None and not any(len(spec) > 1 for spec in specs):
        raise MumoeError("--expert-share splits the budget of a two-stage row (e.g. --methods stun+wanda)")
    recipes = [recipe(spec, r) for spec in specs for r in ratios]
    from ..eval.compare import check_recipes

    check_recipes(recipes)
    cal = next((r for r in recipes if r.calib.sources), None)
    if cal is not None:
        check_sources(cal.calib.sources, read=False)
    if args.out:
        from ..apply.export import check_output_dir

        check_output_dir(args.out, args.overwrite, source_dir(check_model(args.model)))
        from ..files import SMALL_FILE, check_free_space

        check_free_space(args.out, SMALL_FILE, "tables and plots of a few KiB", thing="the report")
    check_model(args.model)
    eval_texts = _eval_texts(args.eval) if args.eval else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.tasks is not None and not tasks:
        raise MumoeError("--tasks names no task (e.g. --tasks local)")
    if tasks:
        try:
            import lm_eval  # noqa: F401  (before the model loads)
        except ImportError:
            raise MumoeError("--tasks needs lm-eval: pip install -e '.[eval]' (or pip install lm-eval)") from None
    t0 = time.perf_counter()
    tok = load_tokenizer(args.model)  # calibration windows cut (each text read once) before the weights load
    if tasks and tok is None:
        raise MumoeError(f"{args.model} has no tokenizer; --tasks needs one")
    wins, groups, info = api.calibration(cal, None, tok) if cal is not None else (None, None, {})
    model = load_model(args.model, args.dtype, args.device)
    evals = None
    if eval_texts:
        if tok is None:
            raise MumoeError(f"{args.model} has no tokenizer; --eval on text needs one")
        evals = {d: windows(tokenize(tok, text), args.eval_seqlen, args.eval_windows) for d, text in eval_texts.items()}
    say(f"compare {', '.join(m.strip() for m in args.methods.split(',') if m.strip())} at {', '.join(f'{r:.0%}' for r in ratios)} on {args.model}: one calibration "
          f"pass" + (f" over {info['nsamples']} windows x {info['seqlen']} tokens ({info['source']})" if info else "")
          + (f"; eval {args.eval_windows} windows x {args.eval_seqlen} tokens of {', '.join(evals)}" if evals else "")
          + (f"; lm-eval tasks {', '.join(tasks)}" if tasks else ""))
    res = compare(model, recipes, wins, groups, evals, calib_label=info.get("source", "-"), progress=not SETTINGS.quiet,
                  log=None, tasks=tasks, tokenizer=tok)
    print(markdown(res))
    own = sorted({label(r) for r in recipes if not shares_pass(r) or r.later})
    shared = {r.method for r in recipes if shares_pass(r)}
    say(f"\none calibration pass for {len(shared)} methods: {res.pass_seconds:.1f}s"
        + (f" ({', '.join(own)}: passes of their own)" if own else "")
        + f"; total {time.perf_counter() - t0:.1f}s")
    if args.out:
        from ..apply.export import atomic_output
        from ..eval.report import write_report

        payload = {"model": args.model, "calibration": info, "pass_seconds": round(res.pass_seconds, 3),
                   "recipes": [r.to_dict() for r in recipes], "rows": res.rows, "reports": res.reports}
        with atomic_output(args.out, args.overwrite) as tmp:
            (tmp / "results.json").write_text(json.dumps(payload, indent=1))
            if evals:
                write_report([r for r in res.rows if "ppl" in r], tmp, f"mumoe compare on {args.model}")
        print(f"wrote {args.out}/ (results.json" + (", report.md, ppl_vs_ratio.png)" if evals else ")"))
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("compare", help="score several methods from ONE calibration pass, apply and evaluate each",
                        description="Every method's statistics come from a single calibration pass (forward, plus "
                        "backward when HEAPr is among them); each method is then applied to a copy of the model and, "
                        "with --eval, scored by perplexity (and with --tasks, by lm-eval task accuracy). Expert, "
                        "atom and merge methods share the pass; a method in the progressive order (REAM's default; "
                        "ream:order=one-shot shares the pass), a weight method (wanda) and the second stage of a "
                        "two-stage row (stun+wanda: --ratio is then the share of routed-expert weights removed in "
                        "all, split as --expert-share says) calibrate in passes of their own.")
    model_args(sp)
    sp.add_argument("--methods", required=True, help="comma-separated methods, e.g. reap,ean,frequency,peu,heapr,wanda; "
                    "each may carry its own options as METHOD:OPTION=VALUE (hc-smoe:router=bound, "
                    "heapr:form=global, sub-moe:rank=64, ream:order=one-shot); an expert method then a weight "
                    "method joined by '+' is one two-stage row under one budget (stun+wanda:budget=owl)")
    sp.add_argument("--ratio", type=float, action="append",
                    help="fraction removed (experts per layer, atoms, weights; a two-stage row: routed-expert "
                    "weights in all); repeat for several (default 0.5)")
    sp.add_argument("--expert-share", type=float, metavar="S", help="two-stage rows (EXPERT+WEIGHT methods): the "
                    "expert stage's part of the budget (default 0.5, STUN's split)")
    sp.add_argument("--calib", action="append", help="calibration sources as for prune (default: domain)")
    sp.add_argument("--nsamples", type=int, help="calibration windows in all (default 128)")
    sp.add_argument("--seqlen", type=int, help="calibration window length (default 512)")
    sp.add_argument("--seed", type=int, help="random windows / random scores seed (default: first windows)")
    sp.add_argument("--batch-size", type=int, help="calibration windows per forward (default 8)")
    sp.add_argument("--form", choices=["uniform", "global"], help="atom methods: uniform or global (default: each method's own — uniform for HEAPr, global for CAMERA-P)")
    sp.add_argument("--scope", choices=["global", "layer"], help="atom methods, global form: ranking scope")
    sp.add_argument("--eval", help="evaluate each pruned copy: 'domain' (bundled eval splits) or a .txt file/folder")
    sp.add_argument("--eval-windows", type=int, default=12, help="eval windows per text (default 12)")
    sp.add_argument("--eval-seqlen", type=int, default=512, help="eval window length (default 512)")
    sp.add_argument("--tasks", help="also score each copy on lm-eval tasks (comma-separated; 'local' = the offline "
                    "next-line tasks on the bundled eval splits; needs the eval extra)")
    sp.add_argument("--out", help="write results.json (+ report.md and ppl_vs_ratio.png with --eval) here")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    sp.set_defaults(func=cmd_compare)
