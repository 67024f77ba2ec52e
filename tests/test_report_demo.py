"""`mumoe report` and `mumoe demo`."""

import json

import pytest

from mumoe import MumoeError
from mumoe.cli import main
from mumoe.eval.report import markdown_table, read_rows


def test_report_table_and_plot(tmp_path, capsys):
    run = {"rows": [{"method": "dense", "ratio": 0.0, "ppl": {"a": 10.0, "b": 20.0}},
                    {"method": "x", "ratio": 0.5, "ppl": {"a": 12.0, "b": 30.0}},
                    {"method": "x", "ratio": 0.25, "ppl": {"a": 11.0, "b": 22.0}},
                    {"method": "y", "calib": "a", "ratio": 0.5, "ppl": {"a": 11.5, "b": 40.0}}]}
    (tmp_path / "r.json").write_text(json.dumps(run))
    table = markdown_table(read_rows([tmp_path / "r.json"]))
    assert "| x | 50% | 12.00 | 30.00 | 21.00 |" in table and "| y [a] | 50% | 11.50 | 40.00 | 25.75 |" in table
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    png = (tmp_path / "rep" / "ppl_vs_ratio.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| dense | 0% | 10.00 | 20.00 | 15.00 |" in (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(MumoeError, match="no evaluation rows"):
        (tmp_path / "empty.json").write_text("{}")
        read_rows([tmp_path / "empty.json"])
    assert main(["report", str(tmp_path / "nope.json")]) == 2


def test_demo_runs_and_its_dense_row_is_a_real_perplexity(tmp_path):
    import mumoe
    from mumoe.eval import perplexity
    from mumoe.eval.demo import run_demo
    from mumoe.loading import DATA

    res = run_demo(tmp_path / "demo", eval_windows=2, calib_windows=1, log=lambda *a: None)
    assert {r["method"] for r in res["rows"]} == {"dense", "aimer", "frequency", "reap", "peu", "heapr (global)"}
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["ppl_vs_ratio.png", "report.md", "results.json"]
    model, tok = mumoe.load_default()
    text = (DATA / "prose" / "eval.txt").read_text("utf-8")
    direct = perplexity(model, tok, text, seqlen=512, max_windows=2, progress=False)["ppl"]
    assert abs(res["rows"][0]["ppl"]["prose"] - direct) < 1e-3
    assert len(res["taer"]["matches"]) == 12 and 0 <= res["taer"]["accuracy"] <= 1
    assert set(res["testtime"]) == {"code", "docs", "kernel", "prose"}
    assert all(r["μ-MoE"] > r["dense"] * 0.9 for r in res["testtime"].values())
