"""Reports: evaluation JSONs -> a markdown table and PNG plots (perplexity vs ratio, a panel per domain).

A result file holds {"rows": [{"method", "ratio", "ppl": {domain: value}, optional "calib"}], ...}: what
`mumoe demo`, tools/compare_criteria.py and tools/heapr_table.py write.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MumoeError, MumoeFileError
from ..files import read_json


def read_rows(paths: list[str | Path]) -> list[dict]:
    """Rows of every result file (a folder means every *.json inside it that has rows). With more than one file,
    each row is tagged with its run (`"run"`: the file's name, or its folder's for a results.json), so each file
    keeps its own dense baseline in the table and the plot."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise MumoeFileError(f"result file or folder not found: {p}")
    per_file = []
    for f in files:
        data = read_json(f, "the result file")
        rows = [dict(r) for r in (data.get("rows", []) if isinstance(data, dict) else [])
                if isinstance(r, dict) and {"method", "ratio", "ppl"} <= set(r)]
        if rows:
            per_file.append((f, rows))
    if not per_file:
        raise MumoeError("no evaluation rows found in " + ", ".join(map(str, files or paths)))
    if len(per_file) > 1:
        names = _run_names([f for f, _ in per_file])
        for (f, rows), name in zip(per_file, names):
            for r in rows:
                r["run"] = name
    return [r for _, rows in per_file for r in rows]


def _run_names(files: list[Path]) -> list[str]:
    """Short distinct names: the file's stem, or its folder's name for generic names (results.json)."""
    names = [f.parent.name if f.stem in ("results", "result") else f.stem for f in files]
    if len(set(names)) < len(names):
        names = [str(f.with_suffix("")) for f in files]
    return names


MIXED = (None, "-", "mixed", "domain")  # data-free, or calibrated on every domain ("domain": the bundled mix)


def _method(row: dict) -> str:
    """method [calibration], the calibration only where it is a single domain's."""
    calib = row.get("calib")
    return row["method"] + (f" [{calib}]" if calib and calib not in MIXED else "")


def label(row: dict) -> str:
    """method [calibration] (run), the parts shown only where they tell rows apart."""
    return _method(row) + (f" ({row['run']})" if row.get("run") else "")


def _dense(rows: list[dict]) -> dict[str | None, dict[str, float]]:
    """run -> {domain: dense perplexity}: every input file's own baseline."""
    out: dict[str | None, dict[str, float]] = {}
    for r in rows:
        if r["method"] == "dense":
            out.setdefault(r.get("run"), {}).update(r["ppl"])
    return out


def markdown_table(rows: list[dict]) -> str:
    """One row per result row; with several runs a run column, and each row's mean relative to its own run's
    dense perplexity (never another file's)."""
    domains = sorted({d for r in rows for d in r["ppl"]})
    runs = sorted({r["run"] for r in rows if r.get("run")})
    dense = _dense(rows)
    head = "| method | " + ("run | " if runs else "") + "removed | " + " | ".join(domains) + " | mean | vs own dense |"
    lines = [head, "|---|" + ("---|" if runs else "") + "---|" + "---|" * (len(domains) + 2)]
    for r in rows:
        vals = [r["ppl"].get(d) for d in domains]
        mean = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
        base = dense.get(r.get("run"), {})
        common = [d for d in domains if d in base and d in r["ppl"]]
        rel = (sum(r["ppl"][d] / base[d] for d in common) / len(common)) if common else None
        lines.append(f"| {_method(r)} | " + (f"{r.get('run', '')} | " if runs else "") + f"{r['ratio']:.0%} | "
                     + " | ".join("–" if v is None else f"{v:.2f}" for v in vals)
                     + f" | {mean:.2f} | " + ("–" if rel is None else f"{rel:.2f}×") + " |")
    return "\n".join(lines)


# Okabe & Ito's colour-blind-safe palette (black kept for dense), then the same colours dotted
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#999999")
RUN_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)))


