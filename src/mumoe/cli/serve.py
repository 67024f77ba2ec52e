"""`mumoe serve`: the OpenAI-compatible server."""

from __future__ import annotations

import time

from ..errors import MumoeError
from ..settings import SETTINGS
from .common import load_model, model_config, source_dir, model_args, say
from .generate import _check_generate_args
from .skipping import add_skip_args, check_skip_args

def _serve_defaults(args):
    from ..serve import Pruning

    return Pruning(active=args.active, structure=args.structure, experts=args.experts, task=args.task)


def _check_experts_flag(args) -> None:
    """--experts K against the model's config (top_k <= K <= experts per layer), before any weight is read."""
    if getattr(args, "experts", None) is None:
        return
    from ..loading import check_model
    from ..models.base import config_experts

    config = model_config(check_model(args.model))
    if config is None:
        return  # not readable without loading: the engine checks it after the load
    E, top_k = config_experts(config)
    if E is None:
        raise MumoeError(f"--experts needs an MoE model; {args.model} has no routed experts")
    if not (top_k or 1) <= args.experts <= E:
        raise MumoeError(f"--experts must be between top_k={top_k} and the expert count {E}, got {args.experts}")


def _int4_line(engine) -> str:
    """How much the int4 copies hold: "N MiB" (task models get theirs when they load)."""
    from ..apply.int4 import copy_bytes

    return "made as each task model loads" if engine.taer_only else f"{copy_bytes(engine.model) / 2**20:.0f} MiB"


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
    from ..files import check_positive
    from ..serve import require_extra

    from ..select.weights import check_active

    require_extra()
    check_active(args.active)
    check_positive(args.experts, "--experts", 1)
    check_positive(args.max_queue, "--max-queue", 1)
    check_positive(args.max_batch, "--max-batch", 1)
    check_positive(args.max_body_mb, "--max-body-mb", 0.001, integer=False)
    check_positive(args.max_task_models, "--max-task-models", 1)
    if args.timeout <= 0:
        raise MumoeError(f"--timeout must be positive, got {args.timeout}")
    if not 0 < args.port < 65536:
        raise MumoeError(f"--port must be in 1..65535, got {args.port}")
    _check_generate_args(args)
    check_skip_args(args)
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
    if args.int4:
        from ..observe.runner import resolve_device

        if resolve_device(args.device).type != "cpu":
            raise MumoeError("--int4 is a CPU decode path (torch's CPU int4 kernel): drop it or serve on --device cpu")
    if args.skip is not None and args.taer_only:
        raise MumoeError("--skip runs on the full model; a --taer-only server does not hold it")
    template = None
    if args.chat_template:
        from ..files import read_utf8

        template = read_utf8(args.chat_template)
    library = None
    if args.library:
        from ..retrieval import TaskLibrary
        from ..retrieval.partial import check_library

        if source_dir(args.model) is None:
            raise MumoeError("--library needs MODEL to be a local checkpoint folder (task models are read from its "
                             "safetensors files)")
        library = TaskLibrary.load(args.library)
        check_library(source_dir(args.model), library)
    import uvicorn

    from ..loading import load_tokenizer
    from ..serve import Engine, ServerConfig, create_app

    tok = load_tokenizer(args.model)
    if tok is None:
        raise MumoeError(f"{args.model} has no tokenizer; mumoe serve needs one")
    t0 = time.perf_counter()
    if args.taer_only:  # the layers up to the first MoE router: enough to match; task models load on demand
        from ..observe.runner import resolve_device
        from ..retrieval.partial import load_matcher

        model = load_matcher(args.model, library, args.dtype or "auto").to(resolve_device(args.device or "cpu"))
    else:
        model = load_model(args.model, args.dtype, args.device)
    name = args.served_model_name or args.model
    skip = None
    if args.skip is not None:
        from .skipping import prepare

        skip = prepare(args, model, tok, int(getattr(model.config, "max_position_embeddings", None) or 512), 8)
    engine = Engine(model, tok, name, _serve_defaults(args), library, source_dir(args.model), args.max_task_models,
                    template, taer_only=args.taer_only, skip=skip, int8=args.int8, int4=args.int4)
    d = engine.defaults
    mode = {"dense": "dense", "mu-moe": f"μ-MoE ρ={d.active:g} ({d.structure})", "experts": f"{d.experts} experts "
            "per layer per prompt", "task": f"TAER task {d.task}"}[d.kind]
    say(f"loaded {'the TAER matcher of ' if args.taer_only else ''}{args.model} ({engine.total_weights:,} weights) in "
        f"{time.perf_counter() - t0:.1f}s; default pruning: {mode}"
        + (f"; task library {args.library} ({len(library.tasks)} tasks)" if library else "")
        + ("" if skip is None else f"; dense requests: {skip.line}")
        + (f"; dense requests decode in batches of up to {args.max_batch}" if engine.batching and skip is None
           and args.max_batch > 1 else "")
        + ("" if engine.batching else "; one request decodes at a time (this model's cache has sliding-window, "
           "recurrent or compressed layers, which mumoe does not batch)")
        + (f"; decode steps read int4 copies ({_int4_line(engine)})" if args.int4 else ""))
    config = ServerConfig(max_queue=args.max_queue, max_batch=args.max_batch, timeout=args.timeout,
                          max_body_bytes=int(args.max_body_mb * 2**20))
    app = create_app(engine, config, worker_thread=False)
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


