"""A checkpoint run one decoder layer at a time: the model skeleton lives on the meta device and each part
(embeddings, one decoder layer, final norm + lm_head) is materialised from the safetensors files only while it
is needed, then freed.

    ckpt = LayerwiseCheckpoint("path/to/checkpoint", dtype=torch.bfloat16, device="cuda")
    with ckpt.part("model.layers.3") as layer:   # weights read tensor by tensor, straight into place
        out = layer(hidden, **kwargs)
    # here layer 3 is back on the meta device (its memory freed)

Both expert layouts are read (fused `experts.gate_up_proj [E, 2I, H]`, and the per-expert
`experts.J.{gate,up,down}_proj.weight`, with the legacy spellings the adapters declare (`models.keys`), that
save_pretrained and the hub write), from one file or a sharded index. Every parameter and buffer of a part must
be filled from the files, or materialising it fails with one line naming what is missing.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import KIND, LEGACY, PACKED, dequantized_experts, packed_shape, read_header, read_into, shard_files
from ..models.keys import FUSED_UP, canonical, checkpoint_renamer, legacy_blocks, model_tensors, text_prefix
from ..models.layout import renamed_tensors
from ..models.registry import ADAPTERS, in_mumoe_layout
from ..errors import MumoeError, MumoeFileError


@dataclass(frozen=True)
class Source:
    """Where (part of) a model tensor comes from: `key` in `file`, copied into `target[index]`."""

    file: Path
    key: str
    index: tuple  # () = the whole tensor; (e,) one expert; (e, "gate_proj" | "up_proj") rows of one expert;
    # ("cat", i, dim): the i-th of the tensors transformers concatenates along `dim` into this one on loading
    # ("split", offset, size, dim): rows offset..offset+size along `dim` of a tensor transformers splits on loading
    meta: dict  # the safetensors header entry (dtype, shape, offsets)


def _target(key: str, legacy: bool) -> tuple[str, tuple]:
    """Checkpoint key -> (model parameter name, index into it). legacy: the model names its MoE blocks as the
    legacy checkpoints do (`models.keys.legacy_blocks`); else keys are mapped to the v5 names."""
    if m := LEGACY.match(key):
        pre, e, kind = m["pre"], int(m["e"]), KIND[m["kind"]]
        if not legacy:
            pre = canonical(pre)
        if kind == "down_proj":
            return f"{pre}.down_proj", (e,)
        return f"{pre}.gate_up_proj", (e, kind)  # gate rows first, then up rows (resolved on copy)
    return (key if legacy else canonical(key)), ()


FINAL_NORMS = ("norm", "final_layernorm", "norm_f", "embedding_norm")  # the decoder's last norm, as families name it


def _single_op_rules(model_type: str, op_name: str) -> list[tuple[list[str], list[str], int]]:
    """transformers' loading rules of `model_type` made of one `op_name` operation (Split, Concatenate) over fixed
    keys (no per-expert `*`): (source key parts, target key parts, dim), the parts as plain substrings."""
    try:
        from transformers import core_model_loading as cml
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    op_type = getattr(cml, op_name, None)
    out = []
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        ops = getattr(rule, "operations", None) or []
        sources, targets = getattr(rule, "source_patterns", None) or [], getattr(rule, "target_patterns", None) or []
        if (op_type is not None and isinstance(rule, cml.WeightConverter) and len(ops) == 1
                and isinstance(ops[0], op_type) and not any("*" in k for k in sources)):
            out.append(([k.replace("\\", "") for k in sources], [k.replace("\\", "") for k in targets], ops[0].dim))
    return out


def splits(model_type: str) -> list[tuple[str, list[str], int]]:
    """transformers' loading rules of `model_type` that split one tensor into several (LaraMini's fused in_proj ->
    in_proj_qkv, _z, _b, _a): (source key part, target key parts in order, dim); each target takes the next rows,
    as many as its parameter has (transformers' `Split`)."""
    return [(src[0], tgt, dim) for src, tgt, dim in _single_op_rules(model_type, "Split") if len(src) == 1]


def concatenations(model_type: str) -> list[tuple[list[str], str, int]]:
    """transformers' loading rules of `model_type` that only concatenate fixed tensors into one (Kimi-Linear's
    q/k/v conv1d -> conv1d): (source key parts in order, target key part, dim). The reader fills each source into
    its slice of the target; other converting rules are not read layer by layer (`_converted_on_loading`)."""
    return [(src, tgt[0], dim) for src, tgt, dim in _single_op_rules(model_type, "Concatenate") if len(tgt) == 1]


def _converted_on_loading(model_type: str, key: str) -> bool:
    """Whether one of transformers' checkpoint conversion rules of `model_type` (other than its renames and the
    per-expert merge, which the reader does itself) applies to `key`."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        rules = [r for r in get_checkpoint_conversion_mapping(model_type) or [] if not isinstance(r, WeightRenaming)]
    except Exception:  # an older or newer transformers without this helper: no diagnosis, the plain error
        return False
    for rule in rules:
        for pattern in getattr(rule, "source_patterns", None) or ():
            if ".*." in pattern:  # mlp.experts.*.gate_proj.weight: the per-expert merge
                continue
            if re.search(pattern, key):
                return True
    return False


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class LayerwiseCheckpoint:
    """The model of a local safetensors checkpoint as a meta-device skeleton whose parts are materialised on
    demand (`part`). `model` is a normal transformers model object: adapters, hooks and collectors see it as
    usual; only the part inside a `part(...)` block has real weights."""

    def __init__(self, path: str | Path, dtype: torch.dtype | str | None = None, device="cpu",
                 check: bool = True) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise MumoeError(f"{self.path} is not a model folder (no config.json)")
        try:
            from ..source import hf_kwargs

            self.config = AutoConfig.from_pretrained(self.path, **hf_kwargs())
        except (OSError, ValueError, KeyError) as e:
            raise MumoeError(f"cannot read {self.path / 'config.json'}: {str(e).splitlines()[0]}") from e
        family = ADAPTERS.get(self.config.model_type)
        if family is not None and family.layerwise_gap:
            raise MumoeError(f"layer-by-layer work on {self.config.model_type} checkpoints is not supported yet "
                             f"({family.layerwise_gap}); run without --layerwise (the model in memory)")
        if dtype == "auto" or dtype is None:
            dtype = _config_dtype(self.config)
        self.dtype = dtype
        self.device = torch.device(device)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        in_mumoe_layout(self.model)  # the adapter's in-memory layout (GPT-OSS's experts) from the start
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._rebuild_rotary()
        # buffers computed, not read (rotary frequencies): a part inside a layer (DeepSeek-V4's compressors) gets
        # them back from here each time it is materialised
        self.computed = {n: b.detach().clone() for n, b in self.model.named_buffers(remove_duplicate=False)
                         if b.device.type != "meta"}
        has_bs = legacy_blocks(n for n, _ in self.model.named_parameters())
        self.block_sparse = has_bs  # the model names its MoE blocks the legacy way (checkpoint keys map as they are)
        # the family's own renames on loading, by the model built (a multimodal checkpoint: its text model's)
        self.initial = model_tensors(self.model)  # every tensor by its module name, as built (meta but the computed)
        self.rename = checkpoint_renamer(self.model.config.model_type, self.initial)
        headers = [(file, key, meta) for file in shard_files(self.path) for key, meta in read_header(file).items()]
        self.text_prefix = text_prefix([k for _, k, _ in headers], self.input_embeddings_name(), self.rename)
        if self.text_prefix:  # the text model's tensors under a prefix (Llama 4's `language_model.`), as
            renamed, cut = self.rename, len(self.text_prefix)  # transformers loads them into its causal LM
            self.rename = lambda key: renamed(key[cut:] if key.startswith(self.text_prefix) else key)
        # fused parameters whose family files hold them under another name (Nemotron-H's per-expert up_proj fill
        # the up half of mumoe's gate_up_proj: `Layout.family_names`), model name -> the family's
        self.family_names = renamed_tensors(self.model)
        self.concatenated = concatenations(self.model.config.model_type)
        self.split = splits(self.model.config.model_type)
        self.sources: dict[str, list[Source]] = defaultdict(list)
        self.packed: dict[str, dict[str, Source]] = defaultdict(dict)  # MXFP4 experts: name -> blocks, scales
        fused_up = next((key for _, key, _ in headers if FUSED_UP.match(self.rename(key))), None)
        if fused_up is not None:
            raise MumoeError(f"{self.path}: {fused_up} holds every expert's up projection in one tensor; layer by "
                             "layer, mumoe reads experts without a gate from the family's per-expert files (as "
                             "transformers saves them): run without --layerwise, or re-save with save_pretrained")
        for file, key, meta in headers:
            if p := PACKED.match(key):
                name = _target(self.rename(p["name"]), has_bs)[0]
                self.packed[name][p["part"]] = Source(file, key, (), meta)
                continue
            pieces = self.split_targets(key, has_bs)
            if pieces:  # one file tensor, several model tensors
                for name, index in pieces:
                    self.sources[name].append(Source(file, key, index, meta))
                continue
            name, index = _target(self.rename(key), has_bs)
            if name in self.family_names and index[1:] == ("up_proj",):  # an ungated expert's only input matrix
                name, index = self.family_names[name], index[:1]
            for parts, target, dim in self.concatenated:
                hit = next((i for i, part in enumerate(parts) if part in key), None)
                if hit is not None:
                    name, index = _target(self.rename(key.replace(parts[hit], target)), has_bs)[0], ("cat", hit, dim)
                    break
            self.sources[name].append(Source(file, key, index, meta))
        self.resident: set[str] = set()
        self.read_seconds = 0.0  # time spent materialising parts (reading + converting)
        if check:
            self.check_declared()
            self.check_coverage()

    def _param(self, name: str):
        """Model parameter `name` (meta or resident), or None."""
        try:
            return self.model.get_parameter(name)
        except AttributeError:
            return None

    def split_targets(self, key: str, legacy: bool) -> list[tuple[str, tuple]]:
        """The (model tensor, index) pieces of a file tensor transformers splits on loading (`splits`), sized by
        the model's parameters; [] for any other key."""
        for part, targets, dim in self.split:
            if part not in key or any(t in key for t in targets):
                continue
            names = [_target(self.rename(key.replace(part, t)), legacy)[0] for t in targets]
            params = [self._param(n) for n in names]
            if any(t is None for t in params):
                return []
            out, offset = [], 0
            for n, t in zip(names, params):
                size = t.shape[dim]
                out.append((n, ("split", offset, size, dim)))
                offset += size
            return out
        return []

    # -- structure -------------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The inner model holding embed_tokens, layers and norm."""
        return self.model.model

    def layer_names(self) -> list[str]:
        names = {id(m): n for n, m in self.model.named_modules()}
        return [names[id(layer)] for layer in self.decoder.layers]

    def _rebuild_rotary(self) -> None:
        """Rotary embeddings hold computed (non-persistent) buffers, never in a checkpoint: build them for real,
        each from the config it was built with (Granite-SWA keeps one per rope theta, in a list)."""
        built: dict[int, nn.Module] = {}  # one per module: a rotary module shared by several parents stays shared
        for name, module in list(self.model.named_modules(remove_duplicate=False)):  # (DeepSeek-V4's compressors)
            if name.endswith("rotary_emb") or type(module).__name__.endswith("RotaryEmbedding"):
                if id(module) not in built:
                    with torch.device(self.device):
                        built[id(module)] = type(module)(config=getattr(module, "config", None) or self.config)
                parent = self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.model
                setattr(parent, name.rsplit(".", 1)[-1], built[id(module)])

    # -- materialising ---------------------------------------------------------------------------------
    def _plan(self, name: str, tensor: torch.Tensor) -> list[tuple[Source, torch.Tensor]]:
        """(source, destination view) pairs that fill model tensor `name`; works on meta tensors too. A tensor
        with no source, a source of the wrong shape or a tensor only partly covered is a one-line error."""
        if name in self.packed:
            self._check_packed(name, tensor)
            return []
        sources = self.sources.get(name)
        if not sources and name.endswith("lm_head.weight") and getattr(self.config, "tie_word_embeddings", False):
            sources = self.sources.get(self.input_embeddings_name())
        if not sources:
            raise MumoeFileError(f"{self.path}: no tensor for {name} in the checkpoint files (an incomplete "
                                 "download, or another architecture's checkpoint)")
        plan, filled = [], 0
        seen: dict[tuple, Source] = {}
        offsets = {}  # ("cat", i, dim) -> where source i starts along dim: the sources in the rule's order
        start = 0
        for src in sorted((x for x in sources if x.index[:1] == ("cat",)), key=lambda x: x.index[1]):
            offsets[src.index] = start
            start += src.meta["shape"][src.index[2]]
        for src in sources:
            if src.index in seen:
                first = seen[src.index]
                raise MumoeFileError(f"{self.path}: tensor {src.key} is stored twice, in {first.file.name} and "
                                     f"{src.file.name}; remove the stale shard or re-download the checkpoint")
            seen[src.index] = src
            if not src.index:
                dst = tensor
            elif src.index[0] == "split":  # the whole destination, from rows of the source (`_fill`)
                dst = tensor
            elif src.index[0] == "cat":
                dim = src.index[2]
                dst = tensor.narrow(dim, offsets[src.index], min(src.meta["shape"][dim],
                                                                   max(0, tensor.shape[dim] - offsets[src.index])))
            elif len(src.index) == 1:
                dst = tensor[src.index[0]]
            else:
                e, kind = src.index
                half = tensor.shape[1] // 2
                dst = tensor[e, :half] if kind == "gate_proj" else tensor[e, half:]
            want = list(src.meta["shape"])
            if src.index[:1] == ("split",):
                want[src.index[3]] = src.index[2]
            if tuple(dst.shape) != tuple(want):
                raise MumoeFileError(f"{src.file}: {src.key} has shape {src.meta['shape']}, the model expects "
                                     f"{list(dst.shape)} for {name}")
            plan.append((src, dst))
            filled += dst.numel()
        if filled != tensor.numel():
            raise MumoeFileError(f"{self.path}: {name} is only partly in the checkpoint files "
                                 f"({filled} of {tensor.numel()} values; an expert missing?)")
        return plan

    def _check_packed(self, name: str, tensor: torch.Tensor) -> None:
        pair = self.packed[name]
        if set(pair) != {"blocks", "scales"}:
            part = "scales" if "blocks" in pair else "blocks"
            raise MumoeFileError(f"{self.path}: {name}_{part} is missing from the checkpoint files (an MXFP4 tensor "
                                 "needs its blocks and its scales)")
        shape = packed_shape(pair["blocks"].meta, pair["scales"].meta)
        if shape is None or tuple(shape) != tuple(tensor.shape):
            raise MumoeFileError(f"{pair['blocks'].file}: {pair['blocks'].key} {pair['blocks'].meta['shape']} and "
                                 f"its scales {pair['scales'].meta['shape']} do not dequantize to {list(tensor.shape)} "
                                 f"for {name}")

    def _unpack(self, name: str, tensor: torch.Tensor, layout=None) -> None:
        """Dequantize MXFP4 expert tensor `name` (blocks + scales, `checkpoint.dequantized_experts`) into `tensor`,
        one expert at a time (the packed bytes and one expert dequantized are all it adds); layout: `tensor` is in
        mumoe's layout, the files in the family's (`Adapter.checkpoint_layout`), converted per expert."""
        kind = name.rsplit(".", 1)[-1]
        family = tensor if layout is None else layout.to_family(kind, torch.empty(tensor.shape, device="meta"))
        self._check_packed(name, family)
        pair = self.packed[name]
        parts = [(pair[p].file, pair[p].meta) for p in ("blocks", "scales")]
        for e, expert in enumerate(dequantized_experts(*parts, tensor.dtype)):  # [C, R], the family's layout
            tensor[e].copy_(expert if layout is None else layout.to_canonical(kind, expert))

    def check_coverage(self) -> None:
        """Every tensor of the model's state dict has its sources, with the right shapes (headers only, no
        weight read): an incomplete checkpoint fails before the first layer, not at layer 40."""
        for name, tensor in self.initial.items():
            if tensor.device.type == "meta":
                self._plan(name, tensor)

    def check_declared(self) -> None:
        """The other direction of `check_coverage`: every tensor in the files belongs to a layer and an expert
        config.json declares (headers only). A config that declares fewer layers or experts than the weights
        hold would otherwise drop the rest silently, or fail at the first out-of-range expert. Keys the model
        itself ignores on loading (multi-token-prediction layers, old rotary buffers) are allowed."""
        patterns = set(getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or ())
        patterns |= {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}
        ignore = re.compile("|".join(f"({p})" for p in sorted(patterns)))
        state = {n: t.shape for n, t in self.initial.items()}
        extra: list[str] = []
        for name, sources in self.sources.items():
            for src in sources:
                if ignore.search(src.key) or (self.text_prefix and not src.key.startswith(self.text_prefix)):
                    continue  # (a multimodal checkpoint's other towers: the export keeps them as they are)
                expert = src.index[0] if src.index and isinstance(src.index[0], int) else None
                if name not in state or (expert is not None and expert >= state[name][0]):
                    extra.append(src.key)
        extra += [src.key for name, pair in self.packed.items() if name not in state for src in pair.values()]
        if extra and _converted_on_loading(self.config.model_type, extra[0]):
            raise MumoeError(f"{self.path}: {extra[0]} is a tensor transformers converts on loading "
                             f"{self.config.model_type} checkpoints (splits or joins it); the layer-by-layer reader "
                             "does not yet: run without --layerwise (the model in memory)")
        if extra:
            raise MumoeFileError(f"{self.path}: {len(extra)} tensor(s) in the checkpoint files belong to no "
                                 f"{_declared(self.config, extra[0])} (first: {extra[0]}); config.json does not "
                                 "match these weights — restore the checkpoint's own config.json")

    def _fill(self, name: str, tensor: torch.Tensor, layout=None) -> None:
        """Copy every source of model tensor `name` into `tensor` (already allocated on the device), read straight
        into place (`checkpoint.read_into`: resident is the destination, not a mapping of the file). layout: the
        owning experts module holds the tensor in mumoe's layout and the files in the family's
        (`Adapter.checkpoint_layout`): read into the family's shape, then converted."""
        kind = name.rsplit(".", 1)[-1]
        convert = layout is not None and kind in layout.names
        if name in self.packed:
            self._unpack(name, tensor, layout if convert else None)
            return
        if convert:  # read in the family's shape, converted one expert at a time into place
            stored = torch.empty(layout.to_family(kind, torch.empty(tensor.shape, device="meta")).shape,
                                 dtype=tensor.dtype, device=tensor.device)
            self._fill(self.family_names.get(name, name), stored)
            for e in range(stored.shape[0]):
                tensor[e].copy_(layout.to_canonical(kind, stored[e]))
            return
        for src, dst in self._plan(name, tensor):
            if src.index[:1] == ("split",):  # read the fused tensor, keep this target's rows
                _, offset, size, dim = src.index
                whole = torch.empty(tuple(src.meta["shape"]), dtype=dst.dtype)
                read_into(src.file, src.meta, whole)
                dst.copy_(whole.narrow(dim, offset, size))
                continue
            read_into(src.file, src.meta, dst)

    def input_embeddings_name(self) -> str:
        names = {id(m): n for n, m in self.model.named_modules()}
        return names[id(self.model.get_input_embeddings())] + ".weight"

    def materialise(self, name: str) -> nn.Module:
        """Allocate part `name` (a module path) on the device and read its weights; -> the module."""
        module = self.model.get_submodule(name)
        if name in self.resident:
            return module
        t0 = time.perf_counter()
        module.to_empty(device=self.device)
        with torch.no_grad():
            for local, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                full = f"{name}.{local}" if name else local
                if full in self.computed:
                    tensor.copy_(self.computed[full])
                    continue
                owner = module.get_submodule(local.rsplit(".", 1)[0]) if "." in local else module
                self._fill(full, tensor, getattr(owner, "checkpoint_layout", None))
        self.resident.add(name)
        self.read_seconds += time.perf_counter() - t0
        return module

    def prefetch(self, name: str) -> None:
        """Ask the OS to start reading part `name`'s bytes into the page cache (posix_fadvise WILLNEED), so the
        disk works while the current layer computes; costs no process memory."""
        if not hasattr(os, "posix_fadvise"):
            return
        module = self.model.get_submodule(name)
        spans: dict[Path, list[int]] = {}
        for local, _ in list(module.named_parameters()) + list(module.named_buffers()):
            for src in [*self.sources.get(f"{name}.{local}", []), *self.packed.get(f"{name}.{local}", {}).values()]:
                a = src.meta["start"]
                b = a + src.meta["data_offsets"][1] - src.meta["data_offsets"][0]
                lo, hi = spans.get(src.file, [a, b])
                spans[src.file] = [min(lo, a), max(hi, b)]
        for file, (a, b) in spans.items():
            try:
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except OSError:
                pass

    def release(self, name: str) -> None:
        """Free part `name` (back to the meta device)."""
        if name in self.resident:
            self.model.get_submodule(name).to("meta")
            self.resident.discard(name)

    @contextmanager
    def part(self, name: str) -> Iterator[nn.Module]:
        """Materialise part `name` for the duration of the block (released after, also on error)."""
        held = name in self.resident
        module = self.materialise(name)
        try:
            yield module
        finally:
            if not held:
                self.release(name)

    def head_names(self) -> list[str]:
        """The parts the loss needs after the last decoder layer, in the order they run: what the family applies
        before its final norm (`Adapter.head_pre_norm`: DeepSeek-V4's stream collapse), the final norm, lm_head."""
        names = {id(m): n for n, m in self.model.named_modules()}
        norm = next((m for a in FINAL_NORMS if isinstance(m := getattr(self.decoder, a, None), nn.Module)), None)
        if norm is None:
            raise MumoeError(f"{self.config.model_type}: no final norm ({', '.join(FINAL_NORMS)}) after the decoder "
                             "layers; layer-by-layer work is not supported for it")
        pre = [getattr(self.decoder, a) for a in getattr(ADAPTERS.get(self.config.model_type), "head_pre_norm", ())]
        return [names[id(m)] for m in (*pre, norm, self.model.get_output_embeddings())]

    def layer_bytes(self) -> int:
        """Bytes of the largest decoder layer in the load dtype (the resident weights of a pass)."""
        size = torch.tensor([], dtype=self.dtype).element_size()
        return max(sum(p.numel() for p in layer.parameters()) * size for layer in self.decoder.layers)

    def checkpoint_bytes(self) -> int:
        return sum(f.stat().st_size for f in shard_files(self.path))


def _declared(config, key: str) -> str:
    """What config.json declares that `key` falls outside of, in words: "layer config.json declares (it
    declares num_hidden_layers 3)", or the same for experts, or "parameter of the model"."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    m = re.search(r"\.layers\.(\d+)\.", key)
    n_layers = getattr(text, "num_hidden_layers", None)
    if m and n_layers is not None and int(m[1]) >= n_layers:
        return f"layer config.json declares (it says num_hidden_layers {n_layers})"
    m = re.search(r"\.experts\.(\d+)\.", key)
    if m:
        from ..models.base import EXPERT_COUNT_KEYS

        count = next((f"{k} {getattr(text, k)}" for k in EXPERT_COUNT_KEYS if getattr(text, k, None)), None)
        return "expert config.json declares" + (f" (it says {count})" if count else "")
    return "parameter of the model config.json declares"


def is_layerwise_source(name: str | Path) -> bool:
    """True when `name` is a local folder with safetensors weights (a checkpoint `LayerwiseCheckpoint` reads)."""
    path = Path(str(name))
    if not (path / "config.json").exists():
        return False
    return (path / "model.safetensors.index.json").exists() or any(path.glob("*.safetensors"))


def source_dtype(path: str | Path) -> torch.dtype:
    """The checkpoint's own dtype (`loading.checkpoint_dtype`)."""
    from ..source import checkpoint_dtype

    return checkpoint_dtype(path)


def weights_from_files(path, from_weights: Callable, progress: bool = False) -> dict[int, object]:
    """A data-free method's per-layer values (`from_weights(moe_layer)`) from a checkpoint's files, one decoder
    layer resident at a time, in float32 as the in-memory path computes them (a bf16 checkpoint is loaded in
    float32 there). -> {decoder layer: value}"""
    from ..models import adapter_for
    from ..progress import bar

    ckpt = LayerwiseCheckpoint(path, dtype=torch.float32)
    layers = adapter_for(ckpt.model).moe_layers()
    if not layers:
        raise MumoeError(f"{path}: no routed experts; expert pruning needs an MoE checkpoint")
    names = {id(m): n for n, m in ckpt.model.named_modules()}
    out = {}
    for layer in bar(layers, desc="weights (streamed)", enabled=progress, unit="layer"):
        with ckpt.part(names[id(layer.decoder_layer)]):
            out[layer.index] = from_weights(layer)
    return out
