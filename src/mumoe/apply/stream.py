"""Streamed apply and export: the pruned checkpoint written tensor by tensor from the source safetensors files,
the model never materialised. Each source tensor goes through a transform (experts dropped and renumbered,
router rows sliced, atoms sliced, Wanda masks applied) and straight into the output shard's file (`ShardWriter`),
so resident memory stays at about one tensor (+ one decoder layer for Wanda, whose masks need the layer's
weights), whatever the shard size.
Tensors keep the source's layout (fused or per-expert keys) and dtype. Reading: `mumoe.checkpoint`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..checkpoint import (FUSED, KIND, LEGACY, PACKED, dequantized_experts, packed_shape, read_header, read_tensor,
                          shard_files)
from ..errors import MumoeError, MumoeFileError
from ..models.base import EXPERT_COUNT_KEYS, kept_rows
from ..models.keys import EXPERT_BIAS, expert_layout, router_axis, unchanged
from ..progress import bar
from .atoms import kept_part
from .export import PruneReport, atomic_output

# (source key, read() -> tensor) -> [(output key, tensor)]
Transform = Callable[[str, Callable[[], torch.Tensor]], list[tuple[str, torch.Tensor]]]


def rewrite_config(cfg: dict, changes: dict) -> None:
    """Set every key of `changes` present in cfg (and its nested text/language configs); only values change."""
    for key, value in changes.items():
        if key in cfg:
            cfg[key] = value
    for sub in ("text_config", "language_config", "llm_config"):
        if isinstance(cfg.get(sub), dict):
            rewrite_config(cfg[sub], changes)


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


class ShardWriter:
    """Output shards of at most `max_bytes` each (one tensor larger than that gets a shard of its own), named
    as save_pretrained names them; `finish()` writes the index when there is more than one.

    Each tensor's bytes go to disk as it is added: a shard file starts with room for its header
    (`header_bytes`), the tensors follow one after another, and the header — known only once the shard is
    complete — is written into that room at the end, padded with spaces as the safetensors format allows. So
    resident memory is one tensor, not a shard (safetensors' `save_file` holds a whole shard, about twice).
    A shard whose header would outgrow its room is closed early and the next one begun."""

    def __init__(self, folder: Path, max_bytes: int, header_bytes: int = 64 << 10) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.header_bytes = -(-header_bytes // 8) * 8  # the data starts 8-byte aligned
        self.files: list[list[str]] = []
        self.total = 0
        self._f = None
        self._entries: dict[str, dict] = {}
        self._size = 0  # data bytes in the open shard
        self._room = 0  # header bytes of the open shard
        self._json = 0  # length of its header so far

    @staticmethod
    def _entry_json(key: str, entry: dict) -> int:
        return len(json.dumps({key: entry}, separators=(",", ":"))) - 1  # ',"key":{...}' within the header

    def add(self, key: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in _ST_NAMES:
            raise MumoeError(f"cannot write tensor {key} of dtype {t.dtype} to safetensors")
        n = t.numel() * t.element_size()
        entry = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [self._size, self._size + n]}
        grow = self._entry_json(key, entry)
        if self._f is not None and self._entries and (self._size + n > self.max_bytes
                                                      or self._json + grow + 8 > self._room):
            self._close()
            entry["data_offsets"] = [0, n]
            grow = self._entry_json(key, entry)
        if self._f is None:
            self._open(grow)
        if n:
            self._f.write(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, no copy
        self._entries[key] = entry
        self._size += n
        self._json += grow
        self.total += n

    def _open(self, first_entry: int) -> None:
        base = len(json.dumps({"__metadata__": {"format": "pt"}}, separators=(",", ":")))
        self._room = max(self.header_bytes, -(-(base + first_entry + 64) // 8) * 8)
        self._json = base
        self._f = open(self.folder / f"part-{len(self.files):05d}.safetensors", "wb")
        self._f.seek(8 + self._room)
        self._entries, self._size = {}, 0

    def _close(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self._room:  # cannot happen: add() closes the shard before its header outgrows it
            raise AssertionError(f"safetensors header of {len(header)} bytes in a room of {self._room}")
        self._f.seek(0)
        self._f.write(self._room.to_bytes(8, "little"))
        self._f.write(header + b" " * (self._room - len(header)))
        self._f.close()
        self.files.append(list(self._entries))
        self._f = None

    def abort(self) -> None:
        """Close the open shard's file without writing its header (the temp folder is removed by the caller)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def finish(self) -> list[str]:
        if self._f is not None:
            self._close()
        n = len(self.files)
        if n == 1:
            (self.folder / "part-00000.safetensors").rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, keys in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"part-{i:05d}.safetensors").rename(self.folder / name)
            weight_map.update({k: name for k in keys})
            names.append(name)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def header_room(keys: list[str]) -> int:
    """Header bytes to reserve per shard: enough for every source key's entry (each output key is about its
    source key's length) and a margin, at most 1 MiB (a fuller shard is closed early instead)."""
    need = 4096 + sum(len(k) + 96 for k in keys)
    return min(need, 1 << 20)


