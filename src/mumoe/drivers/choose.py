"""Which driver runs a recipe on a checkpoint folder, chosen by the library: the files driver for methods that
score from the files alone, the layer-sequential driver when asked or when the model would not fit in the memory
this process may use, else the in-memory driver (load, prune, save)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import MumoeError


def too_big(model_name: str, dtype: str | None, device: str | None = None, factor: float = 0.8,
            say: Callable[[str], None] | None = None) -> bool:
    """True when the model in its load dtype would not fit in `factor` x the memory this process may use (the
    cgroup's limit too: a container, a Slurm job; `memlimit`). say: where the reason goes, when it is True."""
    from ..checkpoint import shard_files
    from ..files import human_bytes
    from ..memlimit import available_memory
    from ..observe.layerwise import source_dtype
    from .inputs import load_dtype

    size = sum(f.stat().st_size for f in shard_files(Path(model_name)))
    size = size * load_dtype(dtype, model_name, device).itemsize / source_dtype(model_name).itemsize
    avail = available_memory()
    if avail is None or size <= factor * avail:
        return False
    if say is not None:
        say(f"the model ({human_bytes(size)} in its load dtype) does not fit in 80% of the {human_bytes(avail)} this "
            "process may use: pruning layer by layer (--layerwise auto; --layerwise off to load it whole)")
    return True


def check_export_space(out: str | Path, name: str, recipe) -> None:
    """A lower bound on the export's size — the checkpoint's weights, each in the smaller of its file dtype and
    the load dtype, times (1 - ratio) of every stage (no grain removes more than its ratio of them) — against the
    free space at `out`, so a full disk is found before the run, not after it."""
    import math

    from ..checkpoint import DTYPES, read_header, shard_files
    from ..files import check_free_space, human_bytes
    from ..loading import resolve
    from .inputs import load_dtype

    path = Path(resolve(name))
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        return
    load = load_dtype(recipe.dtype, str(path), recipe.device).itemsize
    need = sum(math.prod(m["shape"]) * min(DTYPES[m["dtype"]].itemsize, load)
               for f in shard_files(path) for m in read_header(f).values() if m["dtype"] in DTYPES)
    kept = math.prod(1 - st.ratio for st in recipe.stages)
    check_free_space(out, int(kept * need), f"{kept:.0%} of the checkpoint's {human_bytes(need)} of weights")


def local_checkpoint(model: str) -> bool:
    """A local folder of safetensors files that is not a mumoe export (not a tiny model, not a hub id)."""
    from ..loading import resolve

    try:
        p = Path(resolve(model))
    except MumoeError:
        return False
    return p.is_dir() and any(p.glob("*.safetensors")) and not (p / "pruning.json").exists()


def use_layerwise(path: str, recipe, layerwise, work_dir=None, say: Callable[[str], None] | None = None) -> bool:
    """layerwise True / False, or "auto": the layer-sequential driver when the model in its load dtype would not
    fit in 80% of the memory available now (and every stage calibrates, on a local safetensors checkpoint).
    work_dir asks for the resumable layer-sequential driver."""
    from ..criteria import get_method
    from ..observe.layerwise import is_layerwise_source
    from .layerwise import check_layerwise

    if layerwise not in (True, False, "auto"):
        raise MumoeError(f"layerwise must be True, False or 'auto', got {layerwise!r}")
    if layerwise is False:
        if work_dir:
            raise MumoeError("--work-dir resumes the layer-sequential path; drop it or use --layerwise on")
        return False
    local = is_layerwise_source(path) and local_checkpoint(path)
    if layerwise == "auto":  # --work-dir asks for the resumable path; otherwise only when the model would not fit
        calibrated = all(get_method(st.method).needs_calib for st in recipe.stages)
        if not work_dir and not (local and calibrated and too_big(path, recipe.dtype, recipe.device, say=say)):
            return False
    if not local:
        raise MumoeError(f"the layer-sequential path (--layerwise, --work-dir) reads a local safetensors checkpoint "
                         f"folder; {path} is not one")
    check_layerwise(recipe)
    return True


def prune_path(name: str, recipe, out: str | Path, *, layerwise="auto", work_dir: str | Path | None = None,
               overwrite: bool = False, stream_files: bool = True, tokenizer=None, windows: tuple | None = None,
               verbose: bool = True, say: Callable[[str], None] | None = None,
               spill_bytes: int = 8 << 30) -> tuple:
    """Run `recipe` on the model `name` (a checkpoint folder, a hub id, 'default', 'tiny:ARCH') and write the
    pruned checkpoint to `out`, with the driver this run needs (module docstring). -> (report, driver name).
    stream_files=False: never the files driver (load the model instead). windows: the calibration prepared
    already (`inputs.calibration`); else it is cut here, before any weight is read."""
    import time

    from ..apply.export import save_pruned
    from ..grains import get_grain
    from ..loading import load_tokenizer, resolve
    from .files import prune_files, runs_from_files
    from .inputs import calib_line, calibration, load_model, model_config
    from .memory import prune_loaded

    say = say or (lambda line: None)
    t0 = time.perf_counter()
    path = resolve(name)
    check_export_space(out, name, recipe)
    if stream_files and layerwise is not True and not work_dir and runs_from_files(recipe) and local_checkpoint(name):
        say(f"pruning {recipe.describe()}, streamed from the checkpoint files")
        return prune_files(path, recipe, out, overwrite, progress=True, verbose=verbose), "files"
    config = model_config(name)
    notes = get_grain(recipe.grain).notes(recipe, config) if config is not None else []
    if tokenizer is None:
        tokenizer = load_tokenizer(name)  # the calibration windows are cut before the weights are read
    sequential = use_layerwise(path, recipe, layerwise, work_dir, say)
    if windows is None:
        windows = calibration(recipe, None, tokenizer) if recipe.calib.sources else (None, None, {})
    if sequential:
        return _prune_layerwise(path, recipe, out, windows, notes, overwrite, work_dir, verbose, say,
                                spill_bytes), "layerwise"
    model = load_model(name, recipe.dtype, recipe.device)
    say(f"loaded {name} in {time.perf_counter() - t0:.1f}s; pruning {recipe.describe()}"
        + (f" on {recipe.device}" if recipe.device not in (None, "cpu") else ""))
    for line in notes:
        say(line)
    if windows[0] is not None:
        say(calib_line(recipe, windows))
    report = prune_loaded(model, recipe, windows, verbose=verbose, source=name, say=say)
    save_pruned(model, out, report, tokenizer, overwrite=overwrite, dtype=recipe.dtype)
    return report, "memory"


def _prune_layerwise(path: str, recipe, out, windows, notes: list[str], overwrite: bool, work_dir, verbose: bool,
                     say: Callable[[str], None], spill_bytes: int):
    """The layer-sequential driver, under torchrun on every rank (rank 0 speaks and writes)."""
    import os

    from ..grains import get_grain
    from ..observe.runner import resolve_device
    from ..observe.sequential import dist_world, init_distributed
    from .inputs import calib_line
    from .layerwise import prune_layerwise

    dev = resolve_device(recipe.device or "cpu")
    distributed = init_distributed(dev)
    rank, world = dist_world()
    if distributed and dev.type == "cuda":
        import torch

        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
        recipe = type(recipe).from_dict({**recipe.to_dict(), "device": str(dev)})
    if too_big(path, recipe.dtype, recipe.device, factor=1.0):
        from ..memlimit import return_freed_memory

        return_freed_memory()  # memory is tight: a freed layer's pages go back to the OS at once
    lead = rank == 0  # rank 0 speaks for all
    if lead:
        say(f"pruning {recipe.describe()}, layer by layer from the checkpoint files (model not loaded)"
            + (f" on {world} ranks" if world > 1 else ""))
        for line in notes:
            say(line)
        say(calib_line(recipe, windows))
    report = prune_layerwise(path, recipe, out, windows, overwrite=overwrite, verbose=lead and verbose,
                             work_dir=work_dir, spill_bytes=spill_bytes, say=say if lead else None)
    if lead:
        for line in get_grain(report.grain).layer_lines(report.layers):
            say(line)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return report
