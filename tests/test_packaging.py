"""Exports keep the source's packaging (issue 16): dtype, tokenizer bytes, config spelling; mumoe forms load
with transformers alone (trust_remote_code) to mumoe.load's logits; the dtype rule of --dtype auto."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import mumoe
from mumoe.checkpoint import read_header, shard_files
from mumoe.cli import main
from mumoe.loading import DEFAULT_MODEL, checkpoint_dtype, compute_dtype

from conftest import MOE_ARCHS, char_tokenizer, ids, make

# The key each architecture's config class reads for the routed-expert count in transformers 4.57 and in
# llama.cpp's converter (read from their sources by hand; v5 may spell it otherwise).
KEY_4X = {"qwen3_moe": "num_experts", "qwen2_moe": "num_experts", "olmoe": "num_experts",
          "mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dtypes(path: Path) -> set[str]:
    return {m["dtype"] for f in shard_files(path) for m in read_header(f).values()}


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in shard_files(path))


def saved_tiny(tmp_path: Path, arch: str, dtype=torch.bfloat16) -> Path:
    """A tiny checkpoint as transformers v5 writes it (its own key spelling), with a tokenizer."""
    src = tmp_path / f"src-{arch}"
    make(arch).to(dtype).save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    return src


def test_bundled_export_stays_bf16_and_keeps_packaging(tmp_path):
    out = tmp_path / "out"
    assert main(["prune", "--method", "random", "--ratio", "0.25", "--out", str(out), "--quiet"]) == 0
    assert dtypes(DEFAULT_MODEL) == {"BF16"} and dtypes(out) == {"BF16"}
    # 12 of 16 experts kept: the routed experts are 81% of the weights, so the export is ~80% of the source
    assert weight_bytes(out) < 0.85 * weight_bytes(DEFAULT_MODEL)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert sha(out / name) == sha(DEFAULT_MODEL / name), name
    src_cfg, cfg = (json.loads((p / "config.json").read_text()) for p in (DEFAULT_MODEL, out))
    assert list(cfg) == list(src_cfg)  # the same keys in the same order
    assert {k for k in cfg if cfg[k] != src_cfg[k]} == {"num_experts"} and cfg["num_experts"] == 12


def test_explicit_dtype_is_the_export_dtype(tmp_path):
    out = tmp_path / "out"
    assert main(["prune", "--method", "random", "--ratio", "0.25", "--out", str(out), "--dtype", "fp32",
                 "--quiet"]) == 0
    assert dtypes(out) == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_bundled_tokenizer_readable_by_older_readers():
    """transformers 4.x has no TokenizersBackend; llama.cpp's converter loads the tokenizer through it."""
    cfg = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    model_cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert model_cfg["num_experts"] == 16 and "num_local_experts" not in model_cfg
    tok = mumoe.load_tokenizer("default")
    text = "def f(x):\n    return x  # naïve 😀"
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_config_spelled_as_source_plus_the_4x_expert_key(tmp_path, arch):
    src = saved_tiny(tmp_path, arch)
    src_cfg = json.loads((src / "config.json").read_text())
    model = mumoe.load(src, "fp32")
    report = mumoe.prune(model, "random", 0.25, seed=0)
    mumoe.save_pruned(model, tmp_path / "out", report)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    n = src_cfg.get(KEY_4X[arch]) or model.config.get_text_config().__dict__.get(KEY_4X[arch])
    kept = {len(x["kept"]) for x in report.layers}
    assert len(kept) == 1
    # a 4.57-style reader: the architecture's own key, read from the file
    assert cfg[KEY_4X[arch]] == kept.pop() < (n or 10**9)
    assert set(src_cfg) <= set(cfg) and set(cfg) - set(src_cfg) <= {KEY_4X[arch]}
    changed = {k for k in src_cfg if cfg[k] != src_cfg[k]}
    assert changed <= {"num_experts", "num_local_experts", "n_routed_experts"}, changed
    assert dtypes(tmp_path / "out") == dtypes(src)  # bf16 (and DeepSeek's fp32 correction bias, as stored)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert sha(tmp_path / "out" / name) == sha(src / name)


def test_streamed_export_keeps_dtype_and_adds_4x_key(tmp_path):
    src = saved_tiny(tmp_path, "qwen3_moe")
    out = tmp_path / "out"
    assert main(["prune", str(src), "--method", "aimer", "--ratio", "0.25", "--out", str(out), "--quiet"]) == 0
    assert dtypes(out) == {"BF16"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == cfg["num_local_experts"] == 6
    assert sha(out / "tokenizer.json") == sha(src / "tokenizer.json")


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "mixtral", "granitemoe", "afmoe", "ernie4_5_moe",
                                  "jamba", "hy_v3", "gpt_oss", "nemotron_h"])
