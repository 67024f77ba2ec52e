"""lm-eval adapter: local offline tasks; in-memory model == saved and reloaded model."""

import json

import pytest

from mumoe.eval.harness import nextline_docs

lm_eval = pytest.importorskip("lm_eval")


def test_nextline_docs_hand_checked():
    text = "\n".join(f"line number {i:03d} of the test text" for i in range(40))
    docs = nextline_docs(text, n=5, seed=1, context_lines=3)
    assert len(docs) == 5
    for d in docs:
        ctx = d["context"].strip().splitlines()
        last = int(ctx[-1].split()[2])
        assert d["choices"][d["label"]] == f"line number {last + 1:03d} of the test text"
        assert len(set(d["choices"])) == 4


def test_in_memory_equals_saved_and_reloaded(tmp_path):
    import mumoe
    from mumoe.eval.harness import run_lm_eval

    model, tok = mumoe.load_default()
    report = mumoe.prune(model, "aimer", 0.5)
    in_memory = run_lm_eval(model, tok, ["mumoe_nextline_prose", "mumoe_nextline_code"], limit=12, n_local=12)
    out = mumoe.save_pruned(model, tmp_path / "p", report, tok)
    reloaded = run_lm_eval(str(out), tok, ["mumoe_nextline_prose", "mumoe_nextline_code"], limit=12, n_local=12)
    assert in_memory.keys() == reloaded.keys() == {"mumoe_nextline_prose", "mumoe_nextline_code"}
    for task in in_memory:
        assert in_memory[task]["acc"] == reloaded[task]["acc"]
        assert in_memory[task]["acc_norm"] == reloaded[task]["acc_norm"]
        assert 0.0 <= in_memory[task]["acc"] <= 1.0


def test_cli_tasks_and_unknown_task(tmp_path, capsys):
    from mumoe.cli import main

    assert main(["eval", "--tasks", "mumoe_nextline_docs", "--limit", "4", "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())["tasks"]["mumoe_nextline_docs"]
    assert set(res) >= {"acc", "acc_norm"}
    assert main(["eval", "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
