"""What the process may still allocate (`mumoe.memlimit`): cgroup v2 and v1 file layouts built by hand (a
hand-worked answer for each), then a real cgroup-v1 memory cgroup on this machine (root only: skipped
elsewhere) whose limit the reader must see."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mumoe.memlimit import available_memory, cgroup_available, mem_available

G = 1 << 30


def _write(root: Path, rel: str, **files) -> None:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", ".", 1)).write_text(str(text))


def test_v2_min_over_the_cgroup_and_its_ancestors(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/job-7\n")
    root = tmp_path / "fs"
    _write(root, "", cgroup_controllers="memory cpu")
    _write(root, "user.slice", memory_max=4 * G, memory_current=3 * G, memory_stat="anon 1\ninactive_file 0\n")
    _write(root, "user.slice/job-7", memory_max=2 * G, memory_current=G // 2,
           memory_stat=f"anon 1\ninactive_file {G // 4}\n")
    # job: 2 G - (0.5 G - 0.25 G cache) = 1.75 G; parent: 4 G - 3 G = 1 G  -> 1 G
    assert cgroup_available(proc, root) == G


def test_v2_no_limit_is_none(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a\n")
    root = tmp_path / "fs"
    _write(root, "", cgroup_controllers="memory")
    _write(root, "a", memory_max="max", memory_current=G)
    assert cgroup_available(proc, root) is None


def test_v2_mounted_beside_v1_under_unified(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:cpu:/\n0::/j\n")
    root = tmp_path / "fs"
    _write(root / "unified", "j", memory_max=3 * G, memory_current=G)
    assert cgroup_available(proc, root) == 2 * G


def test_v1_hierarchy_and_unlimited_root(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("9:name=systemd:/\n4:memory:/slurm/job_1\n3:cpuset:/\n0::/\n")
    root = tmp_path / "fs"
    _write(root / "memory", "", memory_limit_in_bytes=9223372036854771712, memory_usage_in_bytes=10 * G)
    _write(root / "memory", "slurm", memory_limit_in_bytes=8 * G, memory_usage_in_bytes=G)
    _write(root / "memory", "slurm/job_1", memory_limit_in_bytes=G + G // 2, memory_usage_in_bytes=G,
           memory_stat=f"cache 5\ntotal_inactive_file {G // 2}\n")
    # job: 1.5 G - (1 G - 0.5 G) = 1 G; slurm: 7 G; root: unlimited
    assert cgroup_available(proc, root) == G


def test_v1_container_sees_its_cgroup_at_the_root(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("5:memory:/docker/0123abcd\n")  # the host's path; inside, the mount root is the container's
    root = tmp_path / "fs"
    _write(root / "memory", "", memory_limit_in_bytes=2 * G, memory_usage_in_bytes=G // 2)
    assert cgroup_available(proc, root) == 2 * G - G // 2


def test_unreadable_is_none_and_meminfo(tmp_path):
    assert cgroup_available(tmp_path / "nope", tmp_path) is None
    (tmp_path / "meminfo").write_text("MemTotal:  100 kB\nMemFree: 10 kB\nMemAvailable:   2048 kB\n")
    assert mem_available(tmp_path / "meminfo") == 2048 * 1024


def test_a_real_v1_memory_cgroup_is_seen(tmp_path):
    """A child process in a memory cgroup capped at 512 MiB: available_memory() is below the cap and above the
    cap less what the interpreter with torch imported uses; the machine's MemAvailable alone says more."""
    base = Path("/sys/fs/cgroup/memory")
    if not (base / "cgroup.procs").exists():
        pytest.skip("no cgroup-v1 memory controller here")
    group = base / f"mumoe-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup ({e}); needs root")
    try:
        cap = 512 << 20
        (group / "memory.limit_in_bytes").write_text(str(cap))
        code = "from mumoe.memlimit import available_memory, mem_available; print(available_memory(), mem_available())"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        avail, machine = map(int, r.stdout.split())
        assert cap // 4 < avail <= cap, avail
        assert machine > cap
    finally:
        group.rmdir()


def test_available_memory_is_at_most_meminfo():
    a, m = available_memory(), mem_available()
    assert a is not None and m is not None and a <= m
