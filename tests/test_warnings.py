"""The main commands on the bundled model with transformers' (and torch's) deprecation warnings turned into
errors: mumoe uses no API that is going away within the transformers versions pyproject allows."""

from __future__ import annotations

import logging
import warnings

import pytest

from mumoe.cli import main
from mumoe.paths import DATA

CAL = ["--calib", "domain:code", "--nsamples", "2", "--seqlen", "64"]


def commands(tmp):
    lib = str(tmp / "lib")
    return [
        ["info"],
        ["prune", "--method", "reap", "--ratio", "0.25", *CAL, "--out", str(tmp / "reap")],
        ["prune", "--method", "heapr", "--ratio", "0.25", *CAL, "--layerwise", "on", "--out", str(tmp / "heapr")],
        ["prune", "--method", "aimer", "--ratio", "0.25", "--out", str(tmp / "aimer")],
        ["prune", "--method", "wanda", "--ratio", "0.5", *CAL, "--out", str(tmp / "wanda")],
        ["eval", str(tmp / "reap"), "--ppl", "domain", "--seqlen", "64", "--max-windows", "1"],
        ["eval", "--ppl", "domain", "--seqlen", "64", "--max-windows", "1", "--testtime"],
        ["generate", "--prompt", "def main():", "--max-new-tokens", "4"],
        ["generate", "--prompt", "def main():", "--max-new-tokens", "4", "--structure", "column"],
        ["compare", "--methods", "reap,frequency", *CAL, "--eval", "domain", "--eval-windows", "1",
         "--eval-seqlen", "64"],
        ["taer", "build", "--task", "domain", "--keep", "8", "--nsamples", "2", "--seqlen", "64", "--out", lib],
        ["taer", "match", lib, "--prompt", "The quick brown fox"],
        ["taer", "generate", lib, "--prompt", "def main():", "--max-new-tokens", "4"],
        ["eval", "--ppl", str(DATA / "code" / "eval.txt"), "--seqlen", "64", "--max-windows", "1", "--testtime", "--experts", "4",
         "--calib", "domain:code", "--calib-windows", "2", "--library", lib],
    ]


class _Deprecations(logging.Handler):
    """transformers also announces deprecations through its logger (`warning_once`), not only as warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record):
        if "deprecat" in record.getMessage().lower():
            self.seen.append(record.getMessage())


def test_main_commands_use_no_deprecated_api(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()  # announced once per process: earlier tests may have used them up
    handler = _Deprecations()
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        _run_all(tmp_path, capsys)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert handler.seen == []


def _run_all(tmp_path, capsys):
    for argv in commands(tmp_path):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            try:
                rc = main(argv)
            except (FutureWarning, DeprecationWarning) as w:  # pragma: no cover - the failure being tested
                pytest.fail(f"mumoe {' '.join(argv)}: {type(w).__name__}: {w}")
        assert rc == 0, (argv, capsys.readouterr().err)
