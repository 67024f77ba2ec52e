"""The progress rule: on a terminal a bar; in a log or a pipe a plain line at least every ~10 s of a long stage
(none for a short one); nothing under --quiet."""

import io
import time

from mumoe.progress import LineProgress


def test_a_line_every_interval_and_none_for_a_short_stage():
    out = io.StringIO()
    for _ in LineProgress(range(3), desc="short", unit="step", every=60, file=out):
        pass
    assert out.getvalue() == ""
    out = io.StringIO()
    for _ in LineProgress(range(6), desc="scoring", unit="layer", every=0.05, file=out):
        time.sleep(0.03)
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 4, lines  # 6 x 30 ms at one line per 50 ms
    assert lines[0].startswith("  scoring: ") and "/6 layers, 0:00 elapsed, ~0:00 left" in lines[0]
    counts = [int(x.split(": ")[1].split("/")[0]) for x in lines]
    assert counts == sorted(counts) and counts[-1] <= 6


def test_update_form_and_unknown_total():
    out = io.StringIO()
    p = LineProgress(desc="writing", every=0, file=out)
    p.update(2)
    p.update(3)
    assert out.getvalue().splitlines() == ["  writing: 2 its, 0:00 elapsed", "  writing: 5 its, 0:00 elapsed"]


def test_cli_prints_progress_lines_in_a_pipe(tmp_path, capsys, monkeypatch):
    """`mumoe prune --layerwise on` with stderr not a terminal (captured): the layer-sequential stage and the
    export report in plain lines (interval shortened to 0); with --quiet, none."""
    from conftest import SAMPLE_TEXT, char_tokenizer, make
    from mumoe import progress
    from mumoe.cli import main

    src = tmp_path / "src"
    make("qwen3_moe").save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    monkeypatch.delenv("MUMOE_PROGRESS", raising=False)
    cmd = ["prune", str(src), "--method", "reap", "--ratio", "0.25", "--calib", str(tmp_path / "calib.txt"),
           "--nsamples", "4", "--seqlen", "16", "--layerwise", "on"]
    capsys.readouterr()
    assert main(cmd + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "  layer-sequential calibration: 2/2 layers" in err, err
    assert "writing pruned tensors:" in err and "\r" not in err
    assert main(cmd + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "elapsed" not in capsys.readouterr().err
