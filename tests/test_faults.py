"""Faults outside the input: a full disk, a read-only file system, runs killed by SIGINT or SIGKILL (the OOM
killer's signal) during calibration and during export, and what the next run does with what they left.

Real file systems (tmpfs mounts, root only: skipped elsewhere) and real signals to a real `python -m mumoe`
process on a ~1 GB synthetic checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import SAMPLE_TEXT, char_tokenizer, make
from mumoe.cli import main


def _mount(path: Path, *opts: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); needs root")


@pytest.fixture
def small(tmp_path):
    """A tiny qwen3_moe checkpoint with a tokenizer, and a calibration text."""
    src = tmp_path / "src"
    make("qwen3_moe").save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    return src


@pytest.fixture
def mounted(tmp_path):
    mounts = []

    def mount(name, *opts):
        p = tmp_path / name
        _mount(p, *opts)
        mounts.append(p)
        return p

    yield mount
    for p in mounts:
        subprocess.run(["umount", str(p)], capture_output=True)


PATHS = {  # the three ways an export is written
    "in-memory": ["--method", "reap", "--calib", "{calib}", "--seqlen", "16", "--nsamples", "4"],
    "streamed-aimer": ["--method", "aimer"],
    "layerwise": ["--method", "reap", "--calib", "{calib}", "--seqlen", "16", "--nsamples", "4", "--layerwise", "on"],
}


def _prune(src, out, path, calib):
    return ["prune", str(src), "--ratio", "0.5", "--out", str(out),
            *[a.replace("{calib}", str(calib)) for a in PATHS[path]]]


def _allocated(folder: Path) -> int:
    """Bytes a tmpfs charges for a folder's files (whole 4 KiB pages each)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.rglob("*") if f.is_file())


@pytest.mark.parametrize("path", list(PATHS))
def test_disk_full_during_export_ends_in_one_line_with_nothing_left(small, tmp_path, mounted, capsys, path):
    """Free space above the early bound ((1 - ratio) of the weights) but below what the export writes: the
    failure comes mid-write, and still ends in one line with nothing left on the disk."""
    import shutil

    calib = tmp_path / "calib.txt"
    assert main(_prune(small, tmp_path / "ref", path, calib)) == 0  # the same export, where space is plenty
    written = _allocated(tmp_path / "ref") + 4096  # + the temp folder's owner note
    bound = 0.5 * sum(f.stat().st_size for f in small.glob("*.safetensors"))
    assert written - bound > 16384, (written, bound)  # room for a fill between the two
    full = mounted("full", "size=1m")
    free = shutil.disk_usage(full).free
    (full / "filler").write_bytes(b"\0" * (int(free - (bound + written) / 2) // 4096 * 4096))
    capsys.readouterr()
    rc = main(_prune(small, full / "out", path, calib))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"mumoe: error: cannot write {full / 'out'}: No space left on device"), err
    assert err[0].endswith("nothing was written")
    assert [p.name for p in full.iterdir()] == ["filler"]  # no temp folder, no partial shard


def test_disk_too_small_is_refused_before_any_work(small, tmp_path, mounted, capsys, monkeypatch):
    full = mounted("small", "size=48k")  # the export needs at least half the tiny checkpoint's 166 kB
    from mumoe import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("model loaded before the free-space check"))
    rc = main(_prune(small, full / "out", "in-memory", tmp_path / "calib.txt"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "free on its file system, but the export needs at least" in err[0], err
    assert list(full.iterdir()) == []


def test_read_only_file_system_is_refused_before_any_work(small, tmp_path, mounted, capsys, monkeypatch):
    ro = mounted("ro", "ro,size=1m")
    from mumoe import loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("model loaded before the --out check"))
    rc = main(_prune(small, ro / "out", "in-memory", tmp_path / "calib.txt"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"mumoe: error: cannot write --out {ro / 'out'}: Read-only file system (a read-only "
                               "file system; choose another --out)"]


def test_export_permissions_are_those_of_save_pretrained(small, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(_prune(small, tmp_path / "out", "in-memory", tmp_path / "calib.txt")) == 0
        (tmp_path / "ref").mkdir()  # what a plain mkdir/save_pretrained gives under this umask
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "ref").stat().st_mode) == 0o755
    assert not (tmp_path / "out" / ".mumoe-owner").exists()
    for f in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_of_a_killed_run_is_removed_live_one_kept(small, tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    (stale / ".mumoe-owner").write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename,
                                                     "start": None}))
    live = tmp_path / ".out.tmp-running"  # another process, still running, writing to the same target
    live.mkdir()
    (live / ".mumoe-owner").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                    "start": Path(f"/proc/{os.getpid()}/stat").read_text()
                                                   .rsplit(")", 1)[1].split()[19]}))
    other = tmp_path / ".other.tmp-x"  # another target's: not ours to touch
    other.mkdir()
    assert main(_prune(small, out, "in-memory", tmp_path / "calib.txt")) == 0
    said = capsys.readouterr().out
    assert f"removed {stale} (0.0 MiB), left by a run that was killed" in said
    assert not stale.exists() and live.exists() and other.exists() and out.is_dir()


