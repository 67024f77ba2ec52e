"""Reports: evaluation JSONs -> a markdown table and PNG plots (perplexity vs ratio, a panel per domain).

A result file holds {"rows": [{"method", "ratio", "ppl": {domain: value}, optional "calib"}], ...}: what
`mumoe demo`, tools/compare_criteria.py and tools/heapr_table.py write.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MumoeError, MumoeFileError
from ..files import read_json


def read_rows(paths: list[str | Path]) -> list[dict]:
    """Rows of every result file (a folder means every *.json inside it that has rows)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise MumoeFileError(f"result file or folder not found: {p}")
    rows = []
    for f in files:
        data = read_json(f, "the result file")
        for r in data.get("rows", []) if isinstance(data, dict) else []:
            if {"method", "ratio", "ppl"} <= set(r):
                rows.append(r)
    if not rows:
        raise MumoeError("no evaluation rows found in " + ", ".join(map(str, files or paths)))
    return rows


def label(row: dict) -> str:
    calib = row.get("calib")
    return row["method"] + (f" [{calib}]" if calib and calib not in ("-", "mixed") else "")


def markdown_table(rows: list[dict]) -> str:
    domains = sorted({d for r in rows for d in r["ppl"]})
    lines = ["| method | removed | " + " | ".join(domains) + " | mean |", "|---|---|" + "---|" * (len(domains) + 1)]
    for r in rows:
        vals = [r["ppl"].get(d) for d in domains]
        mean = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
        lines.append(f"| {label(r)} | {r['ratio']:.0%} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in vals)
                     + f" | {mean:.2f} |")
    return "\n".join(lines)


def plot_ppl_vs_ratio(rows: list[dict], out: Path, title: str = "Perplexity after pruning") -> Path:
    """One panel per domain; x = fraction removed, y = perplexity (log), one line per method, dense dashed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({d for r in rows for d in r["ppl"]})
    dense = {d: r["ppl"][d] for r in rows if r["method"] == "dense" for d in r["ppl"]}
    series: dict[str, list[dict]] = {}
    for r in rows:  # single-domain calibrations stay in the table; the plot shows the mixed / data-free ones
        if r["method"] != "dense" and r.get("calib") in (None, "-", "mixed"):
            series.setdefault(label(r), []).append(r)
    cols = 2 if len(domains) > 1 else 1
    nrows = (len(domains) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols + 2.8, 3.8 * nrows), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, d in zip(axes.flat, domains):
        for n, (name, rs) in enumerate(sorted(series.items())):
            pts = sorted((r["ratio"], r["ppl"][d]) for r in rs if d in r["ppl"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=name,
                        color=colors[n % len(colors)], ls="-" if n < len(colors) else ":")
        if d in dense:
            ax.axhline(dense[d], color="black", ls="--", lw=1, label="dense")
        ax.set_title(d)
        ax.set_xlabel("fraction removed")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(domains):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.8 / (5.2 * cols + 2.8), 0.95))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(rows: list[dict], out_dir: Path, title: str = "mumoe report", extra_md: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_ppl_vs_ratio(rows, out_dir / "ppl_vs_ratio.png", title)
    md = f"# {title}\n\n{markdown_table(rows)}\n\n![perplexity vs ratio]({plot.name})\n" + (f"\n{extra_md}\n" if extra_md else "")
    (out_dir / "report.md").write_text(md)
    return out_dir / "report.md"
