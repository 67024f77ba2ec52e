"""Layer-sequential calibration and streamed export against the whole-model path (the independent computation):
same scores, same kept sets, same exported tensors; resumed = uninterrupted; 2 torchrun ranks = 1 process."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import MOE_ARCHS, SAMPLE_TEXT, char_tokenizer, make, safetensors_of
from mumoe import api
from mumoe.apply.export import save_pruned
from mumoe.criteria import score_methods
from mumoe.criteria.layerwise import score_layerwise
from mumoe.errors import MumoeError
from mumoe.observe.collectors import InputNorms
from mumoe.observe.layerwise import LayerwiseCheckpoint
from mumoe.observe.runner import run
from mumoe.recipe import Recipe
from mumoe.drivers.layerwise import prune_layerwise

CALIBRATED = ["frequency", "gate", "ean", "reap", "easy-ep", "tcess", "peu", "heapr", "heapr-token", "atom-act"]


def windows(n=6, length=16, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def streamed_and_in_memory(src, recipe, tmp_path, wins, info=None):
    """`recipe` run layer by layer from `src` into tmp_path/streamed, and on the loaded model (exported to
    tmp_path/memory) with the same windows -> (streamed report, in-memory report, the pruned model)."""
    report = prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, info or {}), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = api.prune(model, recipe, calib=wins)
    save_pruned(model, tmp_path / "memory", ref)
    return report, ref, model


def saved(arch, path, **kw):
    """A tiny model saved as save_pretrained writes it (per-expert keys), reloaded as the reference."""
    model = make(arch)
    model.save_pretrained(path, **kw)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


tensors = safetensors_of


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_layer_sequential_equals_whole_model(arch, tmp_path):
    whole = saved(arch, tmp_path)
    wins = windows()
    ref = score_methods(whole, CALIBRATED + ["wanda"], wins, batch_size=4)
    got = score_layerwise(LayerwiseCheckpoint(tmp_path, torch.float32), CALIBRATED + ["wanda"], wins, batch_size=4)
    for name in CALIBRATED:
        assert len(got.scores[name]) == len(ref[name])
        for a, b in zip(got.scores[name], ref[name]):
            assert a.shape == b.shape
            assert rel(a, b) <= 1e-6, (arch, name)
    norms = run(whole, wins, [InputNorms(whole)], batch_size=4)[0].result()
    assert set(got.norms) == set(norms)
    for k, v in norms.items():
        assert rel(got.norms[k], v) <= 1e-6, k


def test_fused_and_sharded_layouts_materialise_the_same_weights(tmp_path):
    model = make("qwen3_moe")
    fused, sharded = tmp_path / "fused", tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    fused.mkdir()
    model.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors")
    state = model.state_dict()
    for folder in (fused, sharded):
        ckpt = LayerwiseCheckpoint(folder, torch.float32)
        for name in ckpt.layer_names():
            with ckpt.part(name) as layer:
                for k, v in layer.state_dict().items():
                    assert torch.equal(v, state[f"{name}.{k}"]), (folder.name, k)
            assert all(p.is_meta for p in ckpt.model.get_submodule(name).parameters())  # freed after the block
        s = score_layerwise(ckpt, ["reap"], windows(), batch_size=4).scores["reap"]
        ref = score_methods(model, ["reap"], windows(), batch_size=4)["reap"]
        assert all(rel(a, b) <= 1e-6 for a, b in zip(s, ref))


def test_missing_expert_is_one_line_error(tmp_path):
    model = make("olmoe")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(MumoeError, match="only partly"):  # found from the headers, before any layer is read
        LayerwiseCheckpoint(tmp_path, torch.float32)


@pytest.mark.parametrize("method,opts", [("reap", {}), ("heapr", {"form": "uniform"}), ("wanda", {}),
                                         ("wanda", {"structure": "2:4"}), ("ean", {"order": "progressive"})])
def test_streamed_export_equals_in_memory_export(method, opts, tmp_path):
    src = tmp_path / "src"
    saved("qwen2_moe", src)
    ratio = 0.5 if opts.get("structure") == "2:4" else 0.25
    recipe = Recipe.build(method, ratio, calib="tensor", nsamples=6, seqlen=16, **opts)
    wins = windows()
    report = prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, {"source": "tensor"}), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = api.prune(model, recipe, calib=wins)
    save_pruned(model, tmp_path / "memory", ref)
    if report.grain != "weight":
        assert report.layers == ref.layers  # same kept sets (and scores)
    a, b = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32).eval()
    x = windows(2, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_wanda_progressive_is_the_authors_order(tmp_path):
    """Reference: the slow loop — for each layer, calibrate the whole model whose earlier layers are already
    masked, then mask this layer. Layer 0 equals one-shot; later layers differ from it."""
    from mumoe.apply.masking import apply_masks
    from mumoe.select.weights import masks_from_norms

    src = tmp_path / "src"
    model = saved("qwen3_moe", src)
    wins = windows()
    recipe = Recipe.build("wanda", 0.5, calib="tensor", nsamples=6, seqlen=16, order="progressive")
    prune_layerwise(src, recipe, tmp_path / "seq", (wins, None, {}), verbose=False)
    oneshot = Recipe.build("wanda", 0.5, calib="tensor", nsamples=6, seqlen=16)
    prune_layerwise(src, oneshot, tmp_path / "one", (wins, None, {}), verbose=False)
    for j in range(model.config.num_hidden_layers):
        norms = run(model, wins, [InputNorms(model)], batch_size=8)[0].result()
        mine = {k: v for k, v in norms.items() if k.startswith(f"model.layers.{j}.")}
        apply_masks(model, masks_from_norms(model, mine, 0.5, "row"))
    save_pruned(model, tmp_path / "ref", api.PruneReport("wanda", "weight", 0.5))
    seq, one, ref = tensors(tmp_path / "seq"), tensors(tmp_path / "one"), tensors(tmp_path / "ref")
    for k in ref:
        assert torch.equal(seq[k], ref[k]), k
    layer0 = [k for k in ref if k.startswith("model.layers.0.")]
    layer1 = [k for k in ref if k.startswith("model.layers.1.") and "proj" in k]
    assert all(torch.equal(one[k], seq[k]) for k in layer0)
    assert any(not torch.equal(one[k], seq[k]) for k in layer1)


def test_spilled_activations_give_the_same_scores(tmp_path):
    saved("mixtral", tmp_path)
    wins = windows()
    ram = score_layerwise(LayerwiseCheckpoint(tmp_path, torch.float32), ["reap", "heapr"], wins, batch_size=2)
    disk = score_layerwise(LayerwiseCheckpoint(tmp_path, torch.float32), ["reap", "heapr"], wins, batch_size=2,
                           spill_bytes=0)
    assert disk.info.spilled_bytes > 0 and ram.info.spilled_bytes == 0
    for name in ("reap", "heapr"):
        assert all(torch.equal(a, b) for a, b in zip(ram.scores[name], disk.scores[name]))


# -- the CLI: resume after SIGKILL, torchrun ---------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    src = tmp_path / "src"
    make("qwen3_moe").save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT * 4)
    return src


def prune_cmd(src, out, *extra, method="reap"):
    return [sys.executable, "-m", "mumoe", "prune", str(src), "--method", method, "--ratio", "0.25", "--calib",
            str(src.parent / "calib.txt"), "--nsamples", "8", "--seqlen", "32", "--batch-size", "2",
            "--layerwise", "on", "--out", str(out), *extra]


def killed_after(stage, cmd):
    """cmd (a `python -m mumoe ...` command) SIGKILLed right after the state `stage` is saved (tests/killed.py)."""
    assert cmd[1:3] == ["-m", "mumoe"]
    return [cmd[0], str(Path(__file__).parent / "killed.py"), stage, *cmd[3:]]


def sh(cmd, env=None, timeout=300):
    """Run cmd in its own process group; on a timeout the whole group is killed (torchrun's ranks too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kept_and_scores(folder):
    rep = json.loads((folder / "pruning.json").read_text())
    return [(e.get("kept"), e.get("scores"), e.get("experts"), e.get("groups"), e.get("weights"))
            for e in rep["layers"]]


@pytest.mark.parametrize("method,stage", [("reap", "forward:0"), ("heapr", "backward:1"),
                                          ("heapr", "forward:1"), ("sub-moe", "forward:0"),
                                          ("ream", "forward:0"), ("camera-p", "forward:0")])
def test_killed_and_resumed_equals_uninterrupted(checkpoint, tmp_path, method, stage):
    work, out = tmp_path / "work", tmp_path / "out"
    r = sh(killed_after(stage, prune_cmd(checkpoint, out, "--work-dir", str(work), method=method)))
    assert r.returncode == -9, r.stderr[-2000:]  # SIGKILL, mid-run
    assert not out.exists() and (work / "state.pt").exists()
    r = sh(prune_cmd(checkpoint, out, "--work-dir", str(work), method=method))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed after layer {stage.split(':')[1]}" in r.stdout
    assert not work.exists()  # removed once the run completed
    r = sh(prune_cmd(checkpoint, tmp_path / "plain", method=method))
    assert r.returncode == 0, r.stderr[-2000:]
    assert kept_and_scores(out) == kept_and_scores(tmp_path / "plain")
    a, b = tensors(out), tensors(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in b)


def _replace_weights(src):
    """The checkpoint's files replaced by another model of the same shapes (what a re-download or a fine-tune
    written to the same folder does)."""
    make("qwen3_moe", seed=1).save_pretrained(src)


def _main(cmd, capsys):
    """A prune_cmd run in this process (the CLI's main, no interpreter start-up) -> (exit code, stdout)."""
    from mumoe.cli import main

    capsys.readouterr()
    rc = main(cmd[3:])
    return rc, capsys.readouterr().out


def test_killed_then_checkpoint_replaced_starts_over(checkpoint, tmp_path, capsys):
    """SIGKILL mid-run, the source files replaced, the same --work-dir: the run starts over on the new bytes
    (never "resumed"), and equals a plain run on the new checkpoint."""
    work, out = tmp_path / "work", tmp_path / "out"
    r = sh(killed_after("backward:1", prune_cmd(checkpoint, out, "--work-dir", str(work), method="heapr")))
    assert r.returncode == -9 and (work / "state.pt").exists(), r.stderr[-2000:]
    _replace_weights(checkpoint)
    rc, said = _main(prune_cmd(checkpoint, out, "--work-dir", str(work), method="heapr"), capsys)
    assert rc == 0 and "resumed" not in said and "starting over" in said, said
    assert not work.exists()
    rc, _ = _main(prune_cmd(checkpoint, tmp_path / "plain", method="heapr"), capsys)
    assert rc == 0 and kept_and_scores(out) == kept_and_scores(tmp_path / "plain")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_work_dir_state_is_never_unpickled(checkpoint, tmp_path, capsys):
    """A state.pt in a mumoe work dir that would run code when unpickled (weights_only=False) is not executed:
    the run starts over, and the file the pickle would create never appears."""
    import pickle

    work, out, flag = tmp_path / "work", tmp_path / "out", tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(flag), "w"))

    work.mkdir()
    (work / ".mumoe-workdir").write_text(json.dumps({"created": [str(work)], "version": 1}))
    (work / "state.pt").write_bytes(pickle.dumps({"key": Evil()}))
    rc, said = _main(prune_cmd(checkpoint, out, "--work-dir", str(work)), capsys)
    assert rc == 0 and not flag.exists() and "starting over" in said and "resumed" not in said, said
    assert not work.exists()