# ---------------------------------------------------------------- kill tests on a ~1 GB checkpoint


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A qwen3_moe checkpoint of 0.95 GB in bf16 (9 layers x 32 experts of 1024 x 512), fused expert tensors,
    written tensor by tensor (never a whole model in memory), plus a char tokenizer and a calibration text."""
    from transformers import AutoModelForCausalLM

    from mumoe.checkpoint import read_header
    from mumoe.models.tiny import tiny_config

    root = tmp_path_factory.mktemp("big")
    src = root / "src"
    src.mkdir()
    cfg = tiny_config("qwen3_moe", hidden_size=1024, moe_intermediate_size=512, intermediate_size=1024,
                      num_experts=32, num_hidden_layers=9, num_attention_heads=16, num_key_value_heads=4,
                      head_dim=64, max_position_embeddings=512)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    shard, n, size = {}, 1, 0
    for name, p in skeleton.state_dict().items():
        t = (torch.ones(p.shape) if name.endswith("norm.weight") else
             torch.randn(p.shape, generator=gen) * (0.5 / math.sqrt(p.shape[-1])))
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size > 256 << 20:
            save_file(shard, src / f"part-{n}.safetensors", metadata={"format": "pt"})
            shard, n, size = {}, n + 1, 0
    if shard:
        save_file(shard, src / f"part-{n}.safetensors", metadata={"format": "pt"})
    weight_map = {k: f.name for f in sorted(src.glob("*.safetensors")) for k in read_header(f)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    (root / "calib.txt").write_text(SAMPLE_TEXT * 8)
    total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert 0.85e9 < total < 1.1e9, total
    return root


def _cmd(big, out, *extra):
    return [sys.executable, "-m", "mumoe", "prune", str(big / "src"), "--method", "reap", "--ratio", "0.25",
           "--calib", str(big / "calib.txt"), "--nsamples", "8", "--seqlen", "64", "--out",
           str(out), *extra]


def _interruptible() -> None:
    """In the child: Ctrl-C as a terminal delivers it. A suite started in the background of a non-interactive
    shell inherits SIGINT ignored, and Python then never installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(big, out, *extra, env=None):
    return subprocess.Popen(_cmd(big, out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=_interruptible)


def _wait_for_line(proc, words: str, timeout: float = 240) -> None:
    t0 = time.time()
    for line in proc.stdout:
        if words in line:
            return
        assert time.time() - t0 < timeout, f"no line with {words!r}"
    pytest.fail(f"process ended before printing {words!r}: {proc.wait()} {proc.stderr.read()}")


def _wait_for_export(parent: Path, name: str, timeout: float = 240) -> Path:
    """The moment the export's temp folder holds bytes of a shard being written."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        for tmp in parent.glob(f".{name}.tmp-*"):
            try:  # transformers writes the shard under a temporary name, then renames it
                if any(f.name != ".mumoe-owner" and f.stat().st_size > 0 for f in tmp.iterdir()):
                    return tmp
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    pytest.fail("the export never started")


def _litter(*folders: Path) -> list[str]:
    return sorted(p.name for f in folders if f.exists() for p in f.iterdir()
                  if p.name.startswith((".out.tmp-", ".out.old-", "mumoe-act-")))


def _source_state(big):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (big / "src").iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_during_calibration(big, tmp_path, sig):
    """Layer-sequential with every activation spilled to disk (--spill-gb 0): a kill mid-sweep. SIGINT: exit
    130, nothing left. SIGKILL: the spill folder stays behind, and the next run removes it and succeeds."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "out"
    before = _source_state(big)
    env = {"TMPDIR": str(scratch)}
    proc = _start(big, out, "--layerwise", "on", "--spill-gb", "0", env=env)
    _wait_for_line(proc, "calibration:")
    t0 = time.time()
    while not list(scratch.glob("mumoe-act-*/*.pt")) and time.time() - t0 < 120:
        time.sleep(0.01)  # activations are on disk: the sweep is running
    proc.send_signal(sig)
    rc = proc.wait(120)
    err = proc.stderr.read()
    assert not out.exists() and _source_state(big) == before
    if sig == signal.SIGINT:
        assert rc == 130 and err.strip().splitlines()[-1] == "mumoe: interrupted" and "Traceback" not in err
        assert _litter(scratch, tmp_path) == []
        return
    assert rc == -signal.SIGKILL and len(_litter(scratch)) == 1  # what a kill leaves
    r = subprocess.run(_cmd(big, out, "--layerwise", "on", "--spill-gb", "0"), capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    assert "left by a run that was killed" in r.stdout
    assert _litter(scratch, tmp_path) == [] and (out / "pruning.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_killed_during_export(big, tmp_path, sig):
    """A kill while the pruned shards are being written. SIGINT / SIGTERM: exit 130 / 143, the temp folder
    removed. SIGKILL:
    the temp folder stays (no process is left to remove it); the next run to the same --out removes it, says
    so, and writes a checkpoint that loads."""
    out = tmp_path / "out"
    before = _source_state(big)
    proc = _start(big, out)
    _wait_for_line(proc, "calibration:")
    _wait_for_export(tmp_path, "out")
    proc.send_signal(sig)
    rc = proc.wait(120)
    err = proc.stderr.read()
    assert not out.exists() and _source_state(big) == before
    if sig != signal.SIGKILL:
        code, said = (130, "mumoe: interrupted") if sig == signal.SIGINT else (143, "mumoe: terminated")
        assert rc == code and err.strip().splitlines()[-1] == said and "Traceback" not in err
        assert _litter(tmp_path) == []
        return
    assert rc == -signal.SIGKILL and len(_litter(tmp_path)) == 1
    r = subprocess.run(proc.args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "left by a run that was killed" in r.stdout
    assert _litter(tmp_path) == [] and _source_state(big) == before
    report = json.loads((out / "pruning.json").read_text())
    assert [len(e["kept"]) for e in report["layers"]] == [24] * 9


def _in_memory_cgroup(cap: int):
    """A fresh cgroup-v1 memory cgroup capped at `cap` bytes (swap too where offered) -> (preexec_fn that moves
    the child into it, the folder); skipped where none can be made (not root, no v1 memory controller)."""
    base = Path("/sys/fs/cgroup/memory")
    group = base / f"mumoe-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup here ({e}); needs root and cgroup v1")
    (group / "memory.limit_in_bytes").write_text(str(cap))
    if (group / "memory.memsw.limit_in_bytes").exists():
        (group / "memory.memsw.limit_in_bytes").write_text(str(cap))
    return (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))), group


def test_default_flags_complete_under_a_memory_cgroup(big, tmp_path):
    """The 0.95 GB bf16 checkpoint (1.9 GB in fp32, the CPU's load dtype) pruned with the default flags inside
    a memory cgroup of 1 GiB, as a container or a Slurm job gives: `--layerwise auto` must see the cgroup's
    limit (MemAvailable sees the whole machine and sends the run into the OOM killer), and the streamed export
    must stay under it too (buffering a shard would not)."""
    enter, group = _in_memory_cgroup(1 << 30)
    try:
        out = tmp_path / "out"
        r = subprocess.run(_cmd(big, out), capture_output=True, text=True, preexec_fn=enter, timeout=600)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        fails = int((group / "memory.failcnt").read_text())
    finally:
        group.rmdir()
    assert r.returncode == 0, (r.returncode, fails, r.stderr[-2000:])
    assert "pruning layer by layer (--layerwise auto" in r.stdout, r.stdout
    assert peak <= 1 << 30
    report = json.loads((out / "pruning.json").read_text())
    assert [len(e["kept"]) for e in report["layers"]] == [24] * 9


@pytest.mark.parametrize("size, words", [("4k", "cannot write activations to"),
                                         ("20k", "the calibration activations need about")],
                         ids=["full-at-first-spill", "too-small-for-the-sweep"])
def test_spill_to_a_full_disk_is_one_line_and_leaves_nothing(small, tmp_path, mounted, capsys, monkeypatch, size,
                                                            words):
    """Activations spilled (--spill-gb 0) to a TMPDIR on a tiny file system: the first spill fails (4k), or the
    free space cannot hold the sweep's two layers of activations and the run refuses before layer 0 (20k).
    Either way one line naming the place and what to do, exit 2, no partial file, nothing at --out."""
    import tempfile

    scratch = mounted("tmp", f"size={size}")
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    out = tmp_path / "out"
    rc = main(_prune(small, out, "layerwise", tmp_path / "calib.txt") + ["--spill-gb", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0], err
    assert "--spill-gb" in err[0] and "TMPDIR" in err[0]
    assert list(scratch.iterdir()) == [] and not out.exists()


def _fill(folder: Path, leave: int) -> None:
    import shutil

    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(0, (free - leave) // 4096 * 4096))


@pytest.mark.parametrize("command", ["taer-build", "compare", "eval-json"])
def test_full_disk_for_small_outputs_is_refused_before_the_work(small, tmp_path, mounted, capsys, monkeypatch,
                                                                command):
    """`taer build --out`, `compare --out` and `eval --json` on a file system with a few KiB free: refused
    before the model is read, in one line naming the path and the flag; nothing left beside the filler (no
    `.NAME.tmp-*`, no 0-byte file)."""
    from mumoe import loading

    full = mounted("full", "size=256k")
    _fill(full, 8192)
    calib = str(tmp_path / "calib.txt")
    argv = {"taer-build": ["taer", "build", str(small), "--task", f"a={calib}", "--keep", "4", "--nsamples", "2",
                           "--seqlen", "16", "--out", str(full / "lib")],
            "compare": ["compare", str(small), "--methods", "reap", "--calib", calib, "--nsamples", "2", "--seqlen",
                        "16", "--out", str(full / "cmp")],
            "eval-json": ["eval", str(small), "--ppl", calib, "--seqlen", "16", "--json", str(full / "r.json")]}[command]
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("model loaded before the free-space check"))
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    flag = "--json" if command == "eval-json" else "--out"
    assert rc == 2 and len(err) == 1 and f"{flag} {full}" in err[0] and "free on its file system" in err[0], err
    assert [p.name for p in full.iterdir()] == ["filler"]


def test_full_disk_mid_write_of_a_small_output_leaves_nothing(small, tmp_path, mounted, capsys, monkeypatch):
    """The free-space bound passed, then the disk filled (another process): the temp folder of `taer build`,
    owner note included, is removed and the message names the path."""
    from mumoe import files

    full = mounted("full", "size=256k")
    monkeypatch.setattr(files, "check_free_space", lambda *a, **k: None)  # the bound passed...
    _fill(full, 0)  # ...then the disk filled
    rc = main(["taer", "build", str(small), "--task", f"a={tmp_path / 'calib.txt'}", "--keep", "4", "--nsamples",
               "2", "--seqlen", "16", "--out", str(full / "lib")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(full / "lib") in err[0], err
    assert [p.name for p in full.iterdir()] == ["filler"]


def test_work_dir_on_a_full_disk_is_one_line_and_leaves_nothing(small, tmp_path, mounted, capsys):
    """`--work-dir` on a file system too small for the sweep's activations: one line naming the place, exit 2,
    and the work dir mumoe created is removed again (no layer finished: nothing worth resuming)."""
    full = mounted("full", "size=20k")
    out = tmp_path / "out"
    rc = main(_prune(small, out, "layerwise", tmp_path / "calib.txt") + ["--work-dir", str(full / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(full / "w") in err[0], err
    assert "activations" in err[0] and "--work-dir" in err[0]
    assert list(full.iterdir()) == [] and not out.exists()
