"""What every command shares: the stage-line printer, the MODEL argument and its options, model loading."""

from __future__ import annotations

from pathlib import Path

from ..drivers.choose import local_checkpoint  # noqa: F401  (the library's checks and loading, for every command)
from ..drivers.inputs import load_dtype as dtype_of  # noqa: F401
from ..drivers.inputs import load_model, model_config  # noqa: F401
from ..settings import SETTINGS


def say(*args, **kwargs) -> None:
    """A stage line (what is being done, how long it took): printed unless --quiet."""
    if not SETTINGS.quiet:
        print(*args, **kwargs)


MODEL_HELP = ("model: 'default' (the bundled qwen3_moe, also when omitted), a local HF checkpoint folder, "
              "a hub id, or 'tiny:ARCH' for a tiny random model (e.g. tiny:mixtral)")


def check_device(device: str | None) -> None:
    """A device that is not there (cuda without a GPU) fails before anything is read."""
    from ..observe.runner import resolve_device

    resolve_device(device or "cpu")


def source_dir(model_name: str) -> str | None:
    """The local folder of MODEL (None for hub ids and tiny models): outputs may never replace it."""
    from ..loading import resolve

    name = resolve(model_name)
    return name if Path(name).is_dir() else None


def method_names() -> list[str]:
    from ..criteria import METHODS

    return [f"{m.name}" for m in METHODS.values()]


def write_json(path: str, text: str) -> None:
    """eval --json: written atomically (temp file, then rename); a full disk is one line naming the path."""
    from ..files import write_file_atomic

    write_file_atomic(path, text, "--json")


def lead() -> bool:
    """Rank 0 of a torchrun job (or no job): the one that speaks."""
    from ..observe.sequential import dist_world

    return dist_world()[0] == 0


def model_args(sp, model_default="default"):
    sp.add_argument("model", nargs="?", default=model_default, help=MODEL_HELP)
    sp.add_argument("--dtype", default=None if model_default is None else "auto",
                    choices=["auto", "fp32", "bf16", "fp16"],
                    help="dtype the model is loaded and run in (default auto: the checkpoint's own, except fp32 "
                    "on the CPU for a bf16/fp16 checkpoint); exports are written in the checkpoint's dtype "
                    "unless --dtype is given. Statistics are accumulated in fp32/fp64 whatever it is")
    sp.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or auto (cuda when available): "
                    "where the model runs")
    sp.add_argument("--trust-remote-code", action="store_true",
                    help="let transformers run the modelling / tokenizer code the checkpoint ships (off by "
                    "default; mumoe reads its own exports without it)")
