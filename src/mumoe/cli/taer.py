"""`mumoe taer build|match|generate`: PreMoe task libraries."""

from __future__ import annotations

import time

from ..errors import MumoeError
from .common import check_device, dtype_of, load_model, model_config, source_dir, model_args, say
from .generate import _check_generate_args

def _check_library_args(args) -> None:
    """--keep against the model's experts and top_k, window options and device, before the model loads."""
    from ..files import check_positive
    from ..models.base import config_experts

    check_positive(args.nsamples, "--nsamples")
    check_positive(args.seqlen, "--seqlen", 2)
    config = model_config(args.model)
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
    check_device(args.device)


def _check_library_space(args) -> None:
    """A lower bound on a task library's size — one fp32 score per expert per MoE layer for each task — against
    the free space at --out, before the model is read."""
    from ..files import SMALL_FILE, check_free_space
    from ..models.base import config_experts

    config = model_config(args.model)
    E, _ = config_experts(config) if config is not None else (None, None)
    layers = getattr(config.get_text_config(), "num_hidden_layers", 1) if config is not None else 1
    need = SMALL_FILE + len(args.task) * (E or 1) * (layers or 1) * 4
    check_free_space(args.out, need, f"{len(args.task)} task(s) x {layers} layers x {E} experts of scores",
                     thing="the task library")


def cmd_taer_build(args) -> int:
    from ..apply.export import atomic_output, check_output_dir
    from ..grains.expert import check_expert_removal
    from ..loading import DATA, check_model, load_tokenizer
    from ..observe.calib import calibration_windows, read_text
    from ..retrieval import build_library

    check_output_dir(args.out, args.overwrite, source_dir(check_model(args.model)))
    _check_library_space(args)
    # a task model holds fewer experts: refused before the model is read where the family cannot lose experts
    # (JetMoE; DeepSeek-V4's hash layers are refused once its model is read)
    check_expert_removal(model_config(args.model))
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
        from ..loading import resolve
        from ..observe.layerwise import LayerwiseCheckpoint, is_layerwise_source
        from ..observe.runner import resolve_device

        if not is_layerwise_source(resolve(args.model)):
            raise MumoeError(f"--layerwise reads a local safetensors checkpoint folder; {args.model} is not one")
        model = LayerwiseCheckpoint(resolve(args.model), dtype_of(args.dtype, resolve(args.model), args.device),
                                    resolve_device(args.device or "cpu"))
    else:
        model = load_model(args.model, args.dtype, args.device)
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
    from ..retrieval import TaskServer

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


def add_parser(sub) -> None:
    taer = sub.add_parser("taer", help="PreMoe TAER: task library, matching, partial loading, serving",
                          description="Build a library of per-task expert patterns, match prompts to tasks on the "
                          "first MoE router's logits, and serve each query with only its task's experts loaded.")
    tsub = taer.add_subparsers(dest="taer_command", metavar="ACTION")
    sp = tsub.add_parser("build", help="build a task library",
                         description="Per task: PEP scores (TCESS or PEU) per layer, top-M experts, retrieval key.")
    model_args(sp)
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
        model_args(sp)
        sp.add_argument("library", help="task library directory (from `mumoe taer build`)")
        sp.add_argument("--prompt", required=True, help="the query text")
        if name == "generate":
            sp.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate, greedy (default 48)")
        sp.set_defaults(func=fn)
    taer.set_defaults(func=lambda a: (taer.print_help(), 0)[1])
