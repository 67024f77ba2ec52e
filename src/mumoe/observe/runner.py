"""The one observation runner: a forward (and, when a collector asks, backward) pass with collectors attached.

Every calibrated method gathers its statistics here — expert criteria, HEAPr's atoms, Wanda / μ-MoE input
norms, TAER router keys — and any set of them can share ONE pass (`mumoe compare`).

What the pass exposes, per MoE layer and forward:
- `RouteEvent`: the model's own router output (logits, combine weights, selected experts; never recomputed),
  the block input and the residual stream.
- `Routed` (when a collector sets `needs_experts`): the routed-token dispatch. In every observation of MoE
  layers the experts module's forward is replaced for the pass by one that does the model's experts
  computation itself — (token, slot) pairs sorted by expert, each expert's gate/up/down on its routed tokens
  only, output Σ_j g_j f_j added per token in ascending expert order, the arithmetic of transformers' eager
  experts — and hands every intermediate (expert inputs x, down-projection inputs h, outputs f) to the
  collectors. Expert outputs are therefore the model's own, computed once, not a second time in a hook; and
  since the same computation runs whatever collectors are attached, one pass for several methods gives each
  exactly the scores of its own pass. (transformers' default `grouped_mm` kernel agrees with it to float
  rounding, ~1e-7 relative.)
Padding tokens (`attention_mask == 0`) are dropped before anything reaches a collector.

    stats = ExpertStats(layers)
    run(model, windows, [stats, InputNorms(model)], batch_size=8, device="cpu")
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from ..progress import bar

from ..errors import MumoeError
from ..models import MoELayer, adapter_for
from ..models.swap import restore_forward, set_forward


@dataclass
class RouteEvent:
    """One MoE layer's routing for the valid (non-padding) tokens of one forward pass."""

    layer: MoELayer
    logits: torch.Tensor  # [T, E] raw router logits of the routed experts
    weights: torch.Tensor  # [T, k] combine weights the model multiplies expert outputs by
    indices: torch.Tensor  # [T, k] selected experts (>= E: an identity expert, `MoELayer.identity_experts`)
    hidden: torch.Tensor  # [T, H] MoE block input (after the post-attention norm)
    residual: torch.Tensor | None  # [T, H] residual stream h_t (input of the post-attention norm)
    routed_output: torch.Tensor | None = None  # [T, H] Σ_j g_j f_j over routed experts (set after the experts run)
    routed: torch.Tensor | None = None  # [T, k] the slot picked a routed expert (None: every slot did)

    def picks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token [S], expert [S], weight [S]) of every slot that picked a routed expert, token-major; the picks
        of identity experts (LongCat-Flash's zero-computation experts) are left out."""
        T, k = self.indices.shape
        token = torch.arange(T, device=self.indices.device).repeat_interleave(k)
        expert, weight = self.indices.reshape(-1), self.weights.reshape(-1)
        if self.routed is None:
            return token, expert, weight
        m = self.routed.reshape(-1)
        return token[m], expert[m], weight[m]


@dataclass
class Routed:
    """The routed-token dispatch of one MoE layer in one forward: S = T·k (token, slot) pairs of the valid
    tokens, sorted by expert (stable: token order within an expert)."""

    layer: MoELayer
    route: RouteEvent  # with routed_output set
    expert: torch.Tensor  # [S] expert id of each pair, ascending
    token: torch.Tensor  # [S] position of the pair's token among the valid tokens
    slot: torch.Tensor  # [S] which of the k routing slots chose the expert
    weight: torch.Tensor  # [S] combine weight g_expert(token)
    counts: list[int]  # [E] pairs per expert
    x: torch.Tensor  # [S, H] expert input
    h: torch.Tensor  # [S, I] down-projection input act(gate x)·(up x)
    f: torch.Tensor  # [S, H] expert output before the combine weight
    _h_graph: torch.Tensor | None = None  # h as autograd sees it (all pairs, padding included)
    _keep: torch.Tensor | None = None  # [S] indices of the valid pairs in _h_graph (None: all)

    def on_grad_h(self, fn: Callable[[torch.Tensor], None]) -> None:
        """In a backward pass, call fn(∂L/∂h [S, I]) for these pairs once the gradient is known."""
        graph, keep = self._h_graph, self._keep
        if graph is not None and graph.requires_grad:
            graph.register_hook(lambda g: fn(g if keep is None else g[keep]))

    def segments(self) -> Iterable[tuple[int, int, int]]:
        """(expert, start, end) of every expert with routed pairs, rows start:end of x/h/f."""
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                yield e, start, start + n
            start += n


@dataclass
class ExpertEvent:
    """Expert i's output on its routed tokens (of one forward pass, one layer) — `MoEObserver`'s view."""

    layer: MoELayer
    expert: int
    tokens: torch.Tensor  # [n] positions into the valid tokens of the RouteEvent of this pass
    slot: torch.Tensor  # [n] which of the k routing slots selected the expert
    inputs: torch.Tensor  # [n, H] MoE block input of those tokens
    output: torch.Tensor  # [n, H] f_i(x), before the combine weight
    weight: torch.Tensor  # [n] combine weight g_i(t)
    route: RouteEvent | None = None  # the layer's routing event of this pass (with routed_output)


class Collector:
    """Receives what an observation pass sees; override what you need.

    needs_routes: wants `on_route`; needs_experts: wants `on_routed` (installs the observing experts forward);
    needs_backward: the pass must back-propagate the summed LM loss (gradients reach activations only)."""

    needs_routes: bool = True
    needs_experts: bool = False
    needs_backward: bool = False

    def attach(self, obs: Observation) -> None:
        """Install extra hooks (obs.add_handle) before the pass."""

    def on_route(self, ev: RouteEvent) -> None:
        pass

    def on_routed(self, r: Routed) -> None:
        pass

    def on_forward_start(self, obs: Observation) -> None:
        """Called before each forward of the pass (obs.valid is that forward's padding mask)."""

    def detach(self) -> None:
        """After the pass (also on error)."""


class Observation:
    """Context manager: installs the router/residual hooks, the observing experts forward and the collectors'
    own hooks on `model`; removes every one of them on exit (the model is left exactly as it was)."""

    def __init__(self, model: nn.Module, collectors: Sequence[Collector], layers: list[MoELayer] | None = None):
        self.model = model
        self.collectors = list(collectors)
        adapter = adapter_for(model)
        self.layers = layers if layers is not None else adapter.moe_layers()
        self._mask: torch.Tensor | None = None  # [B, L] of the next forward, or None
        self._valid: dict = {}  # (n_tokens, device) -> valid mask of the current attention mask
        self.window_groups: torch.Tensor | None = None  # [B] source index of each window of the next forward
        self.seqlen = 0  # tokens per window of the next forward
        self._handles: list = []
        self._saved_forward: list = []
        self._residual: dict[int, torch.Tensor] = {}
        self._route: dict[int, RouteEvent] = {}
        self._identity: dict[int, torch.Tensor] = {}  # layer -> [T, k] slots that picked an identity expert
        self._routes = [c for c in self.collectors if c.needs_routes or c.needs_experts]
        self._experts = [c for c in self.collectors if c.needs_experts]

    def add_handle(self, handle) -> None:
        self._handles.append(handle)

    # -- padding -------------------------------------------------------------------------------------
    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self._mask

    @attention_mask.setter
    def attention_mask(self, mask: torch.Tensor | None) -> None:
        self._mask = mask
        self._valid = {}

    def valid(self, n_tokens: int, device) -> torch.Tensor | None:
        """Flat [T] bool mask of non-padding tokens of the current forward, or None when every token counts.
        Computed once per forward and token count (every hook of the forward asks; one device sync)."""
        if self._mask is None:
            return None
        key = (n_tokens, str(device))
        if key not in self._valid:
            mask = self._mask.reshape(-1).to(device=device).bool()
            if mask.numel() != n_tokens:  # decoding with a cache: the last tokens of each row
                mask = self._mask[:, -(n_tokens // self._mask.shape[0]):].reshape(-1).to(device).bool()
            self._valid[key] = None if bool(mask.all()) else mask
        return self._valid[key]

    def token_groups(self, device) -> torch.Tensor | None:
        """[T] source index of every valid token of the current forward (None when no groups were given)."""
        if self.window_groups is None:
            return None
        g = self.window_groups.to(device)[:, None].expand(-1, self.seqlen).reshape(-1)
        valid = self.valid(g.numel(), device)
        return g if valid is None else g[valid]

    # -- hooks ---------------------------------------------------------------------------------------
    def _residual_hook(self, layer: MoELayer):
        def hook(module, args):
            self._residual[layer.index] = args[0].detach().reshape(-1, args[0].shape[-1])
        return hook

    def _router_hook(self, layer: MoELayer):
        def hook(module, args, output):
            logits, weights, indices = output[0], output[1], output[2]
            hidden = args[0].detach().reshape(-1, args[0].shape[-1])  # [T, H]
            T, E = hidden.shape[0], layer.num_experts
            valid = self.valid(T, hidden.device)
            residual = self._residual.pop(layer.index, None)
            sel = (lambda t: t) if valid is None else (lambda t: t[valid])
            indices = indices.reshape(T, -1)
            routed = None
            if layer.identity_experts:  # the experts module sees these slots with weight 0: its pairs leave them out
                identity = indices >= E
                self._identity[layer.index] = identity
                routed = sel(~identity)
            event = RouteEvent(layer=layer, logits=sel(logits.detach().reshape(T, -1)[:, :E]),
                               weights=sel(weights.detach().reshape(T, -1)), indices=sel(indices),
                               hidden=sel(hidden), residual=None if residual is None else sel(residual), routed=routed)
            self._route[layer.index] = event
            for c in self._routes:
                c.on_route(event)
        return hook

    def _experts_forward(self, layer: MoELayer):
        """The model's experts computation, once, with its intermediates handed to the collectors."""
        obs = self

        def forward(module, hidden_states, top_k_index, top_k_weights):
            T, k = top_k_index.shape
            E, I = layer.num_experts, layer.intermediate_size
            identity = obs._identity.pop(layer.index, None)  # [T, k] slots of identity experts (weight 0 here)
            if identity is None:
                expert, perm = torch.sort(top_k_index.reshape(-1), stable=True)  # [S]
            else:  # the routed experts' pairs only (what they add is the same: the others are weighted 0)
                pairs = torch.nonzero(~identity.reshape(-1)).flatten()  # [S]
                expert, order = torch.sort(top_k_index.reshape(-1)[pairs], stable=True)
                perm = pairs[order]
            token, slot = perm // k, perm % k
            counts = torch.bincount(expert, minlength=E).tolist()
            x = hidden_states[token]  # [S, H]
            weight = top_k_weights.reshape(-1)[perm].unsqueeze(1)  # [S, 1]
            x, weight = layer.expert_input(x, weight)  # [S, H], [S, 1] (Llama 4: w·x, and 1)
            weight = weight[:, 0]  # [S]
            routed = [e for e, n in enumerate(counts) if n]
            sizes = [counts[e] for e in routed]
            # torch.split, not slicing: in a backward pass each slice's gradient would be a zero-filled [S, ·]
            hs = []
            for e, xe in zip(routed, torch.split(x, sizes)):
                hs.append(layer.expert_hidden(e, xe))  # [n, I]
            h = torch.cat(hs) if hs else x.new_zeros(0, I)  # [S, I]
            del hs  # the per-expert pieces go as soon as they are joined (peak memory of a batch)
            fs = [layer.expert_output(e, he) for e, he in zip(routed, torch.split(h, sizes))]
            f = torch.cat(fs) if fs else torch.zeros_like(x)  # [S, H]
            del fs
            out = torch.zeros_like(hidden_states)  # [T, H]; per token, experts added in ascending order
            out.index_add_(0, token, (f * weight[:, None]).to(out.dtype))
            event = obs._route.pop(layer.index, None)
            if event is not None and obs._experts:
                valid = obs.valid(T, hidden_states.device)
                summed = out.detach()
                event.routed_output = summed if valid is None else summed[valid]
                r = Routed(layer, event, expert, token, slot, weight.detach(), counts, x.detach(), h.detach(),
                           f.detach(), _h_graph=h)
                if valid is not None:
                    r = _only_valid(r, valid)
                for c in obs._experts:
                    c.on_routed(r)
            return out

        return forward

    # -- context -------------------------------------------------------------------------------------
    def __enter__(self) -> Observation:
        try:
            if self._routes:
                for layer in self.layers:
                    if layer.residual_norm is not None:
                        self.add_handle(layer.residual_norm.register_forward_pre_hook(self._residual_hook(layer)))
                    self.add_handle(layer.router.register_forward_hook(self._router_hook(layer)))
            if self._routes:  # every MoE observation runs the same experts computation, whichever collectors
                for layer in self.layers:  # are attached: any combination of methods sees identical activations
                    fwd = types.MethodType(self._experts_forward(layer), layer.experts)
                    self._saved_forward.append((layer.experts, set_forward(layer.experts, fwd)))
            for c in self.collectors:
                c.attach(self)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, previous in reversed(self._saved_forward):
            restore_forward(module, previous)
        self._saved_forward.clear()
        self._residual.clear()
        self._route.clear()
        self._identity.clear()
        for c in self.collectors:
            c.detach()


def _only_valid(r: Routed, valid: torch.Tensor) -> Routed:
    """Drop the pairs of padding tokens; token positions renumbered among the valid tokens."""
    new_pos = torch.cumsum(valid.long(), 0) - 1  # [T]
    keep = torch.nonzero(valid[r.token]).flatten()  # [S'] pairs of valid tokens (order kept)
    counts = torch.bincount(r.expert[keep], minlength=len(r.counts)).tolist()
    return Routed(r.layer, r.route, r.expert[keep], new_pos[r.token[keep]], r.slot[keep], r.weight[keep], counts,
                  r.x[keep], r.h[keep], r.f[keep], _h_graph=r._h_graph, _keep=keep)


class MoEObserver(Observation):
    """Callback form of an observation: `on_route(RouteEvent)`, `on_expert(ExpertEvent)` per routed expert.

        with MoEObserver(model, on_route=fn, on_expert=fn2) as obs:
            obs.attention_mask = mask          # [B, L] or None
            model(input_ids=batch, attention_mask=mask)
    """

    def __init__(self, model: nn.Module, on_route: Callable[[RouteEvent], None] | None = None,
                 on_expert: Callable[[ExpertEvent], None] | None = None, layers: list[MoELayer] | None = None):
        super().__init__(model, [_Callbacks(on_route, on_expert)], layers)


class _Callbacks(Collector):
    def __init__(self, on_route, on_expert) -> None:
        self.route_fn, self.expert_fn = on_route, on_expert
        self.needs_experts = on_expert is not None

    def on_route(self, ev: RouteEvent) -> None:
        if self.route_fn is not None:
            self.route_fn(ev)

    def on_routed(self, r: Routed) -> None:
        for e, a, b in r.segments():
            self.expert_fn(ExpertEvent(r.layer, e, r.token[a:b], r.slot[a:b], r.x[a:b], r.f[a:b], r.weight[a:b],
                                       r.route))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' (cuda when available) | None (cpu) -> torch.device, or a one-line
    error when the device is not there."""
    if device is None:
        return torch.device("cpu")
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise MumoeError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MumoeError(f"device {name!r} asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise MumoeError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")
    return dev


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run(model: nn.Module, windows: torch.Tensor, collectors: Sequence[Collector], *, backward: bool | None = None,
        batch_size: int = 8, device: str | torch.device | None = None, progress: bool = False,
        desc: str = "calibration", layers: list[MoELayer] | None = None,
        attention_mask: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> list[Collector]:
    """Push the windows [N, L] through `model` in batches with every collector attached; one pass for all.

    backward: None = when a collector needs it. A backward pass back-propagates the LM loss (labels = inputs,
    summed over tokens so per-token gradients do not depend on the batch size) to the activations only:
    parameters keep requires_grad=False and get no .grad, and the caller's flags and train/eval mode are
    restored. device: where the model is moved for the pass (None = where it is). groups: [N] source index of
    each window, for collectors that keep per-source sums (EASY-EP over several domains). Returns `collectors`."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
        raise MumoeError(f"no calibration tokens: windows have shape {list(windows.shape)}")
    backward = any(c.needs_backward for c in collectors) if backward is None else backward
    if device is not None:
        model.to(resolve_device(device))
    dev = model_device(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    leaf = None
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        # the embeddings' output is the pass's only leaf (grads reach activations only); the model gets the token
        # ids themselves (DeepSeek-V4's hash layers route by them)
        leaf = model.get_input_embeddings().register_forward_hook(
            lambda module, args, out: out.detach().requires_grad_(True)) if backward else None
        with Observation(model, collectors, layers) as obs:
            for i in bar(range(0, len(windows), batch_size), desc=desc, enabled=progress, unit="batch"):
                ids = windows[i:i + batch_size].to(dev)
                mask = None if attention_mask is None else attention_mask[i:i + batch_size].to(dev)
                obs.attention_mask = mask
                obs.window_groups = None if groups is None else groups[i:i + batch_size]
                obs.seqlen = ids.shape[1]
                for c in collectors:
                    c.on_forward_start(obs)
                if not backward:
                    with torch.no_grad():
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
                    continue
                with torch.enable_grad():
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, L, V]
                    labels = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                       reduction="sum", ignore_index=-100)
                    loss.backward()
    finally:
        if leaf is not None:
            leaf.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return list(collectors)
