"""Continuous batching of dense requests: every running request decodes its next token in one forward.

Each request is prefilled alone (batch 1, its own KV cache, exactly as `Engine.run` prefills it) and then joins the
running batch: the batch's cache holds every row's keys and values left-padded to one length [B, heads, S, d], an
attention mask marks each row's real positions, and each row is fed at its own position (`position_ids`), so a row
attends to what it would attend to alone — the batch changes the order of float sums, not what is computed. A row
leaves when its request ends (stop, length, cancelled, timeout); the padding no row needs any more is trimmed.
Requests join between steps, so a new request waits at most one decode step (plus its own prefill).

Only plain attention caches batch this way (every layer a `DynamicLayer`): sliding-window, recurrent (Mamba,
linear attention) and other special layers keep batch 1 (`testtime.kvcache.batchable_model`). A batch decodes one
model:
the served one (dense requests) or one TAER task model (the requests matched to that task; a request whose task
model is another waits, prefilled, for the batch to drain). Per-prompt pruning (μ-MoE masks, per-prompt experts)
changes the weights for one request, so those requests run alone, between batches (`Engine.batchable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..apply.step import lean_step
from ..compat import cache_kwarg, output_cache
from ..testtime.kvcache import grow_in_place
from ..testtime.protocol import ready_to_decode
from .engine import Decoding, Engine, Finished, Pruning, Sampling


@dataclass
class Row:
    """One request in the batch: its decoding state and what `Finished` reports at its end."""

    decoding: Decoding
    prompt_tokens: int
    applied: dict
    stats: dict = field(default_factory=dict)
    on_end: object = None  # whose prompt this is: the worker's (job, prompt index)
    length: int = 0  # positions in its cache (the prompt, then every fed token)

    def finished(self, reason: str) -> Finished:
        return Finished(reason, self.prompt_tokens, self.decoding.n, self.applied, self.stats)


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, heads, S, d] -> [B, heads, width, d], zeros before (width >= S)."""
    if t.shape[-2] == width:
        return t
    out = t.new_zeros(*t.shape[:-2], width, t.shape[-1])
    out[..., width - t.shape[-2]:, :] = t
    return out