def _keys(path: Path) -> Iterator[tuple[Path, str, dict]]:
    for file in shard_files(path):
        for key, meta in read_header(file).items():
            yield file, key, meta


def _reader(file: Path, meta: dict) -> Callable[[], torch.Tensor]:
    """read() -> the tensor, read into fresh memory (never a mapping of the whole file)."""
    return lambda: read_tensor(file, meta)


def _sources(path: Path, cfg: dict) -> tuple[list[tuple[str, Callable[[], torch.Tensor]]], bool]:
    """(key, read) of every tensor of the checkpoint in file order, and whether any was MXFP4-packed: a pair
    (`<experts>.gate_up_proj_blocks` and `_scales`, gpt-oss's release format) is one entry, `<experts>.gate_up_proj`,
    read dequantized in the config's dtype (`checkpoint.dequantized_experts`): the export is written unquantized."""
    keys = list(_keys(path))
    pairs: dict[str, dict[str, tuple[Path, dict]]] = {}
    for file, key, meta in keys:
        if p := PACKED.match(key):
            pairs.setdefault(p["name"], {})[p["part"]] = (file, meta)
    dtype = getattr(torch, str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"), torch.bfloat16)
    out, done = [], set()
    for file, key, meta in keys:
        p = PACKED.match(key)
        if p is None:
            out.append((key, _reader(file, meta)))
            continue
        name = p["name"]
        if name in done:
            continue
        done.add(name)
        pair = pairs[name]
        if set(pair) != {"blocks", "scales"} or packed_shape(pair["blocks"][1], pair["scales"][1]) is None:
            raise MumoeFileError(f"{file}: {key} has no matching MXFP4 "
                                 f"{'scales' if p['part'] == 'blocks' else 'blocks'} tensor")
        out.append((name, lambda pair=pair: _dequantized(pair, dtype)))
    return out, bool(pairs)


def _dequantized(pair: dict[str, tuple[Path, dict]], dtype: torch.dtype) -> torch.Tensor:
    """An MXFP4 pair dequantized into one tensor, one expert at a time (the packed bytes + one expert extra)."""
    out = torch.empty(packed_shape(pair["blocks"][1], pair["scales"][1]), dtype=dtype)
    for e, expert in enumerate(dequantized_experts(pair["blocks"], pair["scales"], dtype)):
        out[e] = expert
    return out


def write_streamed(path: str | Path, out: str | Path, report: PruneReport, transform: Transform,
                   config_changes: dict, overwrite: bool = False, progress: bool = True,
                   max_shard_bytes: int = 1 << 30, dtype: torch.dtype | None = None) -> Path:
    """Write `path` through `transform`, tensor by tensor, atomically (temp dir beside `out`, then rename).
    Config keys as the source spells them (only the values in `config_changes` change, plus the expert-count
    key older readers need: `packaging`); tokenizer and other files copied byte for byte; pruning.json from
    `report`. dtype: cast floating-point tensors to it (None: each keeps the source's)."""
    from ..models.registry import ADAPTERS
    from .forms import get_form
    from .packaging import DTYPE_NAMES, copy_side_files, reader_keys

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    sources, dequantized = _sources(path, cfg)
    transform = layout_converted(transform, expert_layout(cfg.get("model_type")))
    with atomic_output(out, overwrite, source=path) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, header_room([k for k, _ in sources]))
        try:
            for key, read in bar(sources, desc="writing pruned tensors", enabled=progress, unit="tensor"):
                for out_key, t in transform(key, read):
                    writer.add(out_key, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
                    del t  # one output tensor resident at a time
            writer.finish()
        finally:
            writer.abort()
        copy_side_files(path, tmp)
        if dequantized:
            cfg.pop("quantization_config", None)  # the MXFP4 experts were written unquantized
        dtype_keys = {k: DTYPE_NAMES[dtype] for k in ("dtype", "torch_dtype")} if dtype is not None else {}
        rewrite_config(cfg, {**config_changes, **dtype_keys})  # nested text configs' dtype too
        counts = [v for k, v in config_changes.items() if k in EXPERT_COUNT_KEYS]
        own = getattr(ADAPTERS.get(cfg.get("model_type")), "expert_count_key", None)
        has_count = any(k in cfg for k in EXPERT_COUNT_KEYS)
        reader_keys(cfg, own, counts[0] if counts and has_count else None, dtype)
        form = get_form(report.form)
        if form.package is not None:
            cfg = form.package(cfg, tmp, report)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "pruning.json").write_text(report.to_json())
    return Path(out)


