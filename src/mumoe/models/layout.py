"""Expert tensors held in mumoe's layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]) by a module whose family
stores them otherwise in its checkpoints and state dict (GPT-OSS, Llama 4): the tensors are converted once when the
module is made, and its state dict is converted back both ways, so save_pretrained, load_state_dict and every
export read and write the family's own layout. `layout`: names (the tensors it converts), to_canonical(name, t),
to_family(name, t) — the family module's `Layout`."""

from __future__ import annotations

from torch import nn


def adopt(module: nn.Module, source: nn.Module, layout) -> None:
    """Give `module` the expert tensors of `source` (transformers' experts module) in mumoe's layout, and state-dict
    hooks that convert them to and from `layout`'s."""
    module.checkpoint_layout = layout
    for name in layout.names:
        old = getattr(source, name)
        setattr(module, name, nn.Parameter(layout.to_canonical(name, old.data), requires_grad=old.requires_grad))

    module._register_state_dict_hook(_family_state)
    module.register_load_state_dict_pre_hook(_canonical_state)


def _family_state(module, state: dict, prefix: str, local_metadata) -> None:
    layout = module.checkpoint_layout
    for name in layout.names:
        if prefix + name in state:
            state[prefix + name] = layout.to_family(name, state[prefix + name])


def _canonical_state(module, state: dict, prefix: str, *args) -> None:
    layout = module.checkpoint_layout
    for name in layout.names:
        if prefix + name in state:
            state[prefix + name] = layout.to_canonical(name, state[prefix + name])
