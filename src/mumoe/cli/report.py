"""`mumoe report`: evaluation JSONs -> markdown table and plots."""

from __future__ import annotations

from pathlib import Path

from ..errors import MumoeError

def cmd_report(args) -> int:
    from ..eval.report import read_rows, write_report
    from ..files import check_writable

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise MumoeError(f"--out {args.out} is a file; give a folder")
    check_writable(args.out)
    rows = read_rows(args.runs)
    md = write_report(rows, Path(args.out), args.title)
    print(md.read_text().split("![")[0].strip())
    print(f"\nwrote {md} and {Path(args.out) / 'ppl_vs_ratio.png'}")
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("report", help="evaluation JSONs -> markdown table + PNG plots",
                        description="Read result JSONs (files or folders with a 'rows' list) and write report.md "
                        "and ppl_vs_ratio.png (one panel per domain, one line per method).")
    sp.add_argument("runs", nargs="+", help="result JSON files or folders")
    sp.add_argument("--out", default="mumoe-report", help="output folder (default mumoe-report)")
    sp.add_argument("--title", default="mumoe report", help="title of report.md and the plot (default: mumoe "
                    "report)")
    sp.set_defaults(func=cmd_report)
