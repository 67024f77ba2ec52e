"""`mumoe demo`: the tour on the bundled model."""

from __future__ import annotations



def cmd_demo(args) -> int:
    from ..apply.export import check_output_dir
    from ..eval.demo import run_demo

    check_output_dir(args.out, True)
    run_demo(args.out, args.eval_windows, args.calib_windows)
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("demo", help="the tour on the bundled model (start here)",
                        description="Dense vs expert pruning at 25/50/75% (AIMER, frequency, REAP, PEU), HEAPr at "
                        "10/25/50% of atoms (the curves of one calibration pass), μ-MoE vs offline Wanda under domain shift, TAER matching; writes a folder with "
                        "report.md, plots and JSON.")
    sp.add_argument("--out", default="mumoe-demo", help="output folder (replaced if it exists; default mumoe-demo)")
    sp.add_argument("--eval-windows", type=int, default=8, help="eval windows of 512 tokens per domain (default 8)")
    sp.add_argument("--calib-windows", type=int, default=8, help="calibration windows per domain (default 8)")
    sp.set_defaults(func=cmd_demo)
