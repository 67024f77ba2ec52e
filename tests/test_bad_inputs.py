"""Every bad input and fault ends in one `mumoe: error:` line and exit 2, with nothing written and the source
untouched: a table of cases run through the real CLI entry point (`mumoe.cli.main`), plus the API's errors.

Each CLI case asserts: exit code 2; exactly one stderr line, `mumoe: error: ...` containing the expected words;
no traceback; the output path absent; no temp litter beside it; every source model file byte-identical
(sha256 before/after). Cases marked early must fail before any model weights are read (the loaders are
replaced by a tripwire)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SAMPLE_TEXT, char_tokenizer, make
from mumoe.cli import main
from mumoe.paths import DEFAULT_MODEL

BUNDLED = str(DEFAULT_MODEL)


# ---------------------------------------------------------------- fixtures: a tiny checkpoint and its variants


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny qwen3_moe checkpoint (+ char tokenizer), corrupted copies of it, texts, a task library."""
    root = tmp_path_factory.mktemp("bad")
    good = root / "good"
    make("qwen3_moe").save_pretrained(good)
    char_tokenizer().save_pretrained(good)
    (root / "calib.txt").write_text(SAMPLE_TEXT)
    (root / "empty.txt").write_text("\n \n")
    (root / "short.txt").write_text("hi")
    (root / "latin1.txt").write_bytes(b"It was the best of times, " + "café".encode("latin-1") + b" et cetera\n")
    (root / "emptydir").mkdir()
    (root / "userdir").mkdir()
    (root / "userdir" / "thesis.tex").write_text("a user's own file")
    (root / "bad.json").write_text('{"rows": [1, 2,')
    (root / "latin1.json").write_bytes(b'{"rows": [], "title": "caf\xe9"}')
    (root / "file").write_text("a file, not a folder")
    (root / "recipe_bad.json").write_text("{not json")
    weights = good / "model.safetensors"
    variants = {
        "truncated": lambda d: _truncate(d / "model.safetensors"),
        "random": lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)),
        "huge_header": lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}"),
        "nan": lambda d: _poison(d, float("nan")),
        "inf": lambda d: _poison(d, float("inf")),
        "int_dtype": lambda d: _int_weights(d),
        "bad_config": lambda d: (d / "config.json").write_text('{"model_type": "qwen3_moe",'),
        "unknown_type": lambda d: _edit_config(d, model_type="nosuch_moe"),
        "no_config": lambda d: (d / "config.json").unlink(),
        "missing_shard": lambda d: _index_missing_shard(d),
        "no_weights": lambda d: (d / "model.safetensors").unlink(),
        "missing_tensor": lambda d: _drop_tensor(d, "model.layers.1.self_attn.q_proj.weight"),
        "wrong_shape": lambda d: _reshape_tensor(d, "model.layers.0.self_attn.o_proj.weight"),
        "fewer_layers": lambda d: _edit_config(d, num_hidden_layers=1),
        "fewer_experts": lambda d: _edit_config(d, num_local_experts=4),
        "no_tokenizer": lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
        "bad_tokenizer": lambda d: (d / "tokenizer.json").write_text("{not a tokenizer"),
        "duplicated_tensor": lambda d: _duplicate_tensor(d, "model.layers.0.self_attn.o_proj.weight"),
        "latin1_config": lambda d: (d / "config.json").write_bytes(b'{"model_type": "qwen3_moe", "x": "\xe9"}'),
    }
    for name, edit in variants.items():
        shutil.copytree(good, root / name)
        edit(root / name)
    assert weights.exists()
    os.mkfifo(root / "fifo")
    recipe = json.loads(json.dumps({"method": "reap", "ratio": 0.5, "calib": {"sources": str(root / "nope.txt"),
                                                                            "nsamples": 4, "seqlen": 16}}))
    (root / "recipe_string_sources.json").write_text(json.dumps(recipe))
    lib = root / "lib"
    assert main(["taer", "build", str(good), "--task", f"a={root / 'calib.txt'}", "--task",
                 f"b={root / 'calib.txt'}", "--keep", "4", "--nsamples", "2", "--seqlen", "16", "--out",
                 str(lib)]) == 0
    for name, edit in {"lib_truncated": lambda d: _truncate(next(d.glob("*.safetensors"))),
                       "lib_missing": lambda d: next(d.glob("*.safetensors")).unlink(),
                       "lib_badjson": lambda d: (d / "library.json").write_text("{")}.items():
        shutil.copytree(lib, root / name)
        edit(root / name)
    return root


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _poison(d: Path, value: float) -> None:
    f = d / "model.safetensors"
    t = load_file(f)
    key = next(k for k in sorted(t) if "layers.1.mlp.experts" in k and "down" in k)
    t[key] = t[key].clone()
    t[key].view(-1)[7] = value
    save_file(t, f, metadata={"format": "pt"})


