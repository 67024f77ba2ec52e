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
    from mumoe.eval.report import plot_series

    assert sorted(plot_series(run["rows"])) == ["x"]  # several calibrations: the single-domain one not drawn
    one = [{"method": "dense", "ratio": 0.0, "ppl": {"a": 1.0}}] + [
        {"method": m, "calib": "/data/c.txt", "ratio": r, "ppl": {"a": 2.0}} for m in ("x", "y") for r in (0.25, 0.5)]
    assert {k: len(v) for k, v in plot_series(one).items()} == {"x [/data/c.txt]": 2, "y [/data/c.txt]": 2}
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


def test_report_keeps_each_files_dense_baseline(tmp_path, capsys):
    """Two runs evaluated differently (dense 10 vs 40 on the same domain): each pruned row is compared with its
    own file's dense, the plot draws both baselines, and nothing mixes them."""
    import json

    from mumoe.eval.report import _dense

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"rows": [
        {"method": "dense", "ratio": 0.0, "ppl": {"x": 10.0}},
        {"method": "reap", "ratio": 0.5, "ppl": {"x": 15.0}}]}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": [
        {"method": "dense", "ratio": 0.0, "ppl": {"x": 40.0}},
        {"method": "heapr", "ratio": 0.25, "ppl": {"x": 44.0}}]}))
    rows = read_rows([tmp_path / "a" / "results.json", tmp_path / "b.json"])
    assert [r["run"] for r in rows] == ["a", "a", "b", "b"]
    assert _dense(rows) == {"a": {"x": 10.0}, "b": {"x": 40.0}}
    table = markdown_table(rows)
    assert "| reap | a | 50% | 15.00 | 15.00 | 1.50× |" in table  # 15 / 10, its own dense
    assert "| heapr | b | 25% | 44.00 | 44.00 | 1.10× |" in table  # 44 / 40, not 44 / 10
    assert main(["report", str(tmp_path / "a" / "results.json"), str(tmp_path / "b.json"), "--out",
                 str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "ppl_vs_ratio.png").stat().st_size > 10_000
    one = read_rows([tmp_path / "b.json"])  # a single file: no run column
    assert "run" not in one[0] and "| heapr | 25% | 44.00 | 44.00 | 1.10× |" in markdown_table(one)
