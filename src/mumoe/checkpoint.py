"""Reading a checkpoint's safetensors files tensor by tensor, without loading the model.

Each tensor is memory-mapped on its own and released before the next (fused expert tensors one expert slice at
a time), so resident memory stays at about one tensor, whatever the shard or model size. Both expert layouts:
    fused   model.layers.L.mlp.experts.gate_up_proj [E, 2I, H], ...experts.down_proj [E, H, I]
    legacy  model.layers.L.mlp.experts.J.{gate,up,down}_proj.weight  (what save_pretrained writes by default)
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import MumoeDataError, MumoeError, MumoeFileError, os_message
from .files import read_json

# the architectures' key layouts (fused, per-expert, legacy names) are the adapters' (`models.keys`)
from .models.keys import FUSED, KIND, LEGACY, PACKED, ROUTER  # noqa: E402,F401  (re-exported for the readers here)


def shard_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, in index order."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = read_json(index, "the shard index")
        wm = wm.get("weight_map") if isinstance(wm, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise MumoeFileError(f"{index}: no weight_map of tensor name -> shard file")
        files = [path / f for f in sorted(set(wm.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MumoeFileError(f"{path}: shard {missing[0]} named by model.safetensors.index.json is missing"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MumoeFileError(f"{path} holds no .safetensors files (mumoe reads safetensors checkpoints; convert "
                             ".bin files with save_pretrained(..., safe_serialization=True))")
    return files


ORDER = ("gate_proj", "up_proj", "down_proj")  # the in-memory AIMER's summation order


DTYPES = _DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
# what a reader also copies as it is: integer tables (DeepSeek-V4's token -> experts table), flags
_READ_DTYPES = {**_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool}


MAX_HEADER = 100 << 20  # the safetensors format's own limit on the header's size


def read_header(file: Path) -> dict[str, dict]:
    """The safetensors header: {key: {"dtype", "shape", "data_offsets", "start", "key"}} (data_offsets relative
    to the data start, start absolute). A file that is not safetensors, a truncated one or one whose header
    points outside it is a one-line error naming it. Parsed once per file version (the checks before a run
    and the run itself read the same headers); callers get their own copy."""
    file = Path(file)
    try:
        st = file.stat()
    except OSError as e:
        raise MumoeFileError(f"cannot read {file}: {os_message(e)}", e.errno) from e
    header = _parse_header(file, st.st_size, (st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return {k: {**m, "shape": list(m["shape"]), "data_offsets": list(m["data_offsets"])} for k, m in header.items()}


@functools.lru_cache(maxsize=512)
def _parse_header(file: Path, size: int, version: tuple) -> dict[str, dict]:
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > MAX_HEADER or 8 + n > size:
                raise MumoeFileError(f"{file}: not a safetensors file, or truncated (header of {n:,} bytes in a file "
                                     f"of {size:,})")
            raw = fh.read(n)
    except OSError as e:
        if isinstance(e, MumoeError):
            raise
        raise MumoeFileError(f"cannot read {file}: {os_message(e)}", e.errno) from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise MumoeFileError(f"{file}: not a safetensors file (its header is not JSON)") from e
    header.pop("__metadata__", None)
    for key, meta in header.items():
        try:
            a, b = (int(x) for x in meta["data_offsets"])
            shape, dtype = [int(d) for d in meta["shape"]], str(meta["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise MumoeFileError(f"{file}: malformed safetensors header entry for {key}") from e
        if not (0 <= a <= b) or 8 + n + b > size:
            raise MumoeFileError(f"{file}: truncated (tensor {key} ends at byte {8 + n + b:,}, the file at "
                                 f"{size:,})")
        nbytes = math.prod(shape) * _ITEMSIZE.get(dtype, 0)
        if dtype in _ITEMSIZE and nbytes != b - a:
            raise MumoeFileError(f"{file}: tensor {key} has {b - a:,} bytes for shape {shape} {dtype}")
        meta.update(start=8 + n + a, key=key, shape=shape, dtype=dtype)
    return header


_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
             "I64": 8, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
PARAM_SUFFIXES = ("weight", "bias", "gate_up_proj", "down_proj", "e_score_correction_bias")


def check_files(path: Path) -> list[Path]:
    """The cheap checks of a local safetensors checkpoint, before any weight is read: the index parses and
    every shard it names exists; every header is sane and fits its file; every parameter is floating point
    (integer or fp8 weights are quantized checkpoints; boolean buffers such as old attention masks pass).
    -> the shard files."""
    files = shard_files(path)
    for file in files:
        for key, meta in read_header(file).items():
            if key.endswith(PARAM_SUFFIXES) and meta["dtype"] not in _DTYPES and meta["dtype"] != "BOOL":
                raise MumoeFileError(f"{file}: tensor {key} is {meta['dtype']}; mumoe reads floating-point weights "
                                     f"({', '.join(_DTYPES)}) — dequantize the checkpoint first")
    return files


def packed_shape(blocks: dict, scales: dict) -> list[int] | None:
    """The shape an MXFP4 pair dequantizes to — blocks [E, R, G, 16] (uint8, two FP4 values a byte) and scales
    [E, R, G] (uint8 powers of two) -> [E, 32·G, R], the family's own layout — or None when the two headers do
    not make a pair."""
    b, s = blocks["shape"], scales["shape"]
    if blocks["dtype"] != "U8" or scales["dtype"] != "U8" or len(b) != 4 or b[3] != 16 or b[:3] != s:
        return None
    return [b[0], b[2] * 32, b[1]]


def read_packed(file: Path, meta: dict) -> torch.Tensor:
    """One uint8 tensor of an MXFP4 pair (`packed_shape`), read into fresh memory."""
    buf = torch.empty(tuple(meta["shape"]), dtype=torch.uint8)
    _read_bytes(file, meta["start"], buf.view(-1).numpy() if buf.numel() else None, buf.numel())
    return buf


def dequantized_experts(blocks: tuple[Path, dict], scales: tuple[Path, dict],
                        dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """An MXFP4 pair ((file, header entry) of its blocks and of its scales) dequantized one expert at a time:
    yields [32·G, R] in `dtype` per expert (`packed_shape`), so the packed bytes and one expert are all it holds.
    By transformers' own dequantization (what from_pretrained loads into GPT-OSS's experts), so a checkpoint read
    here equals the loaded model."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    b, s = read_packed(*blocks), read_packed(*scales)
    for e in range(b.shape[0]):
        yield convert_moe_packed_tensors(b[e:e + 1], s[e:e + 1], dtype=dtype)[0]


