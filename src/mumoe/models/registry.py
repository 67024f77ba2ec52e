"""model_type -> adapter. Adding an architecture = one adapter module + one line here + one test."""

from __future__ import annotations

from torch import nn

from ..errors import MumoeError
from .base import Adapter
from .deepseek_v3 import DeepseekV3Adapter
from .deepseek_v4 import DeepseekV4Adapter
from .dense import DenseAdapter, OptAdapter
from .families import FAMILY_ADAPTERS, NOT_YET
from .gpt_oss import GptOssAdapter
from .jetmoe import JetMoeAdapter
from .llama4 import Llama4Adapter
from .longcat_flash import LongcatFlashAdapter
from .mixtral import MixtralAdapter
from .nemotron_h import NemotronHAdapter
from .olmoe import OlmoeAdapter
from .qwen2_moe import Qwen2MoeAdapter
from .qwen3_moe import Qwen3MoeAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    t: cls
    for cls in (MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter, DeepseekV3Adapter,
                *FAMILY_ADAPTERS, GptOssAdapter, Llama4Adapter, NemotronHAdapter, LongcatFlashAdapter,
                JetMoeAdapter, DeepseekV4Adapter, DenseAdapter, OptAdapter)
    for t in cls.model_types
}
MOE_TYPES = sorted(t for t, c in ADAPTERS.items() if c.is_moe)
DENSE_TYPES = sorted(t for t, c in ADAPTERS.items() if not c.is_moe)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`, or a one-line MumoeError listing the supported architectures."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None and model_type in NOT_YET:
        why, nearest = NOT_YET[model_type]
        raise MumoeError(f"{model_type} is not supported yet ({why}); the nearest supported family is {nearest}; "
                         "`mumoe info --architectures` lists every supported one")
    if cls is None:
        raise MumoeError(
            f"unsupported architecture {model_type!r}; supported MoE: {', '.join(MOE_TYPES)}; "
            f"dense (weight grain only): {', '.join(DENSE_TYPES)}"
        )
    return cls(model)


def moe_adapter_for(model: nn.Module) -> Adapter:
    """Like `adapter_for`, but refuses dense models (expert-grain work needs routed experts)."""
    adapter = adapter_for(model)
    if not adapter.is_moe:
        raise MumoeError(
            f"{model.config.model_type} is a dense model with no routed experts; expert pruning needs one of: "
            f"{', '.join(MOE_TYPES)}"
        )
    return adapter


def in_mumoe_layout(model: nn.Module) -> nn.Module:
    """`model` with every module its adapter holds in mumoe's layout swapped in now (GPT-OSS's experts:
    `models.gpt_oss`), so that module names and forwards are settled before any work; other models unchanged."""
    if getattr(getattr(model, "config", None), "model_type", None) in ADAPTERS:
        adapter_for(model)
    return model