def _drop_tensor(d: Path, key: str) -> None:
    t = load_file(d / "model.safetensors")
    del t[key]
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def _reshape_tensor(d: Path, key: str) -> None:
    t = load_file(d / "model.safetensors")
    t[key] = t[key][:, :-8].contiguous()
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def _duplicate_tensor(d: Path, key: str) -> None:
    """A second shard that holds one tensor of the first again (a stale shard of an earlier download)."""
    t = load_file(d / "model.safetensors")
    other = "model.norm.weight"  # in the second shard only (the index names it there)
    save_file({k: v for k, v in t.items() if k != other}, d / "model-00001-of-00002.safetensors",
              metadata={"format": "pt"})
    save_file({key: t[key], other: t[other]}, d / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    wm = {k: "model-00001-of-00002.safetensors" for k in t}
    wm[other] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _int_weights(d: Path) -> None:
    f = d / "model.safetensors"
    t = load_file(f)
    key = next(k for k in sorted(t) if "layers.0.mlp.experts" in k)
    t[key] = (t[key] * 100).to(torch.int32)
    save_file(t, f, metadata={"format": "pt"})


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _index_missing_shard(d: Path) -> None:
    t = load_file(d / "model.safetensors")
    keys = sorted(t)
    half = len(keys) // 2
    save_file({k: t[k] for k in keys[:half]}, d / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    wm = {k: "model-00001-of-00002.safetensors" for k in keys[:half]}
    wm.update({k: "model-00002-of-00002.safetensors" for k in keys[half:]})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the table

T = "{tiny}"
CAL = ["--calib", "{w}/calib.txt", "--nsamples", "4", "--seqlen", "16"]
OUT = ["--out", "{out}"]


def prune(model, *args, calib=True):
    return ["prune", model, *(CAL if calib else []), *args, *OUT]  # later flags win


# (id, argv, words the one line must contain, early: fails before any weights are read)
CASES = [
    # arguments
    ("nsamples-0", prune(T, "--method", "reap", "--ratio", "0.5", "--nsamples", "0"), "nsamples", True),
    ("nsamples-negative", prune(T, "--method", "reap", "--ratio", "0.5", "--nsamples", "-3"), "nsamples", True),
    ("seqlen-1", prune(T, "--method", "reap", "--ratio", "0.5", "--seqlen", "1"), "seqlen", True),
    ("seqlen-beyond-context", prune(T, "--method", "reap", "--ratio", "0.5", "--seqlen", "4096"),
     "context", True),
    ("batch-size-0", prune(T, "--method", "reap", "--ratio", "0.5", "--batch-size", "0"), "batch", True),
    ("ratio-1", prune(T, "--method", "reap", "--ratio", "1.0"), "ratio must be in [0, 1)", True),
    ("ratio-negative", prune(T, "--method", "reap", "--ratio", "-0.1"), "ratio must be in [0, 1)", True),
    ("ratio-nan", prune(T, "--method", "reap", "--ratio", "nan"), "ratio", True),
    ("ratio-not-a-number", prune(T, "--method", "reap", "--ratio", "half"), "--ratio", True),
    ("ratio-removes-no-expert", prune(T, "--method", "reap", "--ratio", "0.01"), "removes nothing", True),
    ("ratio-removes-no-expert-streamed", prune(T, "--method", "aimer", "--ratio", "0.01", calib=False),
     "removes nothing", True),
    ("ratio-leaves-fewer-than-top-k", prune(T, "--method", "reap", "--ratio", "0.9"), "top_k", True),
    ("unknown-method", prune(T, "--method", "bogus", "--ratio", "0.5"), "unknown method 'bogus'", True),
    ("missing-method", ["prune", T, "--ratio", "0.5", *OUT], "--method", True),
    ("wanda-2:4-with-other-ratio", prune(T, "--method", "wanda", "--structure", "2:4", "--ratio", "0.3"),
     "2:4", True),
    ("bad-structure", prune(T, "--method", "wanda", "--structure", "5:4", "--ratio", "0.5"), "structure", True),
    ("structure-on-expert-method", prune(T, "--method", "reap", "--structure", "2:4", "--ratio", "0.5"),
     "structure", True),
    ("heapr-ratio-beyond-widths", prune(T, "--method", "heapr", "--ratio", "0.99"), "0.99", True),
    ("unknown-device", prune(T, "--method", "reap", "--ratio", "0.5", "--device", "tpu"), "device", True),
    ("cuda-without-gpu", prune(T, "--method", "reap", "--ratio", "0.5", "--device", "cuda"), "cuda", True),
    ("spill-negative", prune(T, "--method", "reap", "--ratio", "0.5", "--spill-gb", "-1"), "spill", True),
    ("work-dir-is-a-file", prune(T, "--method", "reap", "--ratio", "0.5", "--work-dir", "{w}/calib.txt"),
     "work-dir", True),
    ("work-dir-holds-user-files", prune(T, "--method", "reap", "--ratio", "0.5", "--work-dir", "{w}/userdir"),
     "mumoe did not write", True),
    ("work-dir-is-the-source", prune(T, "--method", "reap", "--ratio", "0.5", "--work-dir", "{tiny}"),
     "is the source model", True),
    ("work-dir-inside-the-source", prune(T, "--method", "reap", "--ratio", "0.5", "--work-dir", "{tiny}/w"),
     "is inside the source model", True),
    ("work-dir-holds-the-source", prune(T, "--method", "reap", "--ratio", "0.5", "--work-dir", "{w}"),
     "holds the source model", True),
    ("work-dir-is-out", prune(T, "--method", "reap", "--ratio", "0.5", "--work-dir", "{out}"),
     "is the --out folder", True),
    ("work-dir-holds-out", prune(T, "--method", "reap", "--ratio", "0.5", "--work-dir", "{out}/.."),
     "holds the --out folder", True),
    ("recipe-missing", ["prune", "--recipe", "{w}/nope.json", *OUT], "not found", True),
    ("recipe-garbled", ["prune", "--recipe", "{w}/recipe_bad.json", *OUT], "recipe_bad.json", True),
    ("dense-model-expert-method", prune("tiny:llama", "--method", "reap", "--ratio", "0.5"), "dense", True),
    ("tiny-unknown-arch", prune("tiny:gpt2", "--method", "random", "--ratio", "0.5", calib=False),
     "no tiny config", True),
    # calibration and evaluation texts
    ("calib-missing", ["prune", T, "--method", "reap", "--ratio", "0.5", "--calib", "{w}/nope.txt", *OUT],
     "not found", True),
    ("calib-empty", ["prune", T, "--method", "reap", "--ratio", "0.5", "--calib", "{w}/empty.txt", "--seqlen", "16",
                    *OUT],
     "empty", True),
    ("calib-empty-folder", ["prune", T, "--method", "reap", "--ratio", "0.5", "--calib", "{w}/emptydir", "--seqlen", "16",
                    *OUT],
     "no .txt", True),
    ("calib-not-utf8", ["prune", T, "--method", "reap", "--ratio", "0.5", "--calib", "{w}/latin1.txt", "--seqlen", "16",
                    *OUT],
     "latin1.txt: not UTF-8 text (byte 29: 0xe9)", True),
    ("calib-shorter-than-a-window", ["prune", T, "--method", "reap", "--ratio", "0.5", "--calib", "{w}/short.txt",
                                     "--seqlen", "16", *OUT], "fewer than one window", True),
    ("calib-is-a-fifo", ["prune", T, "--method", "reap", "--ratio", "0.5", "--calib", "{w}/fifo", "--seqlen", "16",
                         *OUT], "not a regular file", True),
    ("calib-is-dev-null", ["prune", T, "--method", "reap", "--ratio", "0.5", "--calib", "/dev/null", "--seqlen",
                           "16", *OUT], "not a regular file", True),
    ("text-calib-without-tokenizer", prune("{w}/no_tokenizer", "--method", "reap", "--ratio", "0.5"),
     "this model has none (no tokenizer.json", True),
    ("tokenizer-corrupt", prune("{w}/bad_tokenizer", "--method", "reap", "--ratio", "0.5"),
     "cannot load the tokenizer of", True),
    ("tensor-in-two-shards", prune("{w}/duplicated_tensor", "--method", "reap", "--ratio", "0.5"),
     "model.layers.0.self_attn.o_proj.weight is stored twice", True),
    ("recipe-sources-as-a-string", ["prune", "--recipe", "{w}/recipe_string_sources.json", *OUT],
     "nope.txt", True),
    ("needs-calib", ["prune", T, "--method", "reap", "--ratio", "0.5", *OUT], "calibration", True),
    ("ppl-not-utf8", ["eval", T, "--ppl", "{w}/latin1.txt", "--json", "{out}"], "not UTF-8", True),
    ("ppl-missing", ["eval", T, "--ppl", "{w}/nope.txt", "--json", "{out}"], "not found", True),
    ("ppl-shorter-than-a-window", ["eval", T, "--ppl", "{w}/short.txt", "--seqlen", "16", "--json", "{out}"],
     "fewer than one window", False),
    ("eval-nothing", ["eval", T], "nothing to evaluate", True),
    ("eval-seqlen-0", ["eval", T, "--ppl", "{w}/calib.txt", "--seqlen", "0", "--json", "{out}"], "seqlen", True),
    ("eval-batch-0", ["eval", T, "--ppl", "{w}/calib.txt", "--batch-size", "0", "--json", "{out}"], "batch", True),
    ("eval-max-windows-0", ["eval", T, "--ppl", "{w}/calib.txt", "--max-windows", "0", "--json", "{out}"],
     "max-windows", True),
    ("eval-json-unwritable", ["eval", T, "--ppl", "{w}/calib.txt", "--seqlen", "16", "--json",
                              "{w}/file/r.json"], "--json", True),
    ("eval-json-exists", ["eval", T, "--ppl", "{w}/calib.txt", "--seqlen", "16", "--json", "{w}/calib.txt"],
     "exists; pass --overwrite", True),
    ("testtime-active-0", ["eval", T, "--ppl", "{w}/calib.txt", "--testtime", "--active", "0", "--json", "{out}"],
     "active", True),
    ("report-not-utf8", ["report", "{w}/latin1.json", *OUT], "not UTF-8", True),
    ("report-garbled", ["report", "{w}/bad.json", *OUT], "bad.json", True),
    ("report-missing", ["report", "{w}/nope.json", *OUT], "not found", True),
    # the model files
    ("info-model-missing", ["info", "{w}/nope"], "model not found", True),
    ("model-is-a-file", prune("{w}/calib.txt", "--method", "reap", "--ratio", "0.5"), "is a file", True),
    ("model-missing", prune("{w}/nope", "--method", "reap", "--ratio", "0.5"), "model not found", True),
    ("model-no-config", prune("{w}/no_config", "--method", "reap", "--ratio", "0.5"), "no config.json", True),
    ("config-garbled", prune("{w}/bad_config", "--method", "reap", "--ratio", "0.5"), "config.json", True),
    ("config-garbled-streamed", prune("{w}/bad_config", "--method", "aimer", "--ratio", "0.5", calib=False),
     "config.json", True),
    ("config-not-utf8", prune("{w}/latin1_config", "--method", "reap", "--ratio", "0.5"), "config.json", True),
    ("config-unknown-type", prune("{w}/unknown_type", "--method", "reap", "--ratio", "0.5"), "nosuch_moe", True),
    ("weights-missing", prune("{w}/no_weights", "--method", "reap", "--ratio", "0.5"), "holds no weights", True),
    ("weights-missing-streamed", prune("{w}/no_weights", "--method", "aimer", "--ratio", "0.5", calib=False),
     "holds no weights", True),
    ("report-out-is-a-file", ["report", "{w}/bad.json", "--out", "{w}/file"], "is a file", True),
    ("shard-missing", prune("{w}/missing_shard", "--method", "reap", "--ratio", "0.5"),
     "model-00002-of-00002.safetensors", True),
    ("safetensors-truncated", prune("{w}/truncated", "--method", "reap", "--ratio", "0.5"), "truncated", True),
    ("safetensors-truncated-streamed", prune("{w}/truncated", "--method", "aimer", "--ratio", "0.5",
                                             calib=False), "truncated", True),
    ("safetensors-random-bytes", prune("{w}/random", "--method", "reap", "--ratio", "0.5"), "safetensors", True),
    ("safetensors-random-streamed", prune("{w}/random", "--method", "aimer", "--ratio", "0.5", calib=False),
     "safetensors", True),
    ("safetensors-huge-header", prune("{w}/huge_header", "--method", "reap", "--ratio", "0.5"), "header", True),
    ("tensor-missing", prune("{w}/missing_tensor", "--method", "reap", "--ratio", "0.5"),
     "model.layers.1.self_attn.q_proj.weight", False),
    ("tensor-missing-layerwise", prune("{w}/missing_tensor", "--method", "reap", "--ratio", "0.5", "--layerwise",
                                       "on"), "model.layers.1.self_attn.q_proj.weight", True),
    ("tensor-missing-streamed", prune("{w}/missing_tensor", "--method", "aimer", "--ratio", "0.5", calib=False),
     "model.layers.1.self_attn.q_proj.weight", True),
    ("tensor-wrong-shape", prune("{w}/wrong_shape", "--method", "reap", "--ratio", "0.5"),
     "model.layers.0.self_attn.o_proj.weight", False),
    ("tensor-wrong-shape-layerwise", prune("{w}/wrong_shape", "--method", "reap", "--ratio", "0.5", "--layerwise",
                                           "on"), "model.layers.0.self_attn.o_proj.weight", True),
    ("config-fewer-layers", prune("{w}/fewer_layers", "--method", "reap", "--ratio", "0.5"),
     "belong to no layer config.json declares (it says num_hidden_layers 1)", True),
    ("config-fewer-layers-layerwise", prune("{w}/fewer_layers", "--method", "reap", "--ratio", "0.5", "--layerwise",
                                            "on"), "num_hidden_layers 1", True),
    ("config-fewer-layers-streamed", prune("{w}/fewer_layers", "--method", "aimer", "--ratio", "0.5", calib=False),
     "num_hidden_layers 1", True),
    ("config-fewer-experts", prune("{w}/fewer_experts", "--method", "reap", "--ratio", "0.25"),
     "belong to no expert config.json declares (it says num_experts 4)", True),
    ("config-fewer-experts-layerwise", prune("{w}/fewer_experts", "--method", "reap", "--ratio", "0.25",
                                             "--layerwise", "on"), "num_experts 4", True),
    ("config-fewer-experts-streamed", prune("{w}/fewer_experts", "--method", "aimer", "--ratio", "0.25",
                                            calib=False), "num_experts 4", True),
    ("config-fewer-layers-eval", ["eval", "{w}/fewer_layers", "--ppl", "{w}/calib.txt", "--seqlen", "16"],
     "num_hidden_layers 1", True),
    ("weights-int-dtype", prune("{w}/int_dtype", "--method", "reap", "--ratio", "0.5"), "I32", True),
    ("weights-nan", prune("{w}/nan", "--method", "reap", "--ratio", "0.5"), "NaN", False),
    ("weights-nan-layerwise", prune("{w}/nan", "--method", "reap", "--ratio", "0.5", "--layerwise", "on"),
     "NaN", False),
    ("weights-inf-streamed", prune("{w}/inf", "--method", "aimer", "--ratio", "0.5", calib=False), "inf", False),
    ("weights-nan-eval", ["eval", "{w}/nan", "--ppl", "{w}/calib.txt", "--seqlen", "16", "--json", "{out}"],
     "NaN", False),
    # the output location
    ("out-is-a-file", ["prune", T, "--method", "reap", "--ratio", "0.5", *CAL, "--out", "{w}/file",
                       "--overwrite"], "not a directory", True),
    ("out-exists", ["prune", T, "--method", "reap", "--ratio", "0.5", *CAL, "--out", "{w}/emptydir"],
     "--overwrite", True),
    ("out-is-the-source", prune("{w}/good", "--method", "reap", "--ratio", "0.5")[:-1] + ["{w}/good",
                                                                                        "--overwrite"],
     "source model", True),
    ("out-inside-the-source", prune("{w}/good", "--method", "reap", "--ratio", "0.5")[:-1] + ["{w}/good/sub"],
     "source model", True),
    ("out-under-a-file", ["prune", T, "--method", "reap", "--ratio", "0.5", *CAL, "--out", "{w}/file/x"],
     "cannot write", True),
    ("out-in-proc", ["prune", T, "--method", "reap", "--ratio", "0.5", *CAL, "--out", "/proc/mumoe-out"],
     "cannot write", True),
    ("demo-out-is-a-file", ["demo", "--out", "{w}/file"], "not a directory", True),
    ("compare-out-exists", ["compare", T, "--methods", "reap", "--calib", "{w}/calib.txt", "--out", "{w}/emptydir"],
     "--overwrite", True),
    # generation and task libraries
    ("generate-active-0", ["generate", "--prompt", "hello", "--active", "0"], "active", True),
    ("generate-active-above-1", ["generate", "--prompt", "hello", "--active", "1.5"], "active", True),
    ("generate-negative-tokens", ["generate", "--prompt", "hello", "--max-new-tokens", "-1"], "max-new-tokens",
     True),
    ("generate-empty-prompt", ["generate", "--prompt", "  "], "empty prompt", True),
    ("generate-beyond-context", ["generate", "--prompt", "hello", "--max-new-tokens", "100000"],
     "maximum context length is 512 tokens", True),
    ("generate-prompt-beyond-context", ["generate", "--prompt", "a b c d " * 400], "lower --max-new-tokens", True),
    ("generate-bad-structure", ["generate", "--prompt", "hello", "--structure", "9:4"], "structure", True),
    ("compare-unknown-method", ["compare", T, "--methods", "reap,bogus"], "unknown method 'bogus'", True),
    ("compare-ratio-1.5", ["compare", T, "--methods", "reap", "--ratio", "1.5"], "ratio", True),
    ("taer-keep-below-top-k", ["taer", "build", "{w}/good", "--task", "a={w}/calib.txt", "--keep", "1", *OUT],
     "top_k", True),
    ("taer-keep-above-experts", ["taer", "build", "{w}/good", "--task", "a={w}/calib.txt", "--keep", "99", *OUT],
     "experts", True),
    ("taer-bad-task-spec", ["taer", "build", "{w}/good", "--task", "nameonly", "--keep", "4", *OUT], "NAME=PATH",
     True),
    ("taer-task-not-utf8", ["taer", "build", "{w}/good", "--task", "a={w}/latin1.txt", "--keep", "4", *OUT],
     "not UTF-8", True),
    ("taer-library-missing", ["taer", "match", "{w}/good", "{w}/nolib", "--prompt", "hello"], "not found", True),
    ("taer-library-json-garbled", ["taer", "match", "{w}/good", "{w}/lib_badjson", "--prompt", "hello"],
     "library.json", True),
    # per-token skipping and PMQ (MC#)
    ("skip-beyond-1", ["eval", T, "--ppl", "{w}/calib.txt", "--skip", "1.5"], "--skip must be in [0, 1)", True),
    ("skipper-file-missing", ["eval", T, "--ppl", "{w}/calib.txt", "--skip", "0.2", "--skipper", "{w}/none.st"],
     "--skipper", True),
    ("skipper-without-skip", ["generate", T, "--prompt", "hi", "--skipper", "{w}/calib.txt"],
     "--skipper needs --skip", True),
    ("train-skipper-into-the-model", ["train-skipper", "{tiny}", *CAL, "--out", "{tiny}/skipper.safetensors"],
     "inside the model folder", True),
    ("train-skipper-steps-0", ["train-skipper", T, *CAL, "--steps", "0", "--out", "{out}"], "--steps", True),
    ("train-skipper-lambda-negative", ["train-skipper", T, *CAL, "--lam", "-1", "--out", "{out}"], "--lam", True),
    ("then-pmq-not-last", prune(T, "--method", "reap", "--ratio", "0.25", "--then", "pmq:2.5", "--then",
                                "wanda:0.5"), "as the last stage", True),
    ("then-pmq-without-bits", prune(T, "--method", "reap", "--ratio", "0.25", "--then", "pmq"),
     "give the average bits", True),
    ("taer-library-tensors-missing", ["taer", "match", "{w}/good", "{w}/lib_missing", "--prompt", "hello"],
     ".safetensors", True),
    ("taer-library-tensors-truncated", ["taer", "match", "{w}/good", "{w}/lib_truncated", "--prompt", "hello"],
     "truncated", True),
]


class Tripwire(Exception):
    pass


@pytest.fixture
def tripwire(monkeypatch):
    """Loading weights raises: an early case that gets this far was not validated up front."""
    import transformers

    from mumoe import loading
    from mumoe.observe import layerwise

    def trip(*a, **k):
        raise Tripwire("model weights were read before the bad input was detected")

    monkeypatch.setattr(loading, "load", trip)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", trip)
    monkeypatch.setattr(layerwise.LayerwiseCheckpoint, "materialise", trip)


@pytest.mark.parametrize("case, argv, words, early", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, tmp_path, capsys, request, case, argv, words, early):
    out = tmp_path / "out"
    argv = [a.replace("{tiny}", str(world / "good")).replace("{w}", str(world)).replace("{out}", str(out))
            for a in argv]
    sources = [Path(BUNDLED)] + sorted(p for p in world.iterdir() if p.is_dir())
    before = {str(s): _tree_hash(s) for s in sources}
    listing = {p.name for p in world.iterdir()}
    if early:
        request.getfixturevalue("tripwire")
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("mumoe: error: "), err
    assert words in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert {p.name for p in world.iterdir()} == listing  # nothing new beside the sources (no temp litter)
    assert list(tmp_path.iterdir()) == []
    assert {str(s): _tree_hash(s) for s in sources} == before


def test_case_count():
    assert len(CASES) >= 40


def test_subprocess_one_line(tmp_path):
    """The console entry point itself: one line, exit 2, no traceback (what a shell user sees)."""
    (tmp_path / "latin1.txt").write_bytes(b"abc\xff\xfe")
    r = subprocess.run([sys.executable, "-m", "mumoe", "prune", "tiny:olmoe", "--method", "reap", "--ratio", "0.5",
                        "--calib", str(tmp_path / "latin1.txt"), "--seqlen", "16", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"mumoe: error: {tmp_path / 'latin1.txt'}: not UTF-8 text (byte 3: "
                                             "0xff); convert it, e.g. iconv -f latin1 -t utf-8"]


# ---------------------------------------------------------------- the Python API: the same errors, as exceptions

def _api_cases(world, tmp_path):
    import mumoe
    from mumoe import api
    from mumoe.apply.export import save_pruned

    model = make("qwen3_moe")
    good = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "out"
    nan_model = make("qwen3_moe")
    with torch.no_grad():
        nan_model.model.layers[0].mlp.experts.down_proj[0, 0, 0] = float("nan")
    with torch.device("meta"):
        meta_model = make("qwen3_moe")
    twice = make("qwen3_moe")
    first = mumoe.prune(twice, "aimer", 0.25)
    mumoe.prune(twice, "aimer", 0.2)
    other_report = mumoe.prune(make("qwen3_moe"), "aimer", 0.5)
    return [
        ("meta-model", lambda: mumoe.prune(meta_model, "aimer", 0.5), ValueError, "on the meta device"),
        ("meta-model-score", lambda: mumoe.score(meta_model, "aimer"), ValueError, "on the meta device"),
        ("save-an-earlier-stage-report", lambda: save_pruned(twice, out, first), ValueError, "earlier stage"),
        ("save-another-models-report", lambda: save_pruned(make("qwen3_moe"), out, other_report), ValueError,
         "another model's report"),
        ("ratio-string", lambda: mumoe.prune(model, "aimer", "abc"), ValueError, "ratio must be a number"),
        ("ratio-none", lambda: mumoe.prune(model, "aimer", None), ValueError, "ratio is required"),
        ("model-is-a-path", lambda: mumoe.prune(str(world / "good"), "aimer", 0.5), ValueError, "mumoe.load"),
        ("model-not-a-model", lambda: mumoe.prune(object(), "aimer", 0.5), ValueError, "causal LM"),
        ("calib-empty-tensor", lambda: mumoe.prune(model, "reap", 0.5, calib=torch.empty(0, 16, dtype=torch.long)),
         ValueError, "holds no tokens"),
        ("calib-ids-beyond-vocab", lambda: mumoe.prune(model, "reap", 0.5, calib=good + 1000), ValueError,
         "outside the model's vocabulary"),
        ("calib-float-tensor", lambda: mumoe.prune(model, "reap", 0.5, calib=good.float()), ValueError,
         "integer token ids"),
        ("unknown-option", lambda: mumoe.prune(model, "reap", 0.5, calib=good, bogus=1), ValueError,
         "unknown option"),
        ("save-without-report", lambda: save_pruned(model, out, None), ValueError, "PruneReport"),
        ("score-unknown-method", lambda: mumoe.score(model, "nosuch"), ValueError, "unknown method"),
        ("load-missing", lambda: mumoe.load(str(world / "nope")), OSError, "model not found"),
        ("load-truncated", lambda: mumoe.load(str(world / "truncated")), OSError, "truncated"),
        ("load-nan", lambda: mumoe.load(str(world / "nan")), ValueError, "NaN"),
        ("nan-weights-give-nan-scores", lambda: api.score(nan_model, "reap", calib=good), ValueError,
         "not finite"),
        ("library-missing", lambda: mumoe.retrieval.TaskLibrary.load(world / "nolib"), OSError, "not found"),
    ]


API_IDS = ["meta-model", "meta-model-score", "save-an-earlier-stage-report", "save-another-models-report",
           "ratio-string", "ratio-none", "model-is-a-path", "model-not-a-model", "calib-empty-tensor",
           "calib-ids-beyond-vocab", "calib-float-tensor", "unknown-option", "save-without-report",
           "score-unknown-method", "load-missing", "load-truncated", "load-nan", "nan-weights-give-nan-scores",
           "library-missing"]


@pytest.mark.parametrize("case", API_IDS)
def test_api_raises_mumoe_errors(world, tmp_path, case):
    import mumoe.retrieval  # noqa: F401
    from mumoe.errors import MumoeError

    cases = {c[0]: c[1:] for c in _api_cases(world, tmp_path)}
    assert sorted(cases) == sorted(API_IDS)
    call, base, words = cases[case]
    with pytest.raises(MumoeError) as info:
        call()
    assert isinstance(info.value, base), type(info.value).__mro__
    assert words in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
