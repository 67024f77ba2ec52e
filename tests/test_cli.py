"""The `mumoe` command line: real runs on tiny models, and bad inputs ending in one line + exit 2."""

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from conftest import SAMPLE_TEXT, char_tokenizer, make
from mumoe.cli import main


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_reports_counts(capsys):
    rc, out, _ = run(["info", "tiny:qwen2_moe", "--json"], capsys)
    info = json.loads(out)
    model = make("qwen2_moe")
    total = sum(p.numel() for p in model.parameters())
    expert = 2 * 8 * 3 * 16 * 32  # layers x experts x (gate, up, down) x I x H
    assert rc == 0 and info["params"]["total"] == total and info["params"]["routed_experts"] == expert
    assert info["params"]["active"] == total - expert * 6 // 8  # 6 of 8 experts idle per token
    assert info["top_k"] == 2 and info["experts_per_layer"] == [8, 8] and info["shared_expert"] is True
    rc, out, _ = run(["info", "tiny:deepseek_v3"], capsys)
    assert rc == 0 and "groups 2 (top 1)" in out and "MoE layers: 2 (1, 2)" in out


def test_prune_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    rc, out, err = run(["prune", "tiny:mixtral", "--method", "random", "--ratio", "0.25", "--out", str(out_dir)], capsys)
    assert rc == 0, err
    assert "layer   0: kept 6/8" in out
    pj = json.loads((out_dir / "pruning.json").read_text())
    assert [len(e["kept"]) for e in pj["layers"]] == [6, 6]
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.num_local_experts == 6
    # --overwrite replaces atomically; without it the directory is refused
    rc, _, err = run(["prune", "tiny:mixtral", "--method", "random", "--ratio", "0.5", "--out", str(out_dir)], capsys)
    assert rc == 2 and "exists" in err
    rc, _, _ = run(["prune", "tiny:mixtral", "--method", "random", "--ratio", "0.5", "--out", str(out_dir),
                    "--overwrite"], capsys)
    assert rc == 0 and json.loads((out_dir / "pruning.json").read_text())["ratio"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temp dirs left


def test_eval_ppl(tmp_path, capsys):
    model, tok = make("qwen3_moe"), char_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(SAMPLE_TEXT)
    rc, out, err = run(["eval", str(tmp_path / "m"), "--ppl", str(tmp_path / "t.txt"), "--seqlen", "32",
                        "--json", str(tmp_path / "r.json")], capsys)
    assert rc == 0, err
    assert "seqlen=32" in out
    res = json.loads((tmp_path / "r.json").read_text())["results"]["t"]
    n = len(tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]) // 32
    assert res["windows"] == n and res["tokens"] == n * 31 and res["seqlen"] == 32
    assert 1 < res["ppl"] < 300


# Bad inputs: tests/test_bad_inputs.py (the table of every case).


def test_existing_output_dir_is_refused_untouched(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    rc, _, err = run(["prune", "tiny:qwen3_moe", "--method", "random", "--ratio", "0.5", "--out",
                      str(tmp_path / "out")], capsys)
    assert rc == 2 and "--overwrite" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import mumoe
    from mumoe.apply import export

    model = make("qwen3_moe")
    report = mumoe.prune(model, "random", 0.5)

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError):
        export.save_pruned(model, tmp_path / "out", report, tokenizer=Broken())
    assert list(tmp_path.iterdir()) == []


def test_console_script_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mumoe.cli", "prune", "tiny:olmoe", "--method", "random", "--ratio",
                        "1.5", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["mumoe: error: ratio must be in [0, 1), got 1.5"]
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def _options(parser, path=("mumoe",)):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _options(sp, path + (name,))
        elif not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            yield " ".join(path), a


def test_every_option_explains_itself_and_its_default(capsys):
    import argparse

    from mumoe.cli import build_parser

    opts = list(_options(build_parser()))
    assert len(opts) > 90
    for cmd, a in opts:
        name = "/".join(a.option_strings) or a.dest
        assert a.help, f"{cmd} {name}: no help"
        if a.default not in (None, False, argparse.SUPPRESS):
            assert "default" in a.help.lower(), f"{cmd} {name}: default {a.default!r} not stated"
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "50%" in text and "%%" not in text
    assert "--max-new-tokens" not in [o for cmd, a in opts if cmd == "mumoe taer match" for o in a.option_strings]


@pytest.mark.parametrize("where", ["top", "sub"])
def test_quiet_prints_only_the_result(tmp_path, capsys, where):
    (tmp_path / "t.txt").write_text(SAMPLE_TEXT)
    make("qwen3_moe").save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    capsys.readouterr()
    flag = ["--quiet"]
    argv = ["prune", str(tmp_path / "m"), "--method", "reap", "--ratio", "0.5", "--calib", str(tmp_path / "t.txt"),
            "--seqlen", "16", "--nsamples", "4", "--out", str(tmp_path / "o")]
    assert main(flag + argv if where == "top" else argv + flag) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"wrote {tmp_path / 'o'} ")
    assert main(argv[:-1] + [str(tmp_path / "o2")]) == 0  # not quiet: the stages as well
    assert len(capsys.readouterr().out.strip().splitlines()) > 3


def test_a_command_leaves_nothing_in_the_temp_folder(tmp_path):
    """`import torch` makes an empty $TMPDIR/torchinductor_$USER; a mumoe command removes it again."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mumoe", "info", "default"], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []
    from mumoe.files import _remove_empty_tree

    (tmp_path / "t" / "dynamo").mkdir(parents=True)
    (tmp_path / "k" / "dynamo").mkdir(parents=True)
    (tmp_path / "k" / "dynamo" / "entry").write_text("a compiled graph")  # a cache in use is left alone
    _remove_empty_tree(tmp_path / "t")
    _remove_empty_tree(tmp_path / "k")
    assert [p.name for p in tmp_path.iterdir()] == ["k"] and (tmp_path / "k" / "dynamo" / "entry").exists()
