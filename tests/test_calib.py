"""Calibration windows: the calibration contract (docs/cli.md) on hand-worked examples."""

import pytest
import torch

from mumoe import MumoeError
from mumoe.observe import calibration_windows, read_text, tokenize, windows


def test_consecutive_windows_hand_worked(tok):
    ids = tokenize(tok, "abcdefghij")
    assert ids.tolist() == [tok.convert_tokens_to_ids(c) for c in "abcdefghij"]  # no special tokens added
    w = windows(ids, 3)
    assert [tok.decode(r) for r in w] == ["abc", "def", "ghi"]  # remainder "j" dropped
    assert [tok.decode(r) for r in windows(ids, 3, nsamples=2)] == ["abc", "def"]
    assert windows(ids, 3, nsamples=10).shape == (3, 3)


def test_random_windows_are_seeded(tok):
    ids = tokenize(tok, "abcdefghijklmnopqrstuvwxyz")
    a, b, c = windows(ids, 5, 4, seed=1), windows(ids, 5, 4, seed=1), windows(ids, 5, 4, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, 26 - 5 + 1, (4,), generator=gen).tolist()
    assert [tok.decode(r) for r in a] == ["abcdefghijklmnopqrstuvwxyz"[s:s + 5] for s in starts]


def test_file_and_folder(tmp_path, tok):
    (tmp_path / "b.txt").write_text("world")
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "skip.md").write_text("ignored")
    assert read_text(tmp_path) == "hello\n\nworld"
    w = calibration_windows(tok, tmp_path / "a.txt", nsamples=8, seqlen=2)
    assert [tok.decode(r) for r in w] == ["he", "ll"]


def test_bad_inputs(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(MumoeError, match="empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(MumoeError, match="not found"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(MumoeError, match="no .txt files"):
        read_text(tmp_path / "d")
    with pytest.raises(MumoeError, match="fewer than one window"):
        windows(tokenize(tok, "abc"), 8)


def test_bundled_calibration_names():
    from mumoe.loading import DATA

    code = read_text("domain:code")
    assert code == (DATA / "code" / "calib.txt").read_text("utf-8")
    mixed = read_text("domain")
    assert all((DATA / d / "calib.txt").read_text("utf-8") in mixed for d in ("prose", "docs", "code", "kernel"))
    assert (DATA / "code" / "eval.txt").read_text("utf-8")[:200] not in mixed  # never the eval splits
    with pytest.raises(MumoeError, match="known: code, docs, kernel, prose"):
        read_text("domain:nope")
