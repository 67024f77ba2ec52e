"""Per-token expert skipping on the command line: the `--skip` flags of `eval`, `generate` and `serve` (ODP, or
OTP from a trained skipper file) and `mumoe train-skipper` (OTP's mask routers)."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import MumoeError
from .common import check_device, model_args, say, source_dir


def add_skip_args(sp, calib: bool) -> None:
    """--skip, --skipper, --keep-share (and --calib/--calib-windows where the command has none of its own)."""
    sp.add_argument("--skip", type=float, help="skip this share of expert calls per token: routed slot j >= 2 is "
                    "skipped where its score is under a threshold per layer, calibrated on --calib (default the "
                    "bundled calib splits) to hit this share; not computed (MC#'s ODP / OTP)")
    sp.add_argument("--skipper", default="odp", help="--skip: 'odp' (default: the score is p_j / p_1 of the router "
                    "probabilities) or the file of an OTP skipper trained by `mumoe train-skipper`")
    sp.add_argument("--keep-share", type=float, default=0.1, help="--skip: the share of each prompt's tokens, by "
                    "attention received x |x|_1, that keep every expert (prefill only; default 0.1)")
    if calib:
        sp.add_argument("--calib", help="--skip: calibration text for the thresholds (default 'domain', the bundled "
                        "calib splits)")
        sp.add_argument("--calib-windows", type=int, default=32, help="--skip: calibration windows (default 32)")


def check_skip_args(args) -> None:
    """The --skip flags, before any weight is read."""
    from ..files import check_positive
    from ..observe.calib import check_sources

    if args.skip is None:
        if args.skipper != "odp":
            raise MumoeError("--skipper needs --skip SHARE (the share of expert calls to skip)")
        return
    for value, flag in ((args.skip, "--skip"), (args.keep_share, "--keep-share")):
        if not 0 <= value < 1:
            raise MumoeError(f"{flag} must be in [0, 1), got {value:g}")
    if args.skipper != "odp" and not Path(args.skipper).is_file():
        raise MumoeError(f"--skipper {args.skipper}: give 'odp' or the file written by `mumoe train-skipper`")
    check_positive(args.calib_windows, "--calib-windows")
    if args.calib:
        check_sources([args.calib])


def prepare(args, model, tokenizer, seqlen: int, batch_size: int):
    """--skip: the skipper's score and its thresholds calibrated on --calib -> a `testtime.skip.SkipSetup` (None
    without --skip)."""
    if args.skip is None:
        return None
    from ..drivers.inputs import calibration
    from ..recipe import CalibSpec
    from ..testtime.skip import SkipSetup, calibrate, odp_scores

    if args.skipper == "odp":
        score, name = odp_scores, "ODP"
    else:
        from ..testtime.otp import load, otp_scores

        score, name = otp_scores(load(args.skipper, model)), f"OTP from {args.skipper}"
    spec = CalibSpec((args.calib or "domain",), args.calib_windows, min(512, seqlen), None, batch_size)
    wins = calibration(spec, None, tokenizer)[0]
    betas = calibrate(model, wins, args.skip, args.keep_share, batch_size, score=score)
    line = (f"experts skipped per token ({name}): {args.skip:.0%} of expert calls on {wins.shape[0]} calibration "
            f"windows, the top {args.keep_share:.0%} tokens by importance protected; threshold per layer "
            + ", ".join(f"{b:.3f}" for b in betas.values()))
    return SkipSetup(betas, score, args.keep_share, line)


def cmd_train_skipper(args) -> int:
    from ..drivers.inputs import calibration, load_model
    from ..files import check_new_file, check_positive, write_file_atomic
    from ..loading import check_model, load_tokenizer
    from ..observe.calib import check_sources
    from ..recipe import CalibSpec
    from ..testtime.otp import OTPConfig, to_bytes, train

    check_positive(args.nsamples, "--nsamples")
    check_positive(args.seqlen, "--seqlen", 2)
    check_positive(args.steps, "--steps")
    for value, flag in ((args.lam, "--lam"), (args.tau, "--tau")):
        if not value > 0:
            raise MumoeError(f"{flag} must be positive, got {value:g}")
    name = check_model(args.model)
    out = check_new_file(args.out, args.overwrite, "--out")
    src = source_dir(name)
    if src is not None and Path(src).resolve() in out.absolute().resolve().parents:
        raise MumoeError(f"--out {args.out} is inside the model folder {src}; mumoe does not write into a checkpoint "
                         "it did not create — choose a path outside it")
    spec = CalibSpec(tuple(args.calib or ["domain"]), args.nsamples, args.seqlen, args.seed, args.batch_size)
    check_sources(spec.sources, read=False)
    check_device(args.device)
    t0 = time.perf_counter()
    tok = load_tokenizer(name)
    wins = calibration(spec, None, tok)[0]
    model = load_model(name, args.dtype, args.device)
    cfg = OTPConfig(lam=args.lam, tau=args.tau, steps=args.steps, seed=args.seed if args.seed is not None else 0)
    say(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; OTP mask routers on {wins.shape[0]} windows x "
        f"{wins.shape[1]} tokens (lambda {cfg.lam:g}, tau {cfg.tau:g}, {cfg.steps} steps per layer)")
    t1 = time.perf_counter()
    routers, stats = train(model, wins, cfg, args.batch_size)
    for j, st in stats.items():
        say(f"  layer {j:3d}: relative error {st['error']:.4f}, mean relaxed mask {st['kept']:.3f} (last step)")
    write_file_atomic(out, to_bytes(routers, cfg, name), "--out")
    print(f"wrote {out} ({len(routers)} mask routers, trained in {time.perf_counter() - t1:.1f}s); use it with "
          f"`mumoe eval {args.model} --ppl domain --skip 0.2 --skipper {out}`")
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("train-skipper", help="OTP (MC#): train a mask router per MoE layer for per-token skipping",
                        description="Runs the calibration text through the unchanged model and fits, per MoE layer, a "
                        "linear mask router over the routed top-k slots (Gumbel-softmax relaxed mask, distillation to "
                        "the layer's routed output + lambda x the mean mask). The file is used by `mumoe eval/generate "
                        "--skip SHARE --skipper FILE`, which set each layer's threshold for that share.")
    model_args(sp)
    sp.add_argument("--out", required=True, help="the skipper file to write (.safetensors; refused if it exists, "
                    "unless --overwrite, or if it is inside the model folder)")
    sp.add_argument("--calib", action="append", help="calibration text: a .txt file, a folder, or 'domain' (default: "
                    "the bundled calib splits); repeatable")
    sp.add_argument("--nsamples", type=int, default=64, help="calibration windows (default 64)")
    sp.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    sp.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    sp.add_argument("--seed", type=int, default=None, help="window sampling and training seed (default: the first "
                    "windows, seed 0)")
    sp.add_argument("--lam", type=float, default=0.2, help="lambda: weight of the mean mask in the loss (default "
                    "0.2)")
    sp.add_argument("--tau", type=float, default=0.5, help="Gumbel-softmax temperature (default 0.5)")
    sp.add_argument("--steps", type=int, default=1000, help="Adam steps per layer, 2048 tokens each (default 1000)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sp.set_defaults(func=cmd_train_skipper)
