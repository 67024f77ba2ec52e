"""How much memory this process may still use: the smaller of the machine's MemAvailable and what its memory
cgroup leaves (a container's or a Slurm job's limit), cgroup v2 (`memory.max`) or v1
(`memory.limit_in_bytes`), every ancestor cgroup included. Used by `--layerwise auto` to decide whether the
model fits; MemAvailable alone sees the whole machine and sends a capped job into the OOM killer.

    available_memory()                 bytes, or None when nothing can be read (not Linux)
    cgroup_available(proc, root)       what the cgroup leaves, from the given /proc/self/cgroup and mount root
    return_freed_memory()              glibc: tensors above 64 KiB mapped on their own, so a freed layer's
                                       memory goes back to the OS at once
"""

from __future__ import annotations

from pathlib import Path

UNLIMITED = 1 << 60  # v1 writes "no limit" as 9223372036854771712; anything this large is no limit


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        n = int(text)
    except ValueError:
        return None
    return None if n >= UNLIMITED else n


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _chain(base: Path, rel: str) -> list[Path]:
    """The cgroup's folder and its ancestors up to the mount root, innermost first. When the process's cgroup
    path is not under the mount (a container sees its own cgroup as the root), the root alone."""
    folder = base / rel.strip("/")
    if not folder.is_dir():
        return [base] if base.is_dir() else []
    out = [folder]
    while folder != base:
        folder = folder.parent
        out.append(folder)
    return out


def cgroup_available(proc: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> int | None:
    """Bytes the memory cgroup of this process leaves free — min over it and its ancestors of limit minus
    working set (usage less inactive file cache, which the kernel reclaims before it kills) — or None when no
    limit is set or nothing can be read. Reads cgroup v2 (`0::/path`, memory.max / memory.current) and v1
    (`N:memory:/path`, memory.limit_in_bytes / memory.usage_in_bytes)."""
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    best: int | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, rel = parts
        if "memory" in controllers.split(","):  # v1
            base = root / "memory" if (root / "memory").is_dir() else root
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        elif hier == "0" and controllers == "":  # v2 (unified; mounted at the root or at root/unified)
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            files = ("memory.max", "memory.current", "inactive_file")
        else:
            continue
        for folder in _chain(base, rel):
            limit = _read_int(folder / files[0])
            if limit is None:
                continue
            used = _read_int(folder / files[1]) or 0
            used = max(0, used - _stat(folder / "memory.stat", files[2]))
            left = max(0, limit - used)
            best = left if best is None else min(best, left)
    return best


def mem_available(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """The kernel's MemAvailable in bytes (None when it cannot be read)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """What this process may still allocate: min(MemAvailable, what its memory cgroup leaves)."""
    values = [v for v in (mem_available(), cgroup_available()) if v is not None]
    return min(values) if values else None


_MALLOPT_DONE = [False]


def return_freed_memory(threshold: int = 64 << 10) -> bool:
    """Make glibc serve every allocation above `threshold` bytes with its own mapping, returned to the OS when
    freed (mallopt M_MMAP_THRESHOLD; a fixed value also stops glibc from raising the threshold after each large
    free, which otherwise keeps freed layers' pages in the heap). The layer-sequential path frees a whole decoder
    layer per step: measured on a 3.3 GB checkpoint under a 1100 MiB cgroup, the calibration's anonymous peak
    fell from 1,085 to 980 MiB (benchmarks/default_flags_memory.py). It costs speed (every large allocation is
    a fresh mapping, its pages faulted in again) and lasts for the process, so `mumoe prune` sets it only when
    the model does not fit in the memory it may use; from Python, call it yourself. Same as
    MALLOC_MMAP_THRESHOLD_=65536; an explicit MALLOC_MMAP_THRESHOLD_ in the environment wins. -> True when
    applied (glibc only)."""
    import ctypes
    import ctypes.util
    import os

    if _MALLOPT_DONE[0] or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _MALLOPT_DONE[0]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False
    _MALLOPT_DONE[0] = ok
    return ok
