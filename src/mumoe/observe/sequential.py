"""Layer-sequential calibration: every calibration window pushed through ONE decoder layer at a time.

Only the current layer's weights (from a `LayerwiseCheckpoint`) and the activations are resident: the windows
are embedded, then for each decoder layer ℓ the layer is materialised on the device, all batches run through
it with the collectors attached, `on_layer(ℓ)` is called while its weights are there (score it, or prune it:
progressive / sequential order — then its outputs are recomputed with the pruned layer), its outputs become the
next layer's inputs, and it is freed. With backward collectors (HEAPr) every layer's inputs are kept and a
reverse sweep re-materialises each layer, recomputes it from its stored input and back-propagates the gradient
arriving from above (the summed LM loss of the whole-model pass, computed once at the top).

Activations live in RAM up to `spill_bytes`, beyond that on disk (`Activations`). With a work directory the
sweep is resumable: after each finished layer its results and the next layer's inputs are saved (atomically);
the same call again continues after the last finished layer.

Under torch.distributed (torchrun) each rank takes a contiguous share of the windows and each layer's
statistics are summed over ranks before `on_layer` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from ..progress import bar as progress_bar

from ..errors import MumoeError
from ..models import adapter_for
from ..models.swap import forwards_swapped
from .layerwise import LayerwiseCheckpoint
from .runner import Collector, Observation
from .workdir import WorkDir  # noqa: F401  (re-exported: mumoe.observe.sequential.WorkDir)


class _Stop(Exception):
    pass


class Activations:
    """Tensors by key, in RAM up to `limit` bytes, then in files under `folder` (created on first spill)."""

    def __init__(self, limit: int, folder: Path | None = None) -> None:
        self.limit, self.folder = limit, folder
        self.ram: dict = {}
        self.files: dict = {}
        self.ram_bytes = 0
        self.peak_bytes = 0
        self.spilled_bytes = 0

    def _file(self, key) -> Path:
        if self.folder is None:  # activations of a killed run are swept by the next one that spills
            import tempfile

            from ..files import owned_temp_dir, sweep_stale

            sweep_stale(Path(tempfile.gettempdir()), ("mumoe-act-",))
            self.folder = owned_temp_dir(Path(tempfile.gettempdir()), "mumoe-act-")
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / ("_".join(map(str, key)) + ".pt")

    def put(self, key, t: torch.Tensor, to_disk: bool = False) -> None:
        self.drop(key)
        n = t.numel() * t.element_size()
        if to_disk or self.ram_bytes + n > self.limit:
            f = self._file(key)
            try:
                torch.save(t.detach().cpu(), f)
            except BaseException as e:
                f.unlink(missing_ok=True)  # no partial file left on a full disk
                raise self.failure(e) from e
            self.files[key] = (f, t.device)
            self.spilled_bytes += n
        else:
            self.ram[key] = t.detach()
            self.ram_bytes += n
            self.peak_bytes = max(self.peak_bytes, self.ram_bytes)

    def failure(self, e: BaseException) -> BaseException:
        """A spill that the file system refused, as one line that says where and what to do."""
        from ..files import write_failure

        return write_failure(e, self.folder, f"activations to {self.folder}", self.hint) or e

    hint = ("they spill past --spill-gb of RAM: free space there, raise --spill-gb, or set TMPDIR (or --work-dir) "
            "to a larger disk")

    def get(self, key) -> torch.Tensor:
        if key in self.ram:
            return self.ram[key]
        f, dev = self.files[key]
        return torch.load(f, map_location=dev, weights_only=True)

    def drop(self, key) -> None:
        if key in self.ram:
            t = self.ram.pop(key)
            self.ram_bytes -= t.numel() * t.element_size()
        elif key in self.files:
            f, _ = self.files.pop(key)
            f.unlink(missing_ok=True)

    def close(self) -> None:
        for key in list(self.ram) + list(self.files):
            self.drop(key)


@dataclass
class SweepInfo:
    """What a sweep did: reported by `mumoe prune --layerwise` and the memory benchmark."""

    layers: int = 0
    resumed_after: int | None = None  # index of the last layer finished by an earlier, interrupted run
    activation_bytes: int = 0  # bytes of one layer's inputs (all windows)
    peak_ram_activations: int = 0
    spilled_bytes: int = 0
    ranks: int = 1
    seconds: dict = field(default_factory=dict)


# -- torch.distributed ---------------------------------------------------------------------------------------
def dist_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, nccl on GPU); False when not
    launched by torchrun."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def share(n: int) -> slice:
    """This rank's contiguous share of n windows."""
    rank, world = dist_world()
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (1 if rank < extra else 0))


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over ranks, in place (identity in one process)."""
    import torch.distributed as dist

    if dist_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(t: torch.Tensor) -> torch.Tensor:
    """t's elementwise maximum over ranks, in place (identity in one process)."""
    import torch.distributed as dist

    if dist_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_cat(t: torch.Tensor) -> torch.Tensor:
    """Rows of t [n, ...] of every rank, concatenated in rank order (variable n)."""
    import torch.distributed as dist

    rank, world = dist_world()
    if world == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


