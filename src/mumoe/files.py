"""Reading the user's files and checking output locations, each failure one line that names the file.

    read_utf8(path)        text, or "PATH: not UTF-8 text (byte N: 0xXX)"
    read_json(path, what)  parsed JSON, or "cannot parse PATH: ... (line L column C)"
    check_writable(out)    the nearest existing folder above `out` accepts a new entry (probed, not guessed)
    owned_temp_dir / sweep_stale   temp folders that record their process, and the clean-up of those a killed
                                   run left behind; stage_folder: such a folder for a run's earlier stages
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import MumoeError, MumoeFileError, os_message

OWNER = ".mumoe-owner"  # inside every temp folder mumoe makes: {"pid", "host", "start"} of the process


def tidy_torch_cache_dir() -> None:
    """`import torch` makes an empty `$TMPDIR/torchinductor_$USER` (its compile cache, which mumoe does not
    use). Called before torch is first imported: when that folder is not there yet, it is removed again at exit
    if it is still empty — a mumoe command leaves no trace in the temp folder."""
    import atexit
    import getpass
    import re
    import sys

    if "torch" in sys.modules or os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}"
    path = Path(tempfile.gettempdir()) / ("torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    if path.exists():
        return
    atexit.register(_remove_empty_tree, path)


def _remove_empty_tree(path: Path) -> None:
    """rmdir `path` and its subfolders, bottom up, if they hold no file at all."""
    try:
        for sub, dirs, files in os.walk(path, topdown=False):
            if files:
                return
            os.rmdir(sub)
    except OSError:
        pass


def read_utf8(path: str | Path) -> str:
    """The file's text; a missing file, a folder or bytes that are not UTF-8 are one-line errors."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as e:
        raise MumoeFileError(f"file not found: {p}", e.errno) from e
    except OSError as e:
        raise MumoeFileError(f"cannot read {p}: {os_message(e)}", e.errno) from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MumoeFileError(f"{p}: not UTF-8 text (byte {e.start}: 0x{data[e.start]:02x}); convert it, e.g. "
                             "iconv -f latin1 -t utf-8") from e


def read_json(path: str | Path, what: str = "") -> object:
    """Parsed JSON of a file; missing, non-UTF-8 or malformed files are one-line errors naming it."""
    p = Path(path)
    text = read_utf8(p)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MumoeFileError(f"cannot parse {what + ' ' if what else ''}{p}: {e.msg} (line {e.lineno} column "
                             f"{e.colno})") from e