class DecodeBatch:
    """The running requests of one model (the served model, or one TAER task model), decoded together (module
    doc). The model is the first row's; `accepts` says whether another request's model is it."""

    def __init__(self, device: torch.device) -> None:
        self.model: nn.Module | None = None
        self.device = device
        self.rows: list[Row] = []
        self.cache = None  # the batch's DynamicCache: every layer [B, heads, S, d]
        self.valid: torch.Tensor | None = None  # [B, S] bool: row b's real positions (its padding False)
        self.lean = None  # the lean step of a one-row batch (`apply.step`), False: none; None: not decided yet

    def __len__(self) -> int:
        return len(self.rows)

    def accepts(self, model: nn.Module) -> bool:
        """Whether a request decoded by `model` can join now (the batch is empty, or runs that model)."""
        return not self.rows or model is self.model

    def join(self, row: Row, cache, model: nn.Module) -> None:
        """Add a prefilled request decoded by `model` (`accepts`): `cache` its own KV cache [1, heads, L, d] per
        layer (row.length = L), whose next token `row.decoding.token` is fed at the next step."""
        if not self.accepts(model):
            raise ValueError("a batch decodes one model")
        grow_in_place(cache)  # (the batch's layers append in place: HF's appends copy the whole cache per token)
        self.lean = None
        L = row.length
        if self.cache is None:
            self.model = model
            self.cache, self.valid = cache, torch.ones(1, L, dtype=torch.bool, device=self.device)
            self.rows = [row]
            self._set_layers([(layer.keys, layer.values) for layer in cache.layers])
            return
        S = self.valid.shape[1]
        W = max(S, L)
        merged = []
        for mine, theirs in zip(self.cache.layers, cache.layers):
            merged.append((torch.cat([_pad_left(mine.keys, W), _pad_left(theirs.keys, W)]),
                           torch.cat([_pad_left(mine.values, W), _pad_left(theirs.values, W)])))
        self._set_layers(merged)
        pad = torch.zeros(len(self.rows), W - S, dtype=torch.bool, device=self.device)
        new = torch.zeros(1, W, dtype=torch.bool, device=self.device)
        new[:, W - L:] = True
        self.valid = torch.cat([torch.cat([pad, self.valid], dim=1), new])
        self.rows.append(row)

    def _set_layers(self, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give the batch cache these keys / values per layer (its layers grow in place from the next step: a
        `GrowingLayer` that does not own the new views starts a fresh buffer from them)."""
        for layer, (k, v) in zip(self.cache.layers, tensors):
            layer.keys, layer.values = k, v

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed every row its last token at its own position: -> next-token logits [B, V]."""
        feed = torch.tensor([[r.decoding.token] for r in self.rows], device=self.device)  # [B, 1]
        if self.lean is None:  # decided once per set of rows (the model does not change while a batch runs)
            self.lean = (len(self.rows) == 1 and bool(self.valid.all()) and lean_step(self.model, self.cache)) or False
        if self.lean:  # one row, no padding: the model's lean step (`apply.step`; the same logits as its forward)
            if self.valid.shape[1] == self.rows[0].length == self.cache.get_seq_length():
                logits = self.lean.step(feed, self.cache)
                self.valid = torch.ones(1, self.valid.shape[1] + 1, dtype=torch.bool, device=self.device)
                self.rows[0].length += 1
                return logits[:, -1]
        positions = torch.tensor([[r.length] for r in self.rows], device=self.device)  # [B, 1]
        mask = torch.cat([self.valid, torch.ones(len(self.rows), 1, dtype=torch.bool, device=self.device)], dim=1)
        out = self.model(input_ids=feed, attention_mask=mask.long(), position_ids=positions,
                         **{cache_kwarg(): self.cache}, use_cache=True)
        self.cache, self.valid = output_cache(out), mask
        for r in self.rows:
            r.length += 1
        return out.logits[:, -1]

    def advance(self) -> list[tuple[Row, Finished]]:
        """One decode step of the batch, as the batch-1 loop takes it: rows whose request was cancelled or timed out
        leave first, the rest take their next token from one forward. -> [(row, its Finished)] of the rows that
        ended (they have left the batch)."""
        ended: list[tuple[int, str]] = [(i, why) for i, r in enumerate(self.rows) if (why := r.decoding.should_stop())]
        out = [(self.rows[i], self.rows[i].finished(why)) for i, why in ended]
        self.remove([i for i, _ in ended])
        if not self.rows:
            return out
        logits = self.step()  # [B, V]
        ended = [(i, why) for i, r in enumerate(self.rows) if (why := r.decoding.take(logits[i]))]
        out += [(self.rows[i], self.rows[i].finished(why)) for i, why in ended]
        self.remove([i for i, _ in ended])
        return out

    def clear(self) -> list[Row]:
        """Empty the batch (its forward failed): -> the rows it held."""
        rows, self.rows, self.lean = self.rows, [], None
        self.cache = self.valid = self.model = None
        return rows

    def remove(self, done: list[int]) -> None:
        """Drop rows `done` (indices) and the leading positions that are padding in every row left."""
        if not done:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        self.lean = None
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.valid = self.model = None
            return
        index = torch.tensor(keep, device=self.device)
        valid = self.valid.index_select(0, index)
        start = int((~valid).all(0).long().cumprod(0).sum())  # leading columns that are padding in every row
        self.valid = valid[:, start:]
        self._set_layers([(layer.keys.index_select(0, index)[..., start:, :],
                           layer.values.index_select(0, index)[..., start:, :]) for layer in self.cache.layers])


@torch.no_grad()
def begin(engine: Engine, ids: list[int], sampling: Sampling, pruning: Pruning, emit, should_stop
          ) -> tuple[Row, object, nn.Module] | Finished:
    """A batchable request's prefill and first token, as `Engine.run` does them (dense: the model; task: matched
    and prefilled by its task's model): -> (its row, its KV cache, the model that decodes it), ready to join a
    `DecodeBatch` of that model, or its `Finished` when it ended already (max_tokens 0, end of text, a stop
    string, cancelled)."""
    x = torch.tensor([ids], device=engine.device)  # [1, L]
    prefilled = engine.protocol(pruning).prefill(engine.model, x)
    assert not prefilled.refeed, "a batched request decodes the weights it was prefilled with"
    applied = {"active_weights": engine.total_weights, **prefilled.info,
               "overhead_ms": round(1000 * prefilled.overhead_s, 3)}
    if sampling.echo:
        engine._echo(prefilled.model, x, sampling, emit, prefilled.logits)
    ready_to_decode(prefilled)
    row = Row(Decoding(engine, sampling, emit, should_stop), len(ids), applied, prefilled.stats, length=len(ids))
    if sampling.max_tokens == 0:
        return row.finished("length")
    reason = should_stop() or row.decoding.take(prefilled.logits[0, -1])
    return row.finished(reason) if reason else (row, prefilled.cache, prefilled.model)