def check_finite(t: torch.Tensor, where: str) -> torch.Tensor:
    """t unchanged, or a one-line MumoeDataError naming `where` when it holds NaN or inf (min/max propagate
    both, so one reduction pass decides)."""
    if t.numel() and t.is_floating_point():
        lo, hi = torch.aminmax(t.detach())
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            flat = t.detach().reshape(-1)
            nan = int(torch.isnan(flat).sum())
            inf = int(torch.isinf(flat).sum())
            first = int((~torch.isfinite(flat)).nonzero()[0])
            raise MumoeDataError(f"{where}: {nan:,} NaN and {inf:,} inf values (first at flat index {first:,}); "
                                 "the weights are corrupt — re-download or re-convert the checkpoint")
    return t


class MappedTensor:
    """One tensor (or one leading-dim slice of it) memory-mapped on its own: only its pages are ever mapped,
    so resident memory stays at about one tensor however large the shard is."""

    def __init__(self, file: Path, meta: dict, index: int | None = None) -> None:
        shape, dtype = list(meta["shape"]), _READ_DTYPES[meta["dtype"]]
        size = dtype.itemsize
        for d in shape:
            size *= d
        start = meta["start"]
        if index is not None:  # one slice along dim 0 (one expert of a fused tensor)
            size //= shape[0]
            start += index * size
            shape = shape[1:]
        self.shape, self.dtype, self.start, self.size, self.file = shape, dtype, start, size, file

    def __enter__(self) -> torch.Tensor:
        aligned = self.start - self.start % mmap.ALLOCATIONGRANULARITY
        self._fh = open(self.file, "rb")
        self._map = mmap.mmap(self._fh.fileno(), self.start - aligned + self.size, offset=aligned,
                              access=mmap.ACCESS_READ)
        buf = memoryview(self._map)[self.start - aligned :]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: we never write to it
            return torch.frombuffer(buf, dtype=self.dtype).view(self.shape)

    def __exit__(self, *exc) -> None:
        try:  # callers `del` the tensor inside the block, which releases the buffer
            self._map.close()
        except BufferError:  # a view is still alive: the map is freed with it
            pass
        self._fh.close()


