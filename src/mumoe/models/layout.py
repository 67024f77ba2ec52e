"""Expert tensors held in mumoe's layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]) by a module whose family
stores them otherwise in its checkpoints and state dict (GPT-OSS, Llama 4): the tensors are converted once when the
module is made, and its state dict is converted back both ways, so save_pretrained, load_state_dict and every
export read and write the family's own layout. `layout`: names (the tensors it converts), to_canonical(name, t),
to_family(name, t) — the family module's `Layout`."""

from __future__ import annotations

import torch
from torch import nn


def adopt(module: nn.Module, source: nn.Module, layout) -> None:
    """Give `module` the expert tensors of `source` (transformers' experts module) in mumoe's layout, and state-dict
    hooks that convert them to and from `layout`'s (under the family's names where `layout.family_names` renames
    them: Nemotron-H's up_proj is mumoe's gate_up_proj)."""
    module.checkpoint_layout = layout
    for name in layout.names:
        old = getattr(source, _family_name(layout, name))
        setattr(module, name, nn.Parameter(layout.to_canonical(name, old.data), requires_grad=old.requires_grad))

    module._register_state_dict_hook(_family_state)
    module.register_load_state_dict_pre_hook(_canonical_state)


def _family_name(layout, name: str) -> str:
    return getattr(layout, "family_names", {}).get(name, name)


def family_names_of(module: nn.Module) -> dict[str, str]:
    """mumoe's tensor name -> the family's, for the tensors `module` holds under another name than its family's
    (`layout.family_names`: Nemotron-H's up_proj); {} for every other module."""
    return dict(getattr(getattr(module, "checkpoint_layout", None), "family_names", {}))


def renamed_tensors(model: nn.Module) -> dict[str, str]:
    """Every such tensor of `model` by its full name -> the full name its family gives it."""
    return {f"{m}.{k}": f"{m}.{v}" for m, module in model.named_modules() for k, v in family_names_of(module).items()}


def _family_state(module, state: dict, prefix: str, local_metadata) -> None:
    layout = module.checkpoint_layout
    for name in layout.names:
        if prefix + name in state:  # (a renamed tensor moves to the end of the state dict; the others keep place)
            t = layout.to_family(name, state.pop(prefix + name) if _family_name(layout, name) != name else
                                 state[prefix + name])
            state[prefix + _family_name(layout, name)] = t


def _canonical_state(module, state: dict, prefix: str, *args) -> None:
    layout = module.checkpoint_layout
    for name in layout.names:
        family = prefix + _family_name(layout, name)
        if family in state:
            t = layout.to_canonical(name, state.pop(family) if family != prefix + name else state[family])
            state[prefix + name] = t


class OwnGate:
    """Mixin of an experts module whose gate is its own `glu(gate, up)`: transformers' kernels call `_apply_gate` on
    their fused output [S, 2I] (gate columns, then up) -> [S, I]."""

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.glu(gate, up)