def add_parser(sub) -> None:
    sp = sub.add_parser("serve", help="OpenAI-compatible HTTP server; every request pruned for itself",
                        description="Serve one model over an OpenAI-compatible API (/v1/completions, "
                        "/v1/chat/completions, /v1/models, /health, /metrics). Each request is pruned for itself: the "
                        "server defaults below, overridden per request by a \"mumoe\" object in the body, e.g. "
                        "{\"active\": 0.5, \"structure\": \"column\"} (μ-MoE from the prompt's own prefill), "
                        "{\"experts\": 8} (the 8 experts per layer the prompt routes to most) or {\"task\": \"auto\"} "
                        "(TAER, with --library). One request decodes at a time; needs `pip install 'mumoe[serve]'`.")
    model_args(sp)
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sp.add_argument("--served-model-name", help="the name clients pass as \"model\" (default: the MODEL argument)")
    sp.add_argument("--active", type=float, default=1.0, help="default μ-MoE active-weight ratio rho in (0, 1] "
                    "(default 1 = dense)")
    sp.add_argument("--structure", default="row", help="default μ-MoE structure: row (default), N:M or column")
    sp.add_argument("--int8", action="store_true", help="μ-MoE column requests decode with matrices gathered from "
                    "int8 copies of the weights (weight-only, per-row scales; made once at the first such request, "
                    "+1/4 of the fp32 weights in memory; default off)")
    sp.add_argument("--int4", action="store_true", help="decode steps (up to 32 tokens per call: batched requests "
                    "too) read weight-only int4 copies of every linear and routed expert (groups of 32 inputs, "
                    "scale and zero each; routers excluded; made at load: +0.625 bytes per weight in memory); "
                    "prefills and μ-MoE's compacted matrices keep --dtype. CPU only (default off)")
    sp.add_argument("--experts", type=int, help="default per-prompt expert pruning: keep this many experts per layer "
                    "(the prompt's own TCESS; default off)")
    add_skip_args(sp, calib=True)
    sp.add_argument("--library", help="TAER task library (from `mumoe taer build`): enables \"task\" requests")
    sp.add_argument("--task", help="default TAER task: 'auto' (match each prompt) or a task name (needs --library; "
                    "default off)")
    sp.add_argument("--taer-only", action="store_true", help="with --library: never load the full model — only the "
                    "layers up to the first MoE router (to match prompts) and each requested task's experts; every "
                    "request is a TAER request (default --task auto)")
    sp.add_argument("--max-task-models", type=int, default=2, help="TAER task models kept in memory, least recently "
                    "used dropped first (default 2)")
    sp.add_argument("--max-queue", type=int, default=16, help="requests waiting behind those decoding; more get "
                    "HTTP 503 (default 16)")
    sp.add_argument("--max-batch", type=int, default=8, help="dense prompts decoded together (continuous batching: "
                    "each joins the running batch after its own prefill); requests pruned for themselves (μ-MoE, "
                    "experts, task) run alone between batches; 1 = one request at a time (default 8)")
    sp.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MiB; larger ones get HTTP "
                    "413 before they are read (default 8)")
    sp.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take from arrival to its last "
                    "token, queueing included; later: HTTP 504 (default 600)")
    sp.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template for /v1/chat/completions when the "
                    "tokenizer has none (default: the tokenizer's own)")
    sp.set_defaults(func=cmd_serve)