def _existing_parent(out: Path) -> Path:
    p = out.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_writable(out: str | Path, flag: str = "--out") -> None:
    """Fail now, in one line, if `out` could not be created: a parent that is a file, a read-only or
    pseudo file system, no permission. Probed by creating and removing a temp folder in the nearest existing
    folder above it."""
    out = Path(out)
    parent = _existing_parent(out.parent)
    if not parent.is_dir():
        raise MumoeFileError(f"cannot write {flag} {out}: {parent} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".mumoe-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise MumoeFileError(f"cannot write {flag} {out}: {os_message(e, path=False)}", e.errno) from e


def check_free_space(out: str | Path, need: int, what: str, flag: str = "--out", thing: str = "the export") -> None:
    """Refuse now when the file system of `out` has fewer than `need` bytes free (`what` says how the need was
    reckoned), rather than failing at the end of a long run."""
    parent = _existing_parent(Path(out).parent)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise MumoeFileError(f"{flag} {out}: {human_bytes(free)} free on its file system, but {thing} needs at "
                             f"least {human_bytes(need)} ({what}); free space or choose another {flag}")


def human_bytes(n: float) -> str:
    """Bytes for people: 1,234 B, 77.4 KiB, 1.6 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a live pid from a reused one."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owned_temp_dir(parent: Path, prefix: str) -> Path:
    """mkdtemp(prefix, dir=parent), recording this process inside so a later run can tell it was killed."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}
        (tmp / OWNER).write_text(json.dumps(me))
    except BaseException:  # a full disk (or Ctrl-C) takes even the note: the folder goes too, nothing is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


@contextmanager
def stage_folder(out: Path) -> Iterator[Path]:
    """A folder of mumoe's own beside `out` for the earlier stages of a run (`.<out>.stages-*`, recording this
    process), removed when the block ends; the folders of a killed run are swept first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.parent, (f".{out.name}.stages-",))
    scratch = owned_temp_dir(out.parent, f".{out.name}.stages-")
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _is_stale(folder: Path, grace_s: float = 600.0) -> bool:
    """True when the process that made `folder` is gone (same host: pid not running, or running with another
    start time). A folder without an owner record is stale once it is older than `grace_s`."""
    try:
        owner = json.loads((folder / OWNER).read_text())
    except (OSError, ValueError):
        import time

        try:
            return time.time() - folder.stat().st_mtime > grace_s
        except OSError:
            return False
    if owner.get("host") != socket.gethostname():
        return False  # another machine on a shared file system: not ours to judge
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return owner.get("start") is not None and _start_time(pid) not in (None, owner.get("start"))


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def sweep_stale(parent: Path, prefixes: tuple[str, ...], say=print) -> list[Path]:
    """Remove the temp folders `prefix*` under `parent` that a killed mumoe run left (see `_is_stale`), saying
    so in one line each. -> the folders removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in sorted(parent.iterdir()):
        if p.is_dir() and not p.is_symlink() and p.name.startswith(prefixes) and _is_stale(p):
            size = _size(p)
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
                if say is not None:
                    say(f"removed {p} ({size / 2**20:,.1f} MiB), left by a run that was killed")
    return removed


def failure_errno(e: BaseException, where: str | Path | None = None) -> int | None:
    """The errno of a write that failed because of the file system (full, read-only, quota, permissions), or
    None when `e` is something else. Knows OSError, safetensors' "(os error N)" and torch.save's "[enforce fail
    at inline_container.cc] ... file write failed" (which carries no errno: reported as a full file system when
    `where`'s has under 1 MiB free, else as an I/O error)."""
    import errno
    import re

    if isinstance(e, MumoeError):
        return None
    if isinstance(e, OSError) and e.errno:
        return e.errno
    if type(e).__name__ == "SafetensorError" and (m := re.search(r"os error (\d+)", str(e))):
        return int(m[1])
    if isinstance(e, RuntimeError) and ("inline_container" in str(e) or "file write failed" in str(e)):
        try:
            full = where is not None and shutil.disk_usage(_existing_parent(Path(where))).free < (1 << 20)
        except OSError:
            full = False
        return errno.ENOSPC if full else errno.EIO
    return None


def write_failure(e: BaseException, where: str | Path, what: str, hint: str) -> MumoeFileError | None:
    """A write that failed because of the file system as one line, "cannot write WHAT: No space left on device
    (HINT)"; None when `e` is something else (`failure_errno`)."""
    n = failure_errno(e, where)
    if n is None:
        return None
    return MumoeFileError(f"cannot write {what}: {os.strerror(n)} ({hint})", n)


def check_new_file(path: str | Path, overwrite: bool, flag: str) -> Path:
    """A file output (`eval --json`): refused when it is a folder, when it exists and `overwrite` is not
    given, or when it could not be created — before any work."""
    p = Path(path)
    if p.is_dir():
        raise MumoeError(f"{flag} {p} is a folder; give a file path")
    if p.exists() and not overwrite:
        raise MumoeError(f"{flag} {p} exists; pass --overwrite to replace it")
    check_writable(p, flag)
    check_free_space(p, SMALL_FILE, "a small JSON file", flag, "the result")
    return p


SMALL_FILE = 64 << 10  # the least free space a report or a JSON result is written with


def write_file_atomic(path: str | Path, data: bytes | str, flag: str) -> Path:
    """Write `data` to `path` through a temp file beside it, renamed into place: a full disk or a kill leaves
    the old file (or none), never a partial one; a failure is one line naming the path and the flag."""
    p = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    parent = p.absolute().parent
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        err = write_failure(e, p, f"{flag} {p}", f"free space there, or choose another {flag}")
        if err is None:
            raise
        raise err from e
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_positive(value, flag: str, low: float = 1, integer: bool = True) -> None:
    """An option that must be a number >= low (None = not given)."""
    if value is None:
        return
    if value < low:
        raise MumoeError(f"{flag} must be {'an integer' if integer else 'a number'} >= {low:g}, got {value:g}")