def test_work_dir_only_what_mumoe_wrote_is_deleted(checkpoint, tmp_path, capsys):
    """An existing empty folder stays (empty) after the run; folders mumoe created (a/b/c) are removed; a file
    someone adds to a mumoe work dir between a kill and the resume, and the folder holding it, stay."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _main(prune_cmd(checkpoint, tmp_path / "o1", "--work-dir", str(empty)), capsys)[0] == 0
    assert empty.is_dir() and list(empty.iterdir()) == []
    nested = tmp_path / "a" / "b" / "c"
    assert _main(prune_cmd(checkpoint, tmp_path / "o2", "--work-dir", str(nested)), capsys)[0] == 0
    assert not (tmp_path / "a").exists()
    work = tmp_path / "w"
    r = sh(killed_after("forward:0", prune_cmd(checkpoint, tmp_path / "o3", "--work-dir", str(work))))
    assert r.returncode == -9
    (work / "notes.txt").write_text("mine")
    rc, said = _main(prune_cmd(checkpoint, tmp_path / "o3", "--work-dir", str(work)), capsys)
    assert rc == 0 and "resumed after layer 0" in said, said
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"] and (work / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("method", ["ean", "hc-smoe", "ream", "camera-p"])
def test_torchrun_two_ranks_equal_one_process(checkpoint, tmp_path, method):
    if shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")):
        pytest.skip("torchrun not installed")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    one = sh(prune_cmd(checkpoint, tmp_path / "one", method=method))
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = prune_cmd(checkpoint, tmp_path / "two", method=method)
    two = sh([torchrun, "--standalone", "--nproc-per-node", "2", *cmd[1:]],
             env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 ranks" in two.stdout
    a, b = kept_and_scores(tmp_path / "one"), kept_and_scores(tmp_path / "two")
    for (ka, sa, ea, ga, wa), (kb, sb, eb, gb, wb) in zip(a, b):
        assert ka == kb and ga == gb and ea == eb  # the same kept sets / merge groups / kept atoms
        if sa is None and wa is None:  # atoms: the kept sets are the record (CAMERA-P: sums and maxima reduced)
            continue
        pairs = list(zip(sa, sb)) if sa is not None else [(x, y) for u, v in zip(wa, wb) for x, y in zip(u, v)]
        assert max(abs(x - y) / max(abs(y), 1e-30) for x, y in pairs) <= 1e-6


def _refused(cmd, capsys) -> str:
    """A prune_cmd run in this process that must fail: exit 2, one line -> that line."""
    from mumoe.cli import main

    capsys.readouterr()
    rc = main(cmd[3:])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_layerwise_refusals(checkpoint, tmp_path, capsys):
    for extra, msg in ((["--budget", "global", "--order", "progressive"], "progressive scoring needs the uniform"),
                       (["--work-dir", str(tmp_path / "w"), "--layerwise", "off"], "drop it or use --layerwise on")):
        assert msg in _refused(prune_cmd(checkpoint, tmp_path / "o", *extra), capsys)
    assert "needs no calibration" in _refused(prune_cmd(checkpoint, tmp_path / "o", method="random"), capsys)
    assert "local safetensors checkpoint" in _refused(
        [sys.executable, "-m", "mumoe", "prune", "tiny:olmoe", "--method", "reap", "--ratio", "0.25", "--calib",
         str(tmp_path / "calib.txt"), "--seqlen", "16", "--layerwise", "on", "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_task_library_layerwise_equals_whole_model(tmp_path):
    from mumoe.retrieval import build_library

    model = saved("qwen3_moe", tmp_path)
    tasks = {"a": windows(4, 16, seed=1), "b": windows(4, 16, seed=2)}
    ref = build_library(model, tasks, keep=4, progress=False)
    got = build_library(LayerwiseCheckpoint(tmp_path, torch.float32), tasks, keep=4, progress=False)
    assert got.fingerprint == ref.fingerprint and got.tasks == ref.tasks
    for name in tasks:
        assert torch.equal(got.keys[name], ref.keys[name])
        assert all(torch.equal(a, b) for a, b in zip(got.scores[name], ref.scores[name]))
    assert torch.equal(got.whiten, ref.whiten)


def test_loss_gradient_in_chunks_equals_one_piece(tmp_path):
    from mumoe.observe.sequential import _loss_grad

    saved("qwen3_moe", tmp_path)
    ckpt = LayerwiseCheckpoint(tmp_path, torch.float32)
    for name in ckpt.head_names():
        ckpt.materialise(name)
    h = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(0))
    ids = windows(3, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    whole = _loss_grad(ckpt, h, ids, mask)
    chunked = _loss_grad(ckpt, h, ids, mask, logits_bytes=3 * 128 * 4 * 3)  # 3 positions per chunk
    assert float((chunked - whole).abs().max()) <= 1e-6 * float(whole.abs().max()) and whole.abs().sum() > 0
    assert torch.equal(whole[:, -1], torch.zeros_like(whole[:, -1]))  # the last position predicts nothing


def test_read_into_converts_in_chunks_and_refuses_a_truncated_file(tmp_path):
    from mumoe.checkpoint import read_header, read_into

    w = torch.randn(37, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"w": w}, tmp_path / "m.safetensors")
    meta = read_header(tmp_path / "m.safetensors")["w"]
    for chunk in (2, 30, 1 << 20):  # bytes per chunk: many, a few, one
        dst = torch.empty(37, 11)
        assert torch.equal(read_into(tmp_path / "m.safetensors", meta, dst, chunk_bytes=chunk), w.float())
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-100])
    with pytest.raises(MumoeError, match="truncated"):
        read_into(tmp_path / "m.safetensors", meta, torch.empty(37, 11))


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_in_place_expert_slicing_equals_copying(arch):
    from mumoe.apply.experts import slice_layer
    from mumoe.models import moe_adapter_for

    a, b = make(arch), make(arch)
    keep = [0, 2, 3, 5, 6, 7] if arch == "qwen3_moe" else [0, 1, 4, 5]  # deepseek: equal per group
    for model, inplace in ((a, False), (b, True)):
        layer = moe_adapter_for(model).moe_layers()[0]
        slice_layer(layer, keep, inplace=inplace)
    x = windows(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_bundled_model_layerwise_equals_whole_model():
    """The bundled model's own bf16 files, read layer by layer in fp32, against the model loaded whole."""
    from mumoe.loading import DEFAULT_MODEL, load

    model = load("default")
    wins = torch.randint(3, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    names = ["reap", "easy-ep", "heapr", "wanda"]
    ref = score_methods(model, names, wins, batch_size=2)
    got = score_layerwise(LayerwiseCheckpoint(DEFAULT_MODEL, torch.float32), names, wins, batch_size=2)
    for name in ("reap", "easy-ep", "heapr"):
        assert all(rel(a, b) <= 1e-6 for a, b in zip(got.scores[name], ref[name])), name
    norms = run(model, wins, [InputNorms(model)], batch_size=2)[0].result()
    assert all(rel(got.norms[k], v) <= 1e-6 for k, v in norms.items())


def test_out_may_not_be_the_source(checkpoint, tmp_path, capsys):
    before = tensors(checkpoint)
    for out in (checkpoint, checkpoint / "sub", tmp_path):
        for mode in ("on", "off"):
            cmd = prune_cmd(checkpoint, out, "--overwrite")
            cmd[cmd.index("--layerwise") + 1] = mode
            assert "would overwrite the source model" in _refused(cmd, capsys)
    after = tensors(checkpoint)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("arch,method,opts", [("qwen3_moe", "reap", {"budget": "global"}),
                                              ("mixtral", "frequency", {"budget": "global"}),
                                              ("qwen3_moe", "heapr", {"form": "global"}),
                                              ("mixtral", "heapr", {"form": "global", "scope": "layer"})])
def test_streamed_mumoe_forms_reload_like_the_in_memory_export(arch, method, opts, tmp_path):
    """Per-layer expert counts and HEAPr's per-expert widths: mumoe's own forms, written tensor by tensor in the
    source's per-expert layout; mumoe.load gives the in-memory export's logits."""
    from mumoe.loading import load

    src = tmp_path / "src"
    saved(arch, src)
    recipe = Recipe.build(method, 0.25, calib="tensor", nsamples=6, seqlen=16, **opts)
    wins = windows()
    report = prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, {}), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = api.prune(model, recipe, calib=wins)
    save_pruned(model, tmp_path / "memory", ref)
    assert report.layers == ref.layers and report.form == ref.form != "hf"
    a, b = load(tmp_path / "streamed"), load(tmp_path / "memory")
    x = windows(2, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
        assert torch.equal(a(x).logits, model(x).logits)


def test_api_exports_never_replace_the_source(tmp_path):
    src = tmp_path / "src"
    model = saved("olmoe", src)
    before = tensors(src)
    report = api.prune(model, "reap", 0.25, calib=windows())
    with pytest.raises(MumoeError, match="would overwrite the source model"):
        save_pruned(model, src, report, overwrite=True)
    recipe = Recipe.build("reap", 0.25, calib="tensor", nsamples=6, seqlen=16)
    with pytest.raises(MumoeError, match="would overwrite the source model"):
        prune_layerwise(src, recipe, tmp_path, (windows(), None, {}), overwrite=True, verbose=False)
    after = tensors(src)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_multimodal_qwen3_5_moe_checkpoint_layer_by_layer(tmp_path):
    """The released Qwen3.5-MoE checkpoints are multimodal (`model.language_model.*` beside `model.visual.*`):
    layer by layer, REAP keeps the experts the loaded text model keeps; the export keeps the vision tower byte for
    byte, the nested text config's expert count is rewritten, and transformers' multimodal class loads it with
    every key in place, its text model giving the logits of the model pruned in memory; TAER's fingerprint from
    the files equals the loaded model's; mumoe's own forms (global atoms, PMQ) written from it load back."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    import mumoe
    from mumoe.models.tiny import tiny_config

    text = tiny_config("qwen3_5_moe_text")
    cfg = Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text.hidden_size, patch_size=2,
        temporal_patch_size=1, spatial_merge_size=1, in_channels=3))
    torch.manual_seed(0)
    vl = Qwen3_5MoeForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in vl.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)  # spread routing
    vl.save_pretrained(tmp_path / "src")
    wins = windows(4, 16)
    recipe = Recipe.build("reap", 0.25, calib="tensor", nsamples=4, seqlen=16, batch_size=2)
    report = prune_layerwise(tmp_path / "src", recipe, tmp_path / "out", (wins, None, {}), verbose=False)
    model = mumoe.load(tmp_path / "src")
    from mumoe.retrieval.library import model_fingerprint
    from mumoe.retrieval.partial import checkpoint_fingerprint

    assert checkpoint_fingerprint(tmp_path / "src") == model_fingerprint(model)  # TAER reads the same routers
    ref = api.prune(model, recipe, calib=wins)
    assert [e["kept"] for e in report.layers] == [e["kept"] for e in ref.layers]
    src, out = tensors(tmp_path / "src"), tensors(tmp_path / "out")
    visual = [k for k in src if k.startswith("model.visual.")]
    assert visual and all(torch.equal(src[k], out[k]) for k in visual)
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_out["model_type"] == "qwen3_5_moe" and cfg_out["text_config"]["num_experts"] == 6
    back, info = Qwen3_5MoeForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = windows(2, 12, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=x).logits, model(x).logits, rtol=1e-5, atol=1e-5)

    # mumoe's own forms from the same checkpoint (per-expert widths; packed PMQ experts), written layer by layer with
    # the source's spelling, read back by mumoe.load as the text model: the in-memory logits
    from mumoe.drivers.quantize import quantize_layerwise

    atoms = Recipe.build("heapr", 0.3, calib="tensor", nsamples=4, seqlen=16, batch_size=2, form="global")
    assert prune_layerwise(tmp_path / "src", atoms, tmp_path / "atoms", (wins, None, {}), verbose=False).form == \
        "mumoe-atoms"
    quant = quantize_layerwise(str(tmp_path / "src"), str(tmp_path / "quant"), (wins, None, {}), 2.0, group=16,
                               batch_size=2)
    for folder, recipe_or_bits in (("atoms", atoms), ("quant", None)):
        fresh = mumoe.load(tmp_path / "src")
        if recipe_or_bits is None:
            mumoe.quantize(fresh, 2.0, wins, group=16, batch_size=2)
        else:
            api.prune(fresh, recipe_or_bits, calib=wins)
        with torch.no_grad():
            torch.testing.assert_close(mumoe.load(tmp_path / folder)(x).logits, fresh(x).logits, rtol=1e-5,
                                       atol=1e-5)
    assert quant.form == "mumoe-quant"


def test_work_dir_refused_where_layers_carry_state(tmp_path):
    """GLM-5's shared-indexer layers take the top-k positions of the layer before: a resumed sweep would lack
    them, so --work-dir is refused in one line before any layer runs (and nothing is left behind)."""
    from mumoe.models.tiny import tiny_model

    tiny_model("glm_moe_dsa").save_pretrained(tmp_path / "src")
    recipe = Recipe.build("reap", 0.25, calib="tensor", nsamples=4, seqlen=16, batch_size=2)
    with pytest.raises(MumoeError, match="cannot resume glm_moe_dsa") as e:
        prune_layerwise(tmp_path / "src", recipe, tmp_path / "out", (windows(4, 16), None, {}), verbose=False,
                        work_dir=tmp_path / "work")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