@pytest.mark.parametrize("grain", ["experts", "atoms"])
def test_mumoe_form_loads_with_plain_transformers(tmp_path, arch, grain):
    """The non-uniform forms ship their modelling code: from_pretrained(trust_remote_code=True) gives the
    logits of mumoe.load and of the pruned model in memory."""
    src = saved_tiny(tmp_path, arch, torch.float32)
    model = mumoe.load(src, "fp32")
    x = ids(2, 16, seed=1)
    if grain == "experts":
        if arch in ("deepseek_v3", "nemotron_h"):
            pytest.skip("group-limited routers take uniform budgets only")
        report = mumoe.prune(model, "random", 0.4, budget="global", seed=3)
        assert report.form == "mumoe"
    else:
        report = mumoe.prune(model, "heapr", 0.3, calib=ids(4, 16, seed=2), form="global", nsamples=4, seqlen=16)
        assert report.form == "mumoe-atoms"
    expected = _logits(model, x)
    out = tmp_path / "out"
    mumoe.save_pruned(model, out, report)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MumoeForCausalLM"] and not hasattr(transformers, "MumoeForCausalLM")
    assert (out / "mumoe_modeling.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(plain).__name__ == "MumoeForCausalLM"
    ours = mumoe.load(out, "fp32")
    got, ref = _logits(plain, x), _logits(ours, x)
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert (ref - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
    # the ragged form really stores fewer atoms (not zero-padded)
    if grain == "atoms":
        n_plain = sum(p.numel() for p in plain.parameters())
        assert n_plain < sum(p.numel() for p in ours.parameters())


def test_dtype_auto_rule(tmp_path):
    assert checkpoint_dtype(DEFAULT_MODEL) == torch.bfloat16
    assert compute_dtype("auto", DEFAULT_MODEL, "cpu") == torch.float32  # no half-precision matmuls here
    assert compute_dtype("auto", DEFAULT_MODEL, "cuda") == torch.bfloat16
    assert compute_dtype("fp16", DEFAULT_MODEL, "cpu") == torch.float16
    assert compute_dtype(None, "tiny:qwen3_moe") == torch.float32
    # no dtype in the config: the first floating tensor of the files
    src = saved_tiny(tmp_path, "olmoe", torch.float16)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_dtype(src) == torch.float16


def test_width_multiple(tmp_path):
    """HEAPr's uniform form keeps widths in multiples of --width-multiple (default 64); an old recipe without
    the field replays with the 8 it ran with."""
    from mumoe.recipe import Recipe
    from mumoe.select.atoms import uniform_width

    assert uniform_width(768, 0.25, 64) == 576 and uniform_width(768, 0.25, 256) == 512
    assert uniform_width(256, 0.1, 8) == 232 and uniform_width(256, 0.1, 64) == 256
    assert Recipe.build("heapr", 0.25, calib="domain").atom.width_multiple == 64
    old = Recipe.build("heapr", 0.25, calib="domain").to_dict()
    del old["atom"]["width_multiple"]
    assert Recipe.from_dict(old).atom.width_multiple == 8
    model = make("qwen3_moe", moe_intermediate_size=32)
    report = mumoe.prune(model, "heapr", 0.3, calib=ids(4, 16), nsamples=4, seqlen=16, width_multiple=16)
    assert {e["kept_width"] for e in report.layers} == {16}  # 0.7 * 32 = 22.4 -> 16, not 24 (the multiple of 8)
    assert model.config.moe_intermediate_size == 16
    err = tmp_path / "x"
    assert main(["prune", "--method", "heapr", "--ratio", "0.1", "--calib", "domain", "--out", str(err)]) == 2
    assert not err.exists()  # 10% of 256 rounds to nothing removed at multiples of 64: refused before loading


def test_write_tasks_for_plain_lm_eval(tmp_path, capsys):
    out = tmp_path / "tasks"
    assert main(["eval", "--write-tasks", str(out), "--limit", "7"]) == 0
    said = capsys.readouterr().out
    assert f"--include_path {out.resolve()}" in said
    names = sorted(p.stem for p in out.glob("*.yaml"))
    assert names == ["mumoe_nextline_code", "mumoe_nextline_docs", "mumoe_nextline_kernel", "mumoe_nextline_prose"]
    for name in names:
        yaml = (out / f"{name}.yaml").read_text()
        assert f"test: {out.resolve() / (name + '.jsonl')}" in yaml  # the final place, not the temp folder
        docs = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(docs) == 7 and all(d["choices"][d["label"]] for d in docs)
    assert main(["eval", "--write-tasks", str(out)]) == 2  # an existing folder is not overwritten


def test_trust_remote_code_flag_reaches_transformers(monkeypatch, tmp_path):
    from mumoe.settings import SETTINGS

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    assert main(["info", "--trust-remote-code"]) == 0 and seen[-1] is True
    assert main(["info"]) == 0 and seen[-1] is None
    assert SETTINGS.trust_remote_code is False


def test_plain_lm_eval_cli_reads_a_mumoe_form_export(tmp_path):
    """`lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True` on a per-layer-count export,
    with the tasks `mumoe eval --write-tasks` wrote, scores what the in-process adapter scores on mumoe.load."""
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    from mumoe.eval.harness import run_lm_eval

    out, tasks = tmp_path / "out", tmp_path / "tasks"
    model = mumoe.load("default")
    report = mumoe.prune(model, "frequency", 0.4, calib="domain", budget="global", nsamples=4, seqlen=128,
                         tokenizer=mumoe.load_tokenizer("default"))
    assert report.form == "mumoe"
    mumoe.save_pruned(model, out, report)
    assert main(["eval", "--write-tasks", str(tasks)]) == 0
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={out},trust_remote_code=True,dtype=float32", "--include_path", str(tasks),
                        "--tasks", "mumoe_nextline_code", "--limit", "16", "--batch_size", "8",
                        "--output_path", str(tmp_path / "res")], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(next((tmp_path / "res").rglob("results_*.json")).read_text())["results"]["mumoe_nextline_code"]
    ours = run_lm_eval(mumoe.load(out), mumoe.load_tokenizer(out), ["mumoe_nextline_code"], limit=16)
    assert result["acc,none"] == pytest.approx(ours["mumoe_nextline_code"]["acc"])
    assert result["acc_norm,none"] == pytest.approx(ours["mumoe_nextline_code"]["acc_norm"])