# -- transforms ----------------------------------------------------------------------------------------------
def layout_converted(transform: Transform, layout) -> Transform:
    """`transform` fed and read in mumoe's expert layout when the family's checkpoints store their fused expert
    tensors otherwise (`Adapter.checkpoint_layout`, GPT-OSS): each such tensor converted on reading, and each
    output under such a name converted back on writing. No layout: `transform` itself."""
    if layout is None:
        return transform

    def kind(key: str) -> str | None:
        k = key.rsplit(".", 1)[-1]
        return k if k in layout.names and ".experts." in key else None

    def wrapped(key: str, read):
        if (k := kind(key)) is not None:
            read = (lambda raw, k: lambda: layout.to_canonical(k, raw()))(read, k)
        return [(out, t if (ko := kind(out)) is None else layout.to_family(ko, t)) for out, t in transform(key, read)]
    return wrapped


def expert_transform(keep: dict[int, list[int]], routers: dict[str, tuple[int, int, int]],
                     rename: Callable[[str], str] = unchanged) -> Transform:
    """Drop the experts not in `keep` (decoder layer -> kept, sorted), renumber per-expert keys, slice fused
    expert tensors and every routing tensor (`router_axis`: rows, biases, correction biases) along its expert
    axis. rename: the family's own key renames on loading (`models.keys.checkpoint_renamer`): keys are understood
    by their loaded names and written under their own."""
    def transform(key: str, read):
        if (m := LEGACY.match(key)) and int(m["layer"]) in keep:
            kept = keep[int(m["layer"])]
            e = int(m["e"])
            return [(f"{m['pre']}.{kept.index(e)}.{m['kind']}.weight", read())] if e in kept else []
        view = rename(key)
        if (m := FUSED.match(view) or EXPERT_BIAS.match(view)) and int(m["layer"]) in keep:
            return [(key, read().index_select(0, torch.tensor(keep[int(m["layer"])])))]
        if (r := router_axis(view, routers)) and r[0] in keep:
            t = read()  # (identity experts' entries after the routed ones kept: `RouterTensor.tail`)
            rows = kept_rows(torch.tensor(keep[r[0]]), t.shape[r[1]], r[2])
            return [(key, t.index_select(r[1], rows).contiguous())]
        return [(key, read())]
    return transform