def _spread(ys: list[float], gap: float) -> list[float]:
    """Label heights (log10) pushed apart to at least `gap`, keeping their order."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = list(ys)
    for a, b in zip(order, order[1:]):
        out[b] = max(out[b], out[a] + gap)
    return out


def plot_series(rows: list[dict]) -> dict[str, list[dict]]:
    """The plotted lines: label -> its rows. Where the rows come from several calibrations, single-domain ones stay
    in the table and the plot shows the mixed / data-free ones; rows of one calibration (a `mumoe compare` run,
    whatever its source) are all plotted."""
    calibs = {r.get("calib") or "mixed" for r in rows if r["method"] != "dense"} - {"-"}  # "-": data-free
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "dense" and (len(calibs) <= 1 or r.get("calib") in MIXED):
            series.setdefault(label(r), []).append(r)
    return series


def plot_ppl_vs_ratio(rows: list[dict], out: Path, title: str = "Perplexity after pruning") -> Path:
    """One panel per domain; x = fraction removed, y = perplexity (log); one line per method (and run), labelled
    at its end; each run's dense perplexity as its own dashed line."""
    import math

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({d for r in rows for d in r["ppl"]})
    dense = _dense(rows)
    runs = sorted({r.get("run") for r in rows}, key=lambda x: (x is None, x or ""))
    series = plot_series(rows)
    methods = sorted({r["method"] for rs in series.values() for r in rs})
    color = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    cols = 2 if len(domains) > 1 else 1
    nrows = (len(domains) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 4.2 * nrows), squeeze=False)
    xs = [r["ratio"] for rs in series.values() for r in rs] or [0.0, 1.0]
    x_hi = max(xs)
    for ax, d in zip(axes.flat, domains):
        ends = []  # (x, y, text, colour) of each line's direct label
        for name, rs in sorted(series.items()):
            pts = sorted((r["ratio"], r["ppl"][d]) for r in rs if d in r["ppl"])
            if not pts:
                continue
            m = rs[0]["method"]
            ls = "-" if len(runs) == 1 else ("-", "--", ":", "-.")[runs.index(rs[0].get("run")) % 4]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, lw=1.6, ls=ls, color=color[m])
            ends.append((pts[-1][0], pts[-1][1], name, color[m]))
        for i, run in enumerate(runs):
            if d in dense.get(run, {}):
                y = dense[run][d]
                ax.hlines(y, -0.02, x_hi, color="black", lw=1, ls=RUN_STYLES[i % len(RUN_STYLES)])
                ends.append((x_hi, y, "dense" + (f" ({run})" if run else ""), "black"))
        lo = min(e[1] for e in ends) if ends else 1.0
        hi = max(e[1] for e in ends) if ends else 10.0
        gap = 0.045 * max(math.log10(hi / lo), 0.3)
        heights = _spread([math.log10(e[1]) for e in ends], gap)
        for (x, y, text, c), h in zip(ends, heights):
            ax.annotate(text, (x, y), xytext=(x_hi + 0.03 * max(x_hi, 0.1), 10 ** h), textcoords="data",
                        fontsize=7.5, color=c, va="center",
                        arrowprops=dict(arrowstyle="-", color=c, lw=0.5, alpha=0.6))
        ax.set_xlim(-0.02, x_hi * 1.32 + 0.02)  # room for the labels right of the lines
        ax.set_xticks([t for t in ax.get_xticks() if -1e-9 <= t <= x_hi + 1e-9])
        ax.set_title(d)
        ax.set_xlabel("fraction removed")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3, which="both")
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
    for ax in list(axes.flat)[len(domains):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(rows: list[dict], out_dir: Path, title: str = "mumoe report", extra_md: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_ppl_vs_ratio(rows, out_dir / "ppl_vs_ratio.png", title)
    md = f"# {title}\n\n{markdown_table(rows)}\n\n![perplexity vs ratio]({plot.name})\n" + (f"\n{extra_md}\n" if extra_md else "")
    (out_dir / "report.md").write_text(md)
    return out_dir / "report.md"
