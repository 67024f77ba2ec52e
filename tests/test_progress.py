"""The progress rule: on a terminal a bar; in a log or a pipe a plain line at least every ~10 s of a long stage
(none for a short one); nothing under --quiet."""

import io
import os
import subprocess
import sys
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


def test_cli_prints_progress_lines_in_a_pipe(tmp_path):
    """`mumoe prune --layerwise on` with stderr a pipe: the layer-sequential stage reports in plain lines
    (interval shortened by MUMOE_PROGRESS_EVERY); with --quiet, none."""
    from conftest import SAMPLE_TEXT, char_tokenizer, make

    src = tmp_path / "src"
    make("qwen3_moe").save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    cmd = [sys.executable, "-m", "mumoe", "prune", str(src), "--method", "reap", "--ratio", "0.25", "--calib",
           str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "16", "--layerwise", "on"]
    env = {**os.environ, "MUMOE_PROGRESS_EVERY": "0"}
    r = subprocess.run(cmd + ["--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "  layer-sequential calibration: 2/2 layers" in r.stderr, r.stderr
    assert "writing pruned tensors:" in r.stderr and "\r" not in r.stderr
    r = subprocess.run(cmd + ["--out", str(tmp_path / "b"), "--quiet"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "elapsed" not in r.stderr, r.stderr