def atom_transform(keep: dict[int, torch.Tensor], rename: Callable[[str], str] = unchanged) -> Transform:
    """Keep each expert's atoms `keep[layer][e]` (sorted neuron indices, the same count for every expert):
    gate/up rows and down columns; fused gate_up [E, 2I, H] keeps rows k and I + k (keys understood by their
    loaded names, `expert_transform`)."""
    def transform(key: str, read):
        if (m := LEGACY.match(key)) and int(m["layer"]) in keep:
            k = keep[int(m["layer"])][int(m["e"])]
            w = read()
            return [(key, w[:, k] if KIND[m["kind"]] == "down_proj" else w[k])]
        if (m := FUSED.match(rename(key))) and int(m["layer"]) in keep:
            k = keep[int(m["layer"])]  # [E, I']
            w = read()
            if m["kind"] == "down_proj":  # [E, H, I]
                return [(key, torch.stack([w[e][:, k[e]] for e in range(w.shape[0])]))]
            half = w.shape[1] // 2
            return [(key, torch.stack([torch.cat([w[e][k[e]], w[e][k[e] + half]]) for e in range(w.shape[0])]))]
        if (m := EXPERT_BIAS.match(rename(key))) and int(m["layer"]) in keep and m["kind"] == "gate_up_proj_bias":
            k, b = keep[int(m["layer"])], read()  # [E, I'], [E, 2I] (gate, then up)
            half = b.shape[1] // 2
            return [(key, torch.stack([torch.cat([b[e][k[e]], b[e][k[e] + half]]) for e in range(b.shape[0])]))]
        return [(key, read())]
    return transform


def atom_ragged_transform(keep: dict[int, list[torch.Tensor]], rename: Callable[[str], str] = unchanged,
                          shared: dict[str, tuple[str, torch.Tensor]] | None = None, gated: bool = True) -> Transform:
    """HEAPr's global form, mumoe's own layout (`forms.compact_atom_state`): each routed expert stored at its own
    width, `<experts>.<e>.gate_up` [2k_e, H] and `<experts>.<e>.down` [H, k_e] (+ `<e>.gate_up_bias` [2k_e] and
    `<e>.down_bias` [H] where the experts have biases); keep[layer][e] = kept atoms. shared: the shared experts'
    tensors whose atoms go (`apply.atoms.shared_atom_keys`), stored under their own names at their kept width.
    gated False: experts without a gate matrix (Nemotron-H), stored as `<experts>.<e>.up` [k_e, H]."""
    pending: dict[tuple, torch.Tensor] = {}  # a per-expert gate (or up) waiting for its other half
    shared = shared or {}

    def transform(key: str, read):
        if (hit := shared.get(rename(key))) is not None:
            return [(key, kept_part(read(), *hit))]
        if (m := LEGACY.match(key)) and int(m["layer"]) in keep:
            L, e, kind = int(m["layer"]), int(m["e"]), KIND[m["kind"]]
            pre, k = m["pre"], keep[L][e]  # the source's spelling: readers rename as transformers does
            if kind == "down_proj":
                return [(f"{pre}.{e}.down", read()[:, k])]
            if not gated:
                return [(f"{pre}.{e}.up", read()[k])]
            pending[(pre, e, kind)] = read()[k]
            gate, up = pending.get((pre, e, "gate_proj")), pending.get((pre, e, "up_proj"))
            if gate is None or up is None:
                return []
            del pending[(pre, e, "gate_proj")], pending[(pre, e, "up_proj")]
            return [(f"{pre}.{e}.gate_up", torch.cat([gate, up]))]
        if (m := FUSED.match(rename(key))) and int(m["layer"]) in keep:
            L, pre = int(m["layer"]), m["pre"]
            w = read()
            if m["kind"] == "down_proj":  # [E, H, I]
                return [(f"{pre}.{e}.down", w[e][:, k]) for e, k in enumerate(keep[L])]
            half = w.shape[1] // 2
            return [(f"{pre}.{e}.gate_up", torch.cat([w[e][k], w[e][k + half]])) for e, k in enumerate(keep[L])]
        if (m := EXPERT_BIAS.match(rename(key))) and int(m["layer"]) in keep:  # the experts' biases (GPT-OSS)
            L, pre, b = int(m["layer"]), m["pre"], read()  # [E, 2I] (gate, then up) or [E, H]
            if m["kind"] == "down_proj_bias":
                return [(f"{pre}.{e}.down_bias", b[e]) for e in range(len(keep[L]))]
            half = b.shape[1] // 2
            return [(f"{pre}.{e}.gate_up_bias", torch.cat([b[e][k], b[e][k + half]])) for e, k in enumerate(keep[L])]
        return [(key, read())]
    return transform


