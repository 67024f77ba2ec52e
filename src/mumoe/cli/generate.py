"""`mumoe generate`: μ-MoE generation, each prompt pruned for itself."""

from __future__ import annotations

import time

from ..errors import MumoeError
from .common import check_device, load_model, model_config, model_args, say
from .skipping import add_skip_args, check_skip_args

def _check_generate_args(args) -> None:
    from ..files import check_positive
    from ..loading import check_model
    from ..recipe import parse_structure

    check_positive(getattr(args, "max_new_tokens", None), "--max-new-tokens", 0)
    if getattr(args, "structure", None) is not None:
        parse_structure(args.structure)
    if getattr(args, "int8", False) and args.structure != "column":
        raise MumoeError("--int8 decodes compacted columns: it needs --structure column")
    check_model(args.model)
    check_device(args.device)


def _check_context(model_name: str, prompt_tokens: int, new_tokens: int) -> None:
    """The prompt and the tokens to generate must fit the model's context (max_position_embeddings)."""
    from ..loading import check_model

    config = model_config(check_model(model_name))
    if config is None:
        return
    ctx = getattr(config.get_text_config(), "max_position_embeddings", None)
    if ctx and prompt_tokens + new_tokens > ctx:
        raise MumoeError(f"this model's maximum context length is {ctx} tokens; the prompt has {prompt_tokens} and "
                         f"--max-new-tokens asks for {new_tokens} more ({prompt_tokens + new_tokens}): shorten the "
                         "prompt or lower --max-new-tokens")


def cmd_generate(args) -> int:
    import torch

    from ..apply.gemv import fast_decode
    from ..loading import load_tokenizer
    from ..select.weights import check_active
    from ..testtime import generate

    check_active(args.active)
    if not args.prompt.strip():
        raise MumoeError("empty prompt")
    _check_generate_args(args)
    check_skip_args(args)
    tok = load_tokenizer(args.model)
    if tok is None:
        raise MumoeError(f"{args.model} has no tokenizer")
    ids = torch.tensor([tok(args.prompt, add_special_tokens=False)["input_ids"]])
    _check_context(args.model, ids.shape[1], args.max_new_tokens)  # as the server does, before the weights
    t_load = time.perf_counter()
    model = load_model(args.model, args.dtype, args.device)
    fast_decode(model)  # one-token steps on the CPU: half-precision linears by mv, only the picked experts (apply.gemv)
    if args.skip is not None:
        return _generate_skipping(args, model, tok, ids, time.perf_counter() - t_load)
    say(f"loaded {args.model} in {time.perf_counter() - t_load:.1f}s; μ-MoE at ρ={args.active:g} "
        f"({args.structure}), {ids.shape[1]} prompt tokens, up to {args.max_new_tokens} new")
    with torch.no_grad():  # a plain dense prefill, timed for reference
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True)
        t_plain = time.perf_counter() - t0
    from transformers import TextStreamer

    print(args.prompt, end="", flush=True)  # then each new piece of text as it is decoded
    res = generate(model, ids, args.active, args.structure, int8=args.int8, max_new_tokens=args.max_new_tokens,
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


def _generate_skipping(args, model, tok, ids, load_s: float) -> int:
    """--skip: greedy generation with per-token expert skipping (ODP or OTP), timed per decoded token."""
    import torch
    from transformers import TextStreamer

    from ..testtime.skip import skipping_with
    from .skipping import prepare

    config = model_config(args.model)
    ctx = (getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None) or 512
    setup = prepare(args, model, tok, ctx, 8)
    say(f"loaded {args.model} in {load_s:.1f}s; {ids.shape[1]} prompt tokens, up to {args.max_new_tokens} new; "
        + setup.line)
    stamps: list[float] = []

    class Timed(TextStreamer):
        def put(self, value):
            stamps.append(time.perf_counter())
            super().put(value)

    print(args.prompt, end="", flush=True)
    with torch.no_grad(), skipping_with(model, setup) as count:
        t0 = time.perf_counter()
        out = model.generate(ids.to(next(model.parameters()).device), max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id,
                             streamer=Timed(tok, skip_prompt=True, skip_special_tokens=True))
    new = out.shape[1] - ids.shape[1]
    first = stamps[1] - t0 if len(stamps) > 1 else float("nan")  # stamps[0]: the prompt handed to the streamer
    rate = (new - 1) / (stamps[-1] - stamps[1]) if new > 1 else float("nan")
    print(f"\n[skip] {count.share():.1%} of expert calls skipped ({sum(count.skipped.values()):,} of "
          f"{sum(count.calls.values()):,}); prefill and first token {first:.3f}s, then {new - 1} tokens at "
          f"{rate:.1f} tokens/s")
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("generate", help="μ-MoE: prune per prompt from its own activations, then generate",
                        description="Dense prefill of the prompt collects per-input-feature norms of every linear "
                        "(per expert for routed experts); Wanda masks at active ratio rho are built for this prompt "
                        "and the continuation is decoded with them. With --skip instead: no masks; experts are skipped per token "
                        "(ODP, or OTP with --skipper FILE) and the decode speed is printed.")
    model_args(sp)
    sp.add_argument("--prompt", required=True, help="the prompt text; its own prefill is the calibration")
    sp.add_argument("--active", type=float, default=0.5, help="active-weight ratio rho in (0, 1] (default 0.5)")
    sp.add_argument("--structure", default="row", help="row (default), N:M (e.g. 2:4) or column (compacted "
                    "decode: whole input columns dropped; lossy on a model as narrow as the bundled one)")
    sp.add_argument("--int8", action="store_true", help="with --structure column: decode with the kept columns of "
                    "int8 copies of the weights (weight-only, per-row scales, a CPU int8 kernel; default off)")
    sp.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate, greedy (default 48)")
    add_skip_args(sp, calib=True)
    sp.set_defaults(func=cmd_generate)
