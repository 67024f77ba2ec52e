"""Column structure, compacted: keep the chosen input columns of each weight and gather the inputs, so the
matmuls are genuinely smaller (no sparse kernel needed).

Dense linears become `CompactLinear` (W[:, keep], x[..., keep]); fused experts get a forward that gathers
each expert's kept input columns for gate_up (of H) and down (of I). `uncompact` puts the originals back.

Unused rows are skipped too. In an MLP down(act(gate x) ⊙ up x) (OPT: fc2(act(fc1 x))) input channel c of
down reads only row c of gate and up, so the rows of gate/up whose down column is masked produce values that
the masked model multiplies by zero: they are not computed at all (exactly the same outputs). Gate/up then
hold W[rows, cols] with rows = down's kept columns, and down needs no input gather. Fused experts likewise.
At ρ = 0.5 this reads ρ² instead of ρ of the gate/up weights.

Gathering columns of a row-major matrix is a strided copy (~3 ms for a 5632×2048 fp32 matrix on this
machine, torch.gather). `prepare_columns` stores every fp32 prunable weight column-major once per model — same
values, same shapes, strides swapped — after which W[:, keep] is a copy of whole contiguous rows of Wᵀ (~0.8 ms),
and the compacted matrix is itself column-major, which an fp32 batch-1 GEMV reads as fast. bf16/fp16 weights on
the CPU stay row-major (`prefers_column_major`): their GEMV is ~1.6x slower column-major.

The compacted copies are written into a buffer kept with each original weight and reused by the next
prompt: a fresh allocation per prompt costs more in page faults than the gather itself. The buffers grow to
the largest ρ used (at most one extra copy of the prunable weights); `release_buffers(model)` frees them.
"""

from __future__ import annotations

import time
import types

import torch
from torch import nn

from ..models import adapter_for
from .gemv import linear as gemv_linear
from .int8 import int8_copy, int8_linear, pad_k
from ..models.swap import restore_forward, set_forward
from ..settings import TensorCache


def is_column_major(w: torch.Tensor) -> bool:
    """True when the last two dims of w [.., d_out, d_in] are stored transposed (Wᵀ contiguous per matrix)."""
    return w.dim() >= 2 and w.transpose(-1, -2).is_contiguous()


def prefers_column_major(w: torch.Tensor) -> bool:
    """Whether per-prompt compaction should store weight w column-major, by measurement (`benchmarks/
    peer_decode.py`, BENCHMARKS.md): on the CPU an fp32 GEMV reads a column-major matrix as fast as a row-major one
    and W[:, keep] becomes a row copy (~4x faster than a column gather); a bf16/fp16 GEMV reads a column-major
    matrix ~1.6x slower (the dense decode would pay it too), so half-precision CPU weights stay row-major and are
    gathered by columns. CUDA reads either layout at full speed: column-major."""
    return w.device.type != "cpu" or w.dtype == torch.float32


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same tensor [.., d_out, d_in] with column-major storage (one copy unless it already is)."""
    return w if is_column_major(w) else w.transpose(-1, -2).contiguous().transpose(-1, -2)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A half-precision tensor viewed as int16 (the same bytes): torch's CPU gather copies int16 ~1.3x faster than
    bf16 (5.2 -> 3.9 ms for 1024 of 2048 columns of a 5632×2048 matrix here); other dtypes as they are."""
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t


_CHUNK = 1 << 19  # elements of the staging block of a two-index gather (2 MB fp32: stays in cache)