def meta_model(path: str | Path):
    """The model of a checkpoint folder as a meta-device skeleton (its config only; no weight is read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..source import hf_kwargs

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, **hf_kwargs()))


def check_uniform(keep: dict[int, list[int]]) -> int:
    counts = {len(v) for v in keep.values()}
    if len(counts) != 1:
        raise MumoeError("a streamed export needs the same expert count in every layer (--budget uniform)")
    return counts.pop()


def prune_checkpoint(path: str | Path, out: str | Path, report: PruneReport, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Write `path` with only the experts kept in `report`, tensor by tensor, atomically."""
    from ..models.keys import model_renamer, routing_keys

    keep = report.kept()
    n = check_uniform(keep)
    skeleton = meta_model(path)
    transform = expert_transform(keep, routing_keys(skeleton), model_renamer(skeleton))
    return write_streamed(path, out, report, transform, {k: n for k in EXPERT_COUNT_KEYS}, overwrite, progress)


def quant_transform(widths: dict[int, list[int]], group: int, rename: Callable[[str], str] = unchanged,
                    gated: bool = True) -> Transform:
    """PMQ's packed experts (the `mumoe-quant` form, `forms._write_quant`): expert e of decoder layer L at
    widths[L][e] bits, round-to-nearest in groups of `group` input columns, as `<experts>.<e>.gate_up.{q,scale,zero}`
    ([2I, H]: gate rows, then up) and `<experts>.<e>.down.{q,scale,zero}` ([H, I]); per-expert checkpoints (one
    matrix per projection) have each expert's gate held until its up arrives. Every other tensor as it is (the experts'
    biases too). Bit for bit the in-memory run's: RTN of the same values (the source's, upcast). gated False: experts
    without a gate (Nemotron-H), their up as `<experts>.<e>.up.{q,scale,zero}` [I, H]."""
    from .quant import packed_tensors, rtn

    pending: dict[tuple, torch.Tensor] = {}  # a per-expert gate (or up) waiting for its other half

    def packed(pre: str, e: int, name: str, w: torch.Tensor, b: int) -> list[tuple[str, torch.Tensor]]:
        return list(packed_tensors(f"{pre}.{e}.{name}", rtn(w, b, group)).items())

    def transform(key: str, read):
        if (m := LEGACY.match(key)) and int(m["layer"]) in widths:
            L, e, kind = int(m["layer"]), int(m["e"]), KIND[m["kind"]]
            pre, b = m["pre"], widths[L][e]  # the source's spelling: readers rename as transformers does
            if kind == "down_proj":
                return packed(pre, e, "down", read(), b)
            if not gated:
                return packed(pre, e, "up", read(), b)
            pending[(pre, e, kind)] = read()
            gate, up = pending.get((pre, e, "gate_proj")), pending.get((pre, e, "up_proj"))
            if gate is None or up is None:
                return []
            del pending[(pre, e, "gate_proj")], pending[(pre, e, "up_proj")]
            return packed(pre, e, "gate_up", torch.cat([gate, up]), b)
        if (m := FUSED.match(rename(key))) and int(m["layer"]) in widths:
            L, pre, w = int(m["layer"]), m["pre"], read()  # [E, 2I, H] or [E, H, I]
            name = "down" if m["kind"] == "down_proj" else "gate_up"
            return [kv for e, b in enumerate(widths[L]) for kv in packed(pre, e, name, w[e], b)]
        return [(key, read())]  # the experts' biases too: kept as they are, as in memory
    return transform
