"""The work directory of a resumable layer-sequential run (`--work-dir`): per-layer state and spilled
activations, and the rules that keep it from touching anything mumoe did not write.

A work dir is either new (mumoe creates it, and the folders above it that were missing), an existing empty
folder, or a folder an earlier mumoe run marked as its work dir (`.mumoe-workdir`). Anything else — a folder
holding other files, the source model's folder, a folder inside it or holding it, the `--out` folder — is
refused before any work. When the run ends, mumoe deletes only the files it wrote (its state files, its
activation folders, the mark) and then the folders it created, if they are empty: never a file it did not
write.

A resume continues the same run on the same bytes: the run's key (`fingerprint`) covers the recipe, the
calibration windows and the identity of every source file (`source_identity`: size, mtime, inode, a hash of
the safetensors header and of the first and last bytes of the data). A work dir holding another run's state
is started over, never mixed. State files are loaded with `weights_only=True`: tensors, numbers, strings,
lists, tuples and dicts only, so a file placed there cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import MumoeError

MARK = ".mumoe-workdir"  # {"created": [folders mumoe made, outermost first], "version": 1}
_SAMPLE = 64 << 10  # bytes of the data hashed at each end of a safetensors file


def _related(a: Path, b: Path) -> str | None:
    """How folder a stands to b: "is", "inside" (a under b), "holds" (b under a), else None."""
    a, b = a.resolve(), b.resolve()
    if a == b:
        return "is"
    if b in a.parents:
        return "inside"
    if a in b.parents:
        return "holds"
    return None


def check_work_dir(folder: str | Path, source: str | Path | None = None, out: str | Path | None = None,
                   flag: str = "--work-dir") -> Path:
    """Refuse, in one line and before any work, a work dir mumoe may not use: a file; a folder holding files
    that no mumoe run marked as its own; the source model's folder, one inside it or one holding it; the
    `out` folder, one inside it or one holding it. -> the folder."""
    from ..files import check_writable

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MumoeError(f"{flag} {folder} is a file; give a folder (created if missing)")
    for other, what in ((source, "the source model"), (out, "the --out folder")):
        if other is None or not Path(other).exists() and what == "the source model":
            continue
        rel = _related(folder, Path(other))
        if rel is not None:
            words = {"is": "is", "inside": "is inside", "holds": "holds"}[rel]
            raise MumoeError(f"{flag} {folder} {words} {what} {other}; mumoe deletes its work dir when the run "
                             "ends: give a folder of its own")
    if folder.is_dir() and not (folder / MARK).is_file():
        entries = sorted(p.name for p in folder.iterdir())
        if entries:
            raise MumoeError(f"{flag} {folder} holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
                             f"mumoe did not write (e.g. {entries[0]!r}); give a new or empty folder (mumoe deletes "
                             "its work dir when the run ends)")
    check_writable(folder / "x", flag)
    return folder


def source_identity(path: str | Path) -> list[tuple]:
    """What identifies the bytes of a checkpoint folder without reading its weights: for config.json, the
    index and every safetensors file — name, size, mtime, inode, and a hash of the safetensors header and of
    the first and last 64 KiB of its data."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name in (
        "config.json", "model.safetensors.index.json")))
    ident = []
    for p in files:
        st = p.stat()
        h = hashlib.sha256()
        with open(p, "rb") as f:
            if p.suffix == ".safetensors":
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                h.update(head + f.read(min(n, 100 << 20)))
                h.update(f.read(_SAMPLE))
                f.seek(max(f.tell(), st.st_size - _SAMPLE))
                h.update(f.read())
            else:
                h.update(f.read())
        ident.append((p.name, st.st_size, st.st_mtime_ns, st.st_ino, h.hexdigest()))
    return ident


class WorkDir:
    """Per-layer checkpoints of a sweep: state.pt (finished layer, results, activation files by name) and the
    folder of spilled activations. key: the run's fingerprint; a state of another key is not resumed.
    rank_world: (rank, world size) under torch.distributed — every rank keeps its own state and activations."""

    def __init__(self, folder: str | Path, key: str, say: Callable[[str], None] | None = print,
                 rank_world: tuple[int, int] = (0, 1)) -> None:
        self.folder, self.key, self.say = Path(folder), key, say
        check_work_dir(self.folder)
        missing = []
        p = self.folder.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        mark = self.folder / MARK
        if not mark.exists():
            try:
                with open(mark, "x") as f:  # every rank of a torchrun may get here: the first one writes it
                    json.dump({"created": [str(m) for m in reversed(missing)], "version": 1}, f)
            except FileExistsError:
                pass
        rank, world = rank_world
        self.suffix = f".rank{rank}" if world > 1 else ""  # every rank keeps its own state and activations
        self.state_file = self.folder / f"state{self.suffix}.pt"

    def load(self) -> dict | None:
        """The state of this run, or None (nothing saved, or another run's state: then cleared, and said)."""
        if not self.state_file.exists():
            return None
        try:
            with warnings.catch_warnings():  # a foreign file's pickle protocol: we start over, no warning needed
                warnings.simplefilter("ignore")
                state = torch.load(self.state_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unreadable, truncated, or not a plain-data file
            self._start_over(f"its state file cannot be read ({type(e).__name__})")
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            self._start_over("it holds another run (other checkpoint files, recipe or calibration windows)")
            return None
        acts = {}
        for key, name in state.get("acts", {}).items():
            f = self.acts("acts") / str(name)
            if Path(str(name)).name != str(name) or not f.is_file():
                self._start_over(f"its state names an activation file that is not there ({name})")
                return None
            acts[key] = f
        return {**state, "acts": acts}

    def _start_over(self, why: str) -> None:
        if self.say is not None:
            self.say(f"  --work-dir {self.folder}: {why}; starting over")
        self._clear()

    def _clear(self) -> None:
        """Delete what mumoe writes here (state files, activation folders), nothing else."""
        for p in self.folder.iterdir():
            if p.is_file() and p.name.startswith("state") and p.suffix in (".pt", ".tmp"):
                p.unlink(missing_ok=True)
            elif p.is_dir() and not p.is_symlink() and p.name.startswith("acts"):
                shutil.rmtree(p, ignore_errors=True)

    def save(self, state: dict, after_save: Callable[[dict], None] | None = None) -> None:
        """Write `state` atomically; activation paths are stored by file name, relative to the acts folder."""
        acts = {k: Path(v).name for k, v in state.get("acts", {}).items()}
        tmp = self.state_file.with_suffix(".tmp")
        try:
            torch.save({**state, "acts": acts, "key": self.key}, tmp)
            os.replace(tmp, self.state_file)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            raise _write_error(e, self.folder, "--work-dir") from e
        if after_save is not None:
            after_save(state)

    def acts(self, stage: str) -> Path:
        return self.folder / f"{stage}{self.suffix}"

    def remove(self) -> None:
        """The run finished: delete what mumoe wrote here, then the folders it created if they are empty."""
        if not self.folder.is_dir():
            return
        self._clear()
        mark = self.folder / MARK
        try:
            created = json.loads(mark.read_text()).get("created", [])
        except (OSError, ValueError):
            created = []
        mark.unlink(missing_ok=True)
        for p in [Path(c) for c in reversed(created)]:  # innermost first
            try:
                p.rmdir()  # only if empty: a file someone else put there keeps it
            except OSError:
                break


def _write_error(e: BaseException, where: Path, flag: str) -> BaseException:
    """A failed write as one line naming the folder and the flag (disk full, read-only ...); else e."""
    from ..files import write_failure

    return write_failure(e, where, f"{flag} {where}", f"free space there, or choose another {flag}") or e