def read_into(file: Path, meta: dict, dst: torch.Tensor, chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """Copy one tensor of a safetensors file into `dst` (its shape) with plain reads: no mapping, and no second
    copy when dst is a contiguous CPU tensor of the file's dtype (else one buffer of the source size). A file
    shorter than its header says is a one-line error."""
    dtype = _READ_DTYPES.get(meta["dtype"])
    if dtype is None:
        raise MumoeFileError(f"{file}: tensor {meta.get('key', '?')} has unsupported dtype {meta['dtype']}")
    where = f"{file}: tensor {meta.get('key', '?')}"
    n = dtype.itemsize
    for d in meta["shape"]:
        n *= d
    direct = dst.device.type == "cpu" and dst.dtype == dtype and dst.is_contiguous()
    if direct or not dst.is_contiguous():
        buf = dst if direct else torch.empty(tuple(meta["shape"]), dtype=dtype)
        _read_bytes(file, meta["start"], buf.view(-1).view(torch.uint8).numpy() if n else None, n)
        if not direct:
            dst.copy_(buf)
        return check_finite(dst, where)
    flat = dst.view(-1)  # converted on the way in chunks of <= chunk_bytes: no full-size second buffer
    step = max(1, chunk_bytes // dtype.itemsize)
    buf = torch.empty(min(step, flat.numel()), dtype=dtype)
    for a in range(0, flat.numel(), step):
        b = min(flat.numel(), a + step)
        part = buf[: b - a]
        _read_bytes(file, meta["start"] + a * dtype.itemsize, part.view(torch.uint8).numpy(), (b - a) * dtype.itemsize)
        flat[a:b].copy_(part)
    return check_finite(dst, where)


def _read_bytes(file: Path, start: int, raw, n: int) -> None:
    """Fill `raw` (a uint8 numpy view) with n bytes of `file` from `start`; a short file is a one-line error."""
    if not n:
        return
    with open(file, "rb", buffering=0) as fh:
        fh.seek(start)
        got = 0
        while got < n:
            k = fh.readinto(memoryview(raw)[got:])
            if not k:
                raise MumoeFileError(f"{file}: truncated (a tensor ends at byte {start + n}, the file at {start + got})")
            got += k


def read_tensor(file: Path, meta: dict) -> torch.Tensor:
    """One tensor of a safetensors file, read into fresh memory (`read_into`)."""
    dtype = _READ_DTYPES.get(meta["dtype"])
    if dtype is None:
        raise MumoeFileError(f"{file}: tensor {meta.get('key', '?')} has unsupported dtype {meta['dtype']}")
    return read_into(file, meta, torch.empty(tuple(meta["shape"]), dtype=dtype))


def _expert_matrices(file: Path, key: str, meta: dict, view: str | None = None):
    """Yield (layer, expert, kind, MappedTensor) for an expert tensor key; a fused gate_up is read per expert
    and split into gate and up by the caller (kind "gate_up_proj"). view: the key as the family names it on
    loading (`models.keys.checkpoint_renamer`; Granite's input_linear is its fused gate_up)."""
    if m := LEGACY.match(key):
        yield int(m["layer"]), int(m["e"]), KIND[m["kind"]], MappedTensor(file, meta)
    elif m := FUSED.match(view or key):
        for e in range(meta["shape"][0]):
            yield int(m["layer"]), e, m["kind"], MappedTensor(file, meta, e)