def gather_columns(w: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """W[:, keep] of one matrix [d_out, d_in] -> [d_out, k] (with `rows`: W[rows][:, keep] -> [r, k]).
    Column-major w: a row gather of Wᵀ (result column-major too); row-major w: an index_select along the
    columns. `out`: a flat buffer of ≥ r·k elements to write into instead of allocating. With both indices,
    whole lines of the contiguous side are gathered in small blocks, then the other index is picked within
    them, so the source is read once."""
    col_major = is_column_major(w)
    src = w.t() if col_major else w  # contiguous lines: [d_in, d_out] (col-major) or [d_out, d_in]
    first, second = (keep, rows) if col_major else (rows, keep)  # index of src's lines, index within a line
    if first is None:  # row-major w without rows: one gather along the columns (faster than index_select here)
        n_out, n_in = w.shape[0], keep.numel()
        res = (torch.empty(n_out, n_in, dtype=w.dtype, device=w.device) if out is None
               else out[: n_out * n_in].view(n_out, n_in))
        torch.gather(_bits(w), 1, keep.to(w.device).expand(n_out, -1), out=_bits(res))
        return res
    n_lines = first.numel()
    width = src.shape[1] if second is None else second.numel()
    res = (torch.empty(n_lines, width, dtype=w.dtype, device=w.device) if out is None
           else out[: n_lines * width].view(n_lines, width))
    if second is None:
        torch.index_select(src, 0, first, out=res)
    else:
        step = min(max(1, _CHUNK // src.shape[1]), n_lines)
        stage = torch.empty(step, src.shape[1], dtype=w.dtype, device=w.device)
        within = second.to(w.device).expand(step, -1)  # [step, width]: torch.gather beats index_select(dim=1)
        for s in range(0, n_lines, step):
            n = first[s : s + step].numel()
            block = torch.index_select(src, 0, first[s : s + step], out=stage[:n])
            torch.gather(_bits(block), 1, within[:n], out=_bits(res[s : s + n]))
    return res.t() if col_major else res


_BUFFERS = TensorCache()  # weight -> {"buf": flat buffer reused across prompts, "busy": in use}


def _claim(w: torch.Tensor, numel: int) -> tuple[torch.Tensor, list]:
    """A flat buffer of ≥ numel elements kept with weight w and reused across prompts; -> (buffer, undo
    entries). A buffer already in use (nested compaction) is not shared: a fresh one is returned."""
    entry = _BUFFERS.get(w)
    if entry is not None and entry["busy"]:
        return torch.empty(numel, dtype=w.dtype, device=w.device), []
    if entry is None or entry["buf"].numel() < numel:
        entry = {"buf": torch.empty(numel, dtype=w.dtype, device=w.device), "busy": False}
        _BUFFERS.set(w, entry)
    entry["busy"] = True
    return entry["buf"], [(entry, "busy", False)]


def release_buffers(model: nn.Module) -> int:
    """Free the compaction buffers kept with `model`'s weights (they are re-created on the next compaction);
    -> bytes freed."""
    freed = 0
    for p in model.parameters():
        entry = _BUFFERS.get(p)
        if entry is not None and not entry["busy"]:
            freed += entry["buf"].numel() * entry["buf"].element_size()
            _BUFFERS.pop(p)
    return freed


@torch.no_grad()
def prepare_columns(model: nn.Module) -> int:
    """Store every prunable weight of `model` column-major where that layout is the faster one
    (`prefers_column_major`: fp32 on the CPU, any dtype on CUDA), in place (values and shapes unchanged), so that
    per-prompt compaction is cheap. Idempotent; returns the number of weights converted. Costs one copy of each
    converted weight, once per model."""
    from ..models.prunable import prunable_names

    params = dict(model.named_parameters())
    n = 0
    for name in prunable_names(model):
        p = params[name]
        if prefers_column_major(p) and not is_column_major(p):
            p.data = column_major(p.data)
            n += 1
    return n


class CompactLinear(nn.Module):
    """y = W[rows][:, keep] · x[..., keep] + b[rows]. weight [r, k] (r = d_out without `rows`), keep [k].
    gather_input=False: the input already holds exactly the kept columns, in `keep`'s order. int8: the kept part of
    the weight's int8 copy (`apply.int8`) instead — `qweight` [r, k] int8 and `scale` [r] — and `weight` a 0-row
    view of the original (its dtype and device: model code casts inputs to `proj.weight.dtype`, DeepSeek-V3.2's
    indexer)."""

    def __init__(self, linear: nn.Linear, keep: torch.Tensor, out: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None, gather_input: bool = True, int8: bool = False) -> None:
        super().__init__()
        self.original = linear
        self.gather_input = gather_input
        self.register_buffer("keep", keep.to(linear.weight.device), persistent=False)
        if rows is not None:
            rows = rows.to(linear.weight.device)
        if int8:
            q, scale = int8_copy(linear.weight)
            self.weight = linear.weight.detach()[:0]  # [0, d_in], no storage of its own
            self.qweight = pad_k(gather_columns(q, self.keep, out, rows))  # [r, k'] int8, k' = k rounded up to 16
            self.scale = scale if rows is None else scale[rows]  # [r]
        else:
            self.qweight = None
            self.weight = nn.Parameter(gather_columns(linear.weight.detach(), self.keep, out, rows),
                                       requires_grad=False)
        self.bias = linear.bias if rows is None or linear.bias is None else nn.Parameter(
            linear.bias.detach()[rows], requires_grad=False)

    @property
    def read(self) -> int:
        """Elements of the compacted matrix (what a decoded token reads)."""
        return self.keep.numel() * (self.weight if self.qweight is None else self.qweight).shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.index_select(-1, self.keep) if self.gather_input else x
        if self.qweight is not None:
            return int8_linear(x, self.qweight, self.scale, self.bias)
        return gemv_linear(x, self.weight, self.bias)


def _compact_experts_forward(layer, keep_in: torch.Tensor, keep_mid, undo: "Compaction",
                             skip_unused: bool = True, int8: bool = False):
    """keep_in [E, kH] input columns of gate_up per expert; keep_mid [E, kI] intermediate columns of down (a
    tensor, or an object whose `row(e)` gives expert e's on first use: `select.weights.LazyColumns`).
    skip_unused: gate_up keeps only the gate and up rows of the kept channels, [2kI, kH] per expert (else all
    2I rows, and the intermediate is gathered).

    Each expert is compacted the first time a token is routed to it — a decode reaches a fraction of the experts
    (120 of 512 over 128 tokens on the 848M qwen3_moe of BENCHMARKS.md), and the others are never gathered. The
    seconds spent so (with any deferred statistics) add up in `undo.lazy_s`."""
    E, kH, kI = keep_in.shape[0], keep_in.shape[1], keep_mid.shape[1]
    mid_row = keep_mid.row if hasattr(keep_mid, "row") else keep_mid.__getitem__
    gate_up, down = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
    I, H = down.shape[2], down.shape[1]
    gu_scale = dn_scale = None
    if int8:  # gather from the int8 copies; scales of the kept rows
        (gate_up, gu_scale), (down, dn_scale) = int8_copy(layer.experts.gate_up_proj), int8_copy(layer.experts.down_proj)
    n_gu = 2 * (kI if skip_unused else I)  # gate_up rows kept per expert
    buf_gu, rel = _claim(gate_up if int8 else layer.experts.gate_up_proj, E * n_gu * kH)
    undo += rel
    buf_dn, rel = _claim(down if int8 else layer.experts.down_proj, E * H * kI)
    undo += rel
    undo.weights += E * (n_gu * kH + H * kI)
    gu_bias, dn_bias = layer.gate_up_bias, layer.down_bias  # [E, 2I], [E, H] where the experts have biases
    made: dict[int, tuple] = {}  # expert -> (keep_in, gate_up [n_gu, kH], its bias, its scales, down [H, kI],
    # down's bias, down's scales, keep_mid)

    def expert(e: int) -> tuple:
        if e in made:
            return made[e]
        t0 = time.perf_counter()
        km = mid_row(e)  # [kI]
        rows = torch.cat([km, I + km]) if skip_unused else None  # [n_gu]
        gu = gather_columns(gate_up[e], keep_in[e], buf_gu[e * n_gu * kH:], rows)  # [n_gu, kH]
        dn = gather_columns(down[e], km, buf_dn[e * H * kI:])  # [H, kI]
        if int8:  # the kernel's K in blocks of 16
            gu, dn = pad_k(gu), pad_k(dn)
        pick = (lambda v: v) if rows is None else (lambda v: v[rows])
        made[e] = (keep_in[e], gu, None if gu_bias is None else pick(gu_bias[e]),
                   None if gu_scale is None else pick(gu_scale[e]), dn, None if dn_bias is None else dn_bias[e],
                   None if dn_scale is None else dn_scale[e], km)
        undo.lazy_s += time.perf_counter() - t0
        undo.experts_made += 1
        return made[e]

    def linear(x, w, b, scale):
        return gemv_linear(x, w, b) if scale is None else int8_linear(x, w, scale, b)

    def one_token(hidden_states, top_k_index, top_k_weights):
        """A decode step (T = 1): the same sums in the same order (experts ascending), without the per-expert
        token lookups of the general path (a third of the step's operator calls); down and the combine weight in
        one `addmv_` where down is a plain matrix (out += w_e · down_e h_e, in the kernel's accumulator)."""
        out = torch.zeros_like(hidden_states)  # [1, H]
        for e, w in sorted(zip(top_k_index[0].tolist(), top_k_weights[0].tolist())):  # (expert, combine weight)
            k_in, gu, gu_b, gu_s, dn, dn_b, dn_s, km = expert(e)
            x, w = layer.expert_input(hidden_states, w)  # [1, H] (Llama 4: w·x, and 1)
            gate, up = linear(x.index_select(-1, k_in), gu, gu_b, gu_s).chunk(2, dim=-1)  # [1, kI]
            h = layer.activate(gate, up)
            if not skip_unused:
                h = h.index_select(-1, km)
            if dn_s is None and dn_b is None and dn.is_contiguous() and h.dtype == dn.dtype:
                out[0].addmv_(dn, h[0], alpha=w)  # dn [H, kI] row-major
            else:
                out.add_(linear(h, dn, dn_b, dn_s).to(out.dtype), alpha=w)  # [1, H]
        return out

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if hidden_states.shape[0] == 1:
            return one_token(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)  # [T, H]
        for e in torch.unique(top_k_index).tolist():
            k_in, gu, gu_b, gu_s, dn, dn_b, dn_s, km = expert(e)
            tok, slot = torch.where(top_k_index == e)
            x, w = layer.expert_input(hidden_states[tok], top_k_weights[tok, slot, None])  # [n, H], [n, 1]
            x = x.index_select(-1, k_in)  # [n, kH]
            gate, up = linear(x, gu, gu_b, gu_s).chunk(2, dim=-1)  # [n, kI] (skip_unused) or [n, I]
            h = layer.activate(gate, up)
            if not skip_unused:
                h = h.index_select(-1, km)  # [n, kI]
            y = linear(h, dn, dn_b, dn_s)
            if not layer.input_scaled:  # (scaled: w is 1)
                y = y * w
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    return forward


def _columns(mask: torch.Tensor) -> torch.Tensor:
    """Kept input columns of a column-structured mask [.., d_out, d_in] -> [.., k] (same count per matrix)."""
    cols = mask.select(-2, 0) if mask.stride(-2) == 0 else mask.any(-2)  # [.., d_in]; expanded masks: one row
    return torch.stack([c.nonzero().flatten() for c in cols.reshape(-1, cols.shape[-1])]).reshape(*cols.shape[:-1], -1)


class Compaction(list):
    """The undo list of `compact` (entries (owner, attr, original)); `weights`: elements of the compacted
    matrices (what decoding reads; fused experts counted whole, compacted or not yet). `lazy_s`: seconds spent
    compacting experts on first use (inside the decode), `experts_made`: how many. `use(False)` puts the dense
    modules back without releasing anything and `use(True)` the compacted ones again — switching costs no gather
    (e.g. to time both on the same cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = 0
        self.lazy_s = 0.0
        self.experts_made = 0
        self.swapped: list[tuple[object, str, object, object]] = []  # (owner, attr, original, compacted)

    def swap(self, owner, attr: str, compacted) -> None:
        """Install `compacted` as owner.attr, remembering what was there (None: an instance forward was absent)."""
        if attr == "forward":
            original = set_forward(owner, compacted)
        else:
            original = getattr(owner, attr)
            setattr(owner, attr, compacted)
        self.append((owner, attr, original))
        self.swapped.append((owner, attr, original, compacted))

    def use(self, compacted: bool) -> None:
        for owner, attr, original, new in self.swapped:
            _put(owner, attr, new if compacted else original)


def _put(owner, attr: str, value) -> None:
    if attr == "forward":  # None: the class's forward again
        restore_forward(owner, value)
    else:
        setattr(owner, attr, value)


def compact(model: nn.Module, masks: dict[str, torch.Tensor], skip_unused: bool = True,
            int8: bool = False) -> Compaction:
    """Swap in compacted modules / expert forwards for column-structured `masks` (bool masks of each weight's
    shape, or the kept input columns themselves: LongTensor [..., k]); returns the undo list.
    skip_unused: also drop the MLP rows whose outputs the masked consumer never reads (same outputs). int8: the
    compacted matrices come from the weights' int8 copies (`apply.int8`: weight-only, per-row scales)."""
    adapter = adapter_for(model)
    modules = dict(model.named_modules())
    keep_of = {name: _columns(m) if getattr(m, "dtype", None) == torch.bool else m  # param name -> kept input
               for name, m in masks.items()}  # columns [..., k] (fused experts' down: maybe `LazyColumns`)
    rows_of: dict[str, torch.Tensor] = {}  # producer module -> rows its consumer reads
    pre_gathered: set[str] = set()  # consumers whose input arrives already compacted
    if skip_unused:
        for producers, consumer in adapter.mlp_chains():
            if all(f"{n}.weight" in masks for n in (*producers, consumer)):
                rows_of.update({n: keep_of[f"{consumer}.weight"] for n in producers})
                pre_gathered.add(consumer)
    undo = Compaction()
    for name in masks:
        if name.endswith(".weight"):
            mod_name = name[: -len(".weight")]
            parent_name, _, attr = mod_name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            lin = getattr(parent, attr)
            keep, rows = keep_of[name], rows_of.get(mod_name)
            n_rows = lin.weight.shape[0] if rows is None else rows.numel()
            buf, rel = _claim(int8_copy(lin.weight)[0] if int8 else lin.weight, n_rows * keep.numel())
            undo += rel
            small = CompactLinear(lin, keep, buf, rows, gather_input=mod_name not in pre_gathered, int8=int8)
            undo.swap(parent, attr, small)
            undo.weights += small.read
    names = {id(m): n for n, m in modules.items()}
    for layer in adapter.moe_layers():
        prefix = names[id(layer.experts)]
        if f"{prefix}.gate_up_proj" in masks:
            keep_in = keep_of[f"{prefix}.gate_up_proj"]  # [E, kH]
            keep_mid = keep_of[f"{prefix}.down_proj"]  # [E, kI]
            forward = _compact_experts_forward(layer, keep_in, keep_mid, undo, skip_unused, int8)
            undo.swap(layer.experts, "forward", types.MethodType(forward, layer.experts))
    return undo


def uncompact(undo: list) -> None:
    """Put back what `compact` swapped out; its buffers become free for the next prompt."""
    for owner, attr, original in reversed(undo):
        if isinstance(owner, dict):  # a buffer claim
            owner[attr] = original
        else:
            _put(owner, attr, original)