# -- resume --------------------------------------------------------------------------------------------------
def fingerprint(*parts) -> str:
    """A short hash of what a resumable run depends on (windows, recipe, checkpoint)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


# called with each state right after the work dir saved it (the kill tests inject a SIGKILL here: tests/killed.py)
SAVE_HOOKS: list[Callable[[dict], None]] = []


def _after_save(state: dict) -> None:
    for hook in SAVE_HOOKS:
        hook(state)


# -- the sweep -----------------------------------------------------------------------------------------------
def _capture(ckpt: LayerwiseCheckpoint, ids: torch.Tensor, mask: torch.Tensor | None,
             carry: str | None = None) -> tuple[torch.Tensor, list]:
    """The first layer's input and every layer's keyword arguments (causal mask, rotary embeddings, ...) for one
    batch, from the model's own forward with the decoder layers replaced by recorders. carry: the keyword a layer
    takes from the one before (`Adapter.layer_carry`): the recorders return (hidden_states, None) as such layers
    do, and the sweep fills the keyword in as it goes."""
    layers = list(ckpt.decoder.layers)
    kwargs: list[dict] = [None] * len(layers)  # type: ignore[list-item]
    first: list[torch.Tensor] = []

    def recorder(j: int):
        def forward(hidden_states, *args, **kw):
            if args:
                raise MumoeError(f"decoder layer {j}: positional arguments beyond hidden_states are not supported")
            if j == 0:
                first.append(hidden_states)
            kwargs[j] = kw
            if j == len(layers) - 1:
                raise _Stop
            return hidden_states if carry is None else (hidden_states, None)
        return forward

    with forwards_swapped((layer, recorder(j)) for j, layer in enumerate(layers)), torch.no_grad():
        try:
            ckpt.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
    return first[0], kwargs


def _loss_grad(ckpt: LayerwiseCheckpoint, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None,
               logits_bytes: int = 64 << 20) -> torch.Tensor:
    """∂L/∂hidden of the summed next-token loss (the whole-model pass's loss), from the last layer's output.
    The loss is a sum over positions and norm + lm_head act per position, so it is back-propagated in chunks of
    positions whose logits stay under `logits_bytes` (vocabularies of 150k make [B, L, V] the largest tensor of
    the pass); the gradient is the same as in one piece."""
    *before, head = (ckpt.model.get_submodule(n) for n in ckpt.head_names())  # (stream collapse,) final norm

    def norm(h: torch.Tensor) -> torch.Tensor:
        for m in before:
            h = m(h)
        return h

    scale = adapter_for(ckpt.model).head_scale()  # the head's own factor on the logits (Cohere, Granite)
    B, L = hidden.shape[:2]  # (DeepSeek-V4: [B, L, streams, H])
    V = head.weight.shape[0]
    step = max(1, logits_bytes // max(1, B * V * 4))
    labels = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # [B, L-1]
    grads = []
    for s in range(0, L, step):
        e = min(L, s + step)
        with torch.enable_grad():
            h = hidden[:, s:e].detach().requires_grad_(True)
            logits = head(norm(h))  # [B, e-s, V]
            if scale != 1.0:
                logits = logits * scale
            n = min(e, L - 1) - s  # positions of this chunk that predict a next token
            if n > 0:
                loss = nn.functional.cross_entropy(logits[:, :n].flatten(0, 1).float(),
                                                   labels[:, s:s + n].flatten(), reduction="sum", ignore_index=-100)
                loss.backward()
        grads.append(h.grad if h.grad is not None else torch.zeros_like(h))
    return torch.cat(grads, dim=1)


def sweep(ckpt: LayerwiseCheckpoint, windows: torch.Tensor, forward: Sequence[Collector] = (),
          backward: Sequence[Collector] = (), *, batch_size: int = 8,
          attention_mask: torch.Tensor | None = None, groups: torch.Tensor | None = None,
          on_layer: Callable[[int], dict | None] | None = None,
          on_layer_backward: Callable[[int], dict | None] | None = None,
          modify: Callable[[int], bool] | None = None,
          spill_bytes: int = 8 << 30, work: WorkDir | None = None, progress: bool = False,
          results: dict | None = None) -> SweepInfo:
    """Run `windows` [N, L] through the checkpoint layer by layer (see the module doc).

    on_layer(ℓ) / on_layer_backward(ℓ): called when layer ℓ's forward (backward) statistics are complete and
    its weights are resident; returns what to keep of layer ℓ (saved in the work dir, handed back in `results`
    on resume). modify(ℓ): after on_layer, may change layer ℓ in place (progressive pruning); returning True
    recomputes its outputs with the changed layer, so layer ℓ+1 sees the pruned model."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
        raise MumoeError(f"no calibration tokens: windows have shape {list(windows.shape)}")
    results = {} if results is None else results
    t_start, read0 = time.perf_counter(), ckpt.read_seconds
    info = SweepInfo(layers=len(ckpt.decoder.layers), ranks=dist_world()[1])
    mine = share(windows.shape[0])
    wins = windows[mine]
    mask_all = None if attention_mask is None else attention_mask[mine]
    grp = None if groups is None else groups[mine]
    dev = ckpt.device
    batches = [(i, min(i + batch_size, len(wins))) for i in range(0, len(wins), batch_size)]
    if not batches:
        raise MumoeError(f"{windows.shape[0]} calibration windows for {info.ranks} ranks: some rank has none; "
                         "use more windows or fewer ranks")
    ids = [wins[a:b].to(dev) for a, b in batches]
    masks = [None if mask_all is None else mask_all[a:b].to(dev) for a, b in batches]
    names = ckpt.layer_names()
    adapter = adapter_for(ckpt.model)
    moe = {layer.index: layer for layer in adapter.moe_layers()}
    carry = adapter.layer_carry
    if carry is not None and work is not None:
        raise MumoeError(f"--work-dir cannot resume {ckpt.config.model_type} yet: its decoder layers pass "
                         f"{carry} on, which a resumed sweep would have to recompute; run without --work-dir")
    spill_dir = work.acts("acts") if work is not None else None
    acts = Activations(spill_bytes, spill_dir)
    if work is not None:
        acts.hint = WORK_HINT
    try:  # a failure or Ctrl-C before the sweep proper still removes spilled activations
        need_bwd = bool(backward)

        state = work.load() if work is not None else None
        start = 0
        if state is not None:
            results.update(state["results"])
            start = state["done"] + 1
            info.resumed_after = state["done"]
            for key, f in state["acts"].items():
                acts.files[key] = (f, dev)

        # embeddings and every layer's keyword arguments (recomputed on resume: cheap, never saved)
        emb_name = ckpt.input_embeddings_name().rsplit(".", 1)[0]
        kwargs = []
        with ckpt.part(emb_name):
            for b in range(len(batches)):
                first, kw = _capture(ckpt, ids[b], masks[b], carry)
                kwargs.append(kw)
                info.activation_bytes += first.numel() * first.element_size()
                if state is None:
                    acts.put((0, b), first, to_disk=work is not None)
        if state is None:
            _check_spill_space(acts, info.activation_bytes, len(names), need_bwd, on_disk=work is not None)
        pending: list = []  # keys dropped once the next state is saved (a kill in between keeps the old state valid)

        def checkpoint(stage: str, j: int) -> None:
            if work is not None:
                work.save({"stage": stage, "done": j, "results": results,
                           "acts": {k: v[0] for k, v in acts.files.items() if k not in pending}}, _after_save)
            for key in pending:
                acts.drop(key)
            pending.clear()

        def observe_layer(j: int, collectors: Sequence[Collector], fn) -> None:
            layers = [moe[j]] if j in moe else []
            with Observation(ckpt.model, collectors, layers) as obs:
                for b, (a, e) in enumerate(batches):
                    obs.attention_mask = masks[b]
                    obs.window_groups = None if grp is None else grp[a:e]
                    obs.seqlen = ids[b].shape[1]
                    for c in collectors:
                        c.on_forward_start(obs)
                    fn(b)

        fwd_stage = list(forward)
        on_disk = work is not None
        bar = progress_bar(total=len(names) * (2 if need_bwd else 1), desc="layer-sequential calibration",
                           enabled=progress, unit="layer")
    except BaseException:  # Ctrl-C here, or anywhere up to the sweep's own try, still removes the spill folder
        if work is None:
            _drop_spill(acts)
        raise
    try:
        if state is None or state["stage"] == "forward":
            bar.update(start)
            for j in range(start, len(names)):
                with ckpt.part(names[j]) as module:
                    if j + 1 < len(names):
                        ckpt.prefetch(names[j + 1])
                    outs: dict[int, torch.Tensor] = {}

                    def run_fwd(b: int) -> None:
                        with torch.no_grad():
                            out = module(acts.get((j, b)), **kwargs[b][j])
                        if carry is not None:  # (hidden_states, what the next layer takes)
                            out, passed = out
                            if j + 1 < len(names):
                                kwargs[b][j + 1][carry] = passed
                        outs[b] = out

                    if fwd_stage:
                        observe_layer(j, fwd_stage, run_fwd)
                    else:
                        for b in range(len(batches)):
                            run_fwd(b)
                    if on_layer is not None:
                        res = on_layer(j)
                        if res is not None:
                            results[j] = res
                    if modify is not None and modify(j):
                        for b in range(len(batches)):
                            run_fwd(b)
                for b in range(len(batches)):
                    acts.put((j + 1, b), outs[b], to_disk=on_disk)
                    if not need_bwd:
                        pending.append((j, b))
                del outs
                checkpoint("forward", j)
                bar.update(1)
        if need_bwd:  # the reverse sweep; ("g", j, b) = ∂L/∂(output of layer j) of batch b
            last = len(names) - 1
            if state is not None and state["stage"] == "backward":
                top = state["done"] - 1
                bar.update(len(names) + last - top)
            else:
                with ExitStack() as parts:  # the loss head: final norm + lm_head
                    for name in ckpt.head_names():
                        parts.enter_context(ckpt.part(name))
                    for b in range(len(batches)):
                        acts.put(("g", last, b), _loss_grad(ckpt, acts.get((last + 1, b)), ids[b], masks[b]),
                                 to_disk=on_disk)
                        pending.append((last + 1, b))
                top = last
            for j in range(top, -1, -1):
                with ckpt.part(names[j]) as module:
                    if j > 0:
                        ckpt.prefetch(names[j - 1])
                    def run_bwd(b: int) -> None:
                        with torch.enable_grad():
                            x = acts.get((j, b)).detach().requires_grad_(True)
                            out = module(x, **kwargs[b][j])
                            if carry is not None:
                                out = out[0]
                            torch.autograd.backward(out, acts.get(("g", j, b)))
                        acts.put(("g", j - 1, b), x.grad, to_disk=on_disk)
                        pending.extend([(j, b), ("g", j, b)])

                    observe_layer(j, backward, run_bwd)
                    if on_layer_backward is not None:
                        res = on_layer_backward(j)
                        if res is not None:
                            results[("bwd", j)] = res
                checkpoint("backward", j)
                bar.update(1)
    finally:
        bar.close()
        info.seconds = {"read": ckpt.read_seconds - read0, "total": time.perf_counter() - t_start}
        info.peak_ram_activations = acts.peak_bytes
        info.spilled_bytes = acts.spilled_bytes
        if work is None:
            _drop_spill(acts)
    return info


WORK_HINT = ("with --work-dir every layer's activations are saved there for a resume: free space, or give a "
             "--work-dir on a larger disk")


def _check_spill_space(acts: Activations, per_layer: int, n_layers: int, backward: bool, on_disk: bool) -> None:
    """Refuse before the first layer when the activations that will be spilled cannot fit on their disk:
    a forward sweep holds two layers' activations at a time (inputs and outputs), one with a backward pass
    every layer's inputs plus two layers' gradients; RAM takes up to the spill limit (none with a work dir)."""
    import tempfile

    from ..files import _existing_parent, human_bytes

    resident = per_layer * ((n_layers + 3) if backward else 2)
    need = resident if on_disk else max(0, resident - acts.limit)
    if need == 0:
        return
    where = acts.folder if acts.folder is not None else Path(tempfile.gettempdir())
    free = shutil.disk_usage(_existing_parent(where)).free
    if free < need:
        raise MumoeError(f"the calibration activations need about {human_bytes(need)} on disk at {where} "
                         f"({human_bytes(per_layer)} per layer), but only {human_bytes(free)} is free there; "
                         + (WORK_HINT if on_disk else Activations.hint.replace("they spill", "they go to disk")))


def _drop_spill(acts: Activations) -> None:
    acts.close()
    if acts.folder is not None:
        shutil.rmtree(acts.folder, ignore_errors=True)
