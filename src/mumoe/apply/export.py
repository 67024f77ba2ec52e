"""Export: HF checkpoint (safetensors) + pruning.json, written atomically (temp dir, then rename)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import MumoeError, MumoeFileError, os_message
from ..files import OWNER, _umask, check_writable, owned_temp_dir, sweep_stale
from .report import PruneReport, check_report_matches  # noqa: F401  (PruneReport re-exported)


def check_output_dir(out: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    """Refuse an existing output directory unless overwrite; call before any expensive work. source: the model
    the output is made from — an `out` that is its folder, inside it or holding it is refused whatever
    `overwrite` says (the source is never replaced, moved or deleted)."""
    out = Path(out)
    if source is not None and Path(source).exists():
        o, s = out.resolve(), Path(source).resolve()
        if o == s or s in o.parents or o in s.parents:
            raise MumoeError(f"--out {out} would overwrite the source model {source}; choose another directory")
    if out.exists() and not overwrite:
        raise MumoeError(f"output directory {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise MumoeError(f"output path {out} exists and is not a directory")
    check_writable(out)
    return out


def _umask_modes(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask (0755 / 0644 under the usual 022), as mkdir and open give:
    mkdtemp makes 0700 and transformers writes model.safetensors 0600, which a serving user could not read."""
    mask = _umask()
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_output(out: str | Path, overwrite: bool = False, source: str | Path | None = None) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it replaces `out` by rename, on any error it is removed.
    source: the model the output is made from (never replaced; `check_output_dir`)."""
    out = check_output_dir(out, overwrite, source)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out.parent, (f".{out.name}.tmp-", f".{out.name}.old-"))
        tmp = owned_temp_dir(out.parent, f".{out.name}.tmp-")
        yield tmp
        (tmp / OWNER).unlink()
        _umask_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "x")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        io = _io_error(e)
        if io is None:
            raise
        raise MumoeFileError(f"cannot write {out}: {io[0]}; nothing was written", io[1]) from e


def _io_error(e: BaseException) -> tuple[str, int | None] | None:
    """(message, errno) when `e` is the file system failing (disk full, read-only, quota, permissions) — as
    an OSError or as the SafetensorError ("... (os error 28)") safetensors raises for it; else None."""
    from ..files import failure_errno

    n = failure_errno(e) if not isinstance(e, RuntimeError) else None
    if n is None:
        return None
    return os_message(e if isinstance(e, OSError) else OSError(n, os.strerror(n))), n


def save_pruned(model: nn.Module, out: str | Path, report: PruneReport, tokenizer=None, overwrite: bool = False,
                dtype: str | torch.dtype | None = None) -> Path:
    """Write model (+ tokenizer) and pruning.json to `out` atomically, in the report's form (`apply.forms`);
    nothing is left half-written. The export keeps the source's packaging (`apply.packaging`): weights in the
    source checkpoint's dtype unless `dtype` is given ("auto" = the source's), its tokenizer and side files
    byte for byte, its config.json keys with only the pruned values changed. `tokenizer` is saved only when
    the source folder has no tokenizer files (a model built from a config)."""
    from ..source import checkpoint_dtype, parse_dtype
    from .forms import get_form
    from .packaging import copy_side_files, source_folder, stored_as

    if not isinstance(report, PruneReport):
        raise MumoeError(f"save_pruned needs the PruneReport that mumoe.prune returned, got {type(report).__name__}")
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise MumoeError(f"save_pruned takes the pruned transformers model, got {type(model).__name__}")
    check_report_matches(model, report)
    form = get_form(report.form)
    src = source_folder(model)
    if dtype is None or dtype == "auto":
        target = checkpoint_dtype(src) if src is not None else None
    else:
        target = parse_dtype(dtype)
    with atomic_output(out, overwrite, src) as tmp:  # the source folder is never replaced
        with stored_as(model, target):
            form.write(model, tmp, report)
        copied = copy_side_files(src, tmp) if src is not None else []
        if tokenizer is not None and not any(n.startswith("tokenizer") for n in copied):
            tokenizer.save_pretrained(tmp)
        _write_config(model, tmp, src, form, report, target)
        (tmp / "pruning.json").write_text(report.to_json())
    return Path(out)


def _write_config(model: nn.Module, tmp: Path, src: Path | None, form, report: PruneReport,
                  dtype: torch.dtype | None) -> None:
    """config.json in the source's spelling (`packaging.export_config`), plus what the form adds (its
    auto_map and modelling file for the mumoe forms)."""
    from transformers import AutoConfig

    from ..files import read_json
    from ..models.registry import ADAPTERS
    from .packaging import export_config

    if src is not None:
        adapter = ADAPTERS.get(model.config.model_type)
        cfg = export_config(read_json(src / "config.json", "the source config"), AutoConfig.from_pretrained(src),
                            model.config, getattr(adapter, "expert_count_key", None), dtype)
    else:
        cfg = read_json(tmp / "config.json", "the written config")
    if form.package is not None:
        cfg = form.package(cfg, tmp, report)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
