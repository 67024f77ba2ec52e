"""The serving engine: one model, one request at a time, each request pruned for itself.

A request's pruning (`Pruning`) is one of
    dense      the model as loaded
    mu-moe     μ-MoE: masks at active ratio ρ from the prompt's own dense prefill (row, N:M or column)
    experts    per-prompt expert pruning: the K experts per layer the prompt's prefill routes to most (TCESS)
    task       PreMoe TAER: the prompt matched to a task of the library ("auto") or a named task; decoding runs
               on that task's model, loaded from the checkpoint with only its experts (an LRU cache)

Decoding follows `mumoe generate` exactly: the prompt is prefilled densely (statistics and KV cache), the cache
is cropped by one position and the last prompt token is fed again through the pruned weights, then tokens are
decoded one at a time (greedy at temperature 0, else temperature / top-p sampling from a seeded generator).
With `echo` + `logprobs`, the prompt's own log-probabilities come from one more forward of the prompt through
the request's pruned weights (the prompt scored by the model it chose).
"""

from __future__ import annotations

import functools

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..apply.gemv import fast_decode
from ..apply.step import build as build_step
from ..apply.step import lean_step
from ..compat import cache_kwarg, output_cache
from ..errors import MumoeError
from ..models import stored_weights
from ..recipe import parse_structure
from ..select.weights import check_active
from ..testtime.experts import check_experts
from ..testtime.kvcache import batchable_model, check_refeed, refeed_possible
from ..testtime.protocol import Dense, Experts, MuMoE, PerPrompt, Task, ready_to_decode
from ..testtime.skip import skipping_with

EXTENSION_KEYS = ("active", "structure", "experts", "task")


@dataclass(frozen=True)
class Pruning:
    """What one request's decode runs with (server defaults, overridden by the request's "mumoe" object)."""

    active: float = 1.0  # μ-MoE active-weight ratio ρ; 1 = off
    structure: str = "row"  # μ-MoE structure: row | N:M | column
    experts: int | None = None  # per-prompt expert pruning: experts kept per layer
    task: str | None = None  # TAER: "auto" or a task name of the library

    @property
    def kind(self) -> str:
        if self.task is not None:
            return "task"
        if self.experts is not None:
            return "experts"
        return "mu-moe" if self.active < 1.0 else "dense"


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives per position (0: only the chosen token's)
    echo: bool = False


@dataclass
class Finished:
    """The end of one completion."""

    finish_reason: str  # stop | length | cancelled | timeout
    prompt_tokens: int
    completion_tokens: int
    applied: dict  # what pruning ran, with its overhead in ms
    stats: dict = field(default_factory=dict)  # the protocol's counts and seconds (`Prefilled.stats`), not sent


def _anchor(tokenizer) -> list[int]:
    """One ordinary token that decodes to text on its own (a letter's), put before each decoding window of a
    `TextStream`; [] where the tokenizer has none (then windows are decoded as they are)."""
    try:
        ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode: no anchor
        return []
    return ids[-1:] if ids and tokenizer.decode(ids[-1:], skip_special_tokens=True) else []


class TextStream:
    """Incremental detokenization with stop strings: `push` returns the text that is safe to send (never a
    partial UTF-8 character, never the beginning of a possible stop string) and whether a stop string ended it.

    Each token decodes a short window, not the whole completion: the text the new tokens add is
    decode(a + ids[start:]) minus decode(a + ids[start:read]), where `read` is where the text so far ends, `start`
    where the window before it began, and `a` one ordinary token put first (past the completion's first window), so
    that whatever a decoder does to a sequence's first token (SentencePiece strips its leading space; a skipped
    special token hands that role to the next one) happens to `a` in both. Where the shorter decode is not a prefix
    of the longer one, the whole completion is decoded instead. The text is what one decode of every id gives
    (`tests/test_batch.py` checks it on a byte-level and a SentencePiece tokenizer, random ids included)."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.text = ""  # what may be sent (the decoded text, cut at a stop string)
        self.decoded = ""  # decode(ids[:read])
        self.start = self.read = 0
        self.anchor = _anchor(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        a = self.anchor if self.start else []  # (the completion's own first token stays first, as in one decode)
        before = self._decode(a + self.ids[self.start:self.read])
        after = self._decode(a + self.ids[self.start:])
        if after.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return "", False
        text = self.decoded + after[len(before):] if after.startswith(before) else self._decode(self.ids)
        self.decoded, self.start, self.read = text, self.read, len(self.ids)
        self.text = text
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.text = text[:at]
                return self._take(len(self.text)), True
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._take(max(self.sent, len(text) - hold)), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out


def _top(logp: torch.Tensor, n: int, chosen: int) -> list[tuple[int, float]]:
    """The n most likely tokens of one position and the chosen one: [(id, logprob)], most likely first."""
    vals, idx = logp.topk(n) if n > 0 else (logp[:0], torch.zeros(0, dtype=torch.long))
    out = [(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist())]
    if chosen not in {i for i, _ in out}:
        out.append((chosen, float(logp[chosen])))
    return out


class Decoding:
    """One request's decoding after its prefill: its sampler (a seeded generator), detokenizer and stop strings.
    `take(logits [V])` picks the next token, emits the text that became safe to send (with its log-probabilities
    when asked) and returns why the request ended (stop | length), or None to go on. Shared by the batch-1 loop
    and the batch of dense requests (`serve.batch`), so both decode a request token for token alike."""

    def __init__(self, engine: "Engine", sampling: Sampling, emit, should_stop) -> None:
        self.engine, self.sampling, self.emit, self.should_stop = engine, sampling, emit, should_stop
        self.gen = None
        if sampling.temperature > 0:
            self.gen = torch.Generator(device=engine.device)
            self.gen.manual_seed(sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(6), "big"))
        self.text = TextStream(engine.tokenizer, sampling.stop)
        self.n = 0  # tokens decoded
        self.token: int | None = None  # the last one

    def take(self, logits: torch.Tensor) -> str | None:
        """One position's logits [V] -> the next token, sent; the finish reason, or None to decode on."""
        sampling, engine = self.sampling, self.engine
        token = self.token = engine._pick(logits, sampling, self.gen)
        self.n += 1
        entries = []
        if sampling.logprobs is not None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            entries = [engine._entry(token, float(logp[token]), _top(logp, sampling.logprobs, token))]
        if token in engine.eos:
            self.emit(self.text.flush(), entries)
            return "stop"
        delta, stopped = self.text.push(token)
        if stopped:
            self.emit(delta, entries)
            return "stop"
        if self.n >= sampling.max_tokens:
            self.emit(delta + self.text.flush(), entries)
            return "length"
        self.emit(delta, entries)
        return None


class Engine:
    """A loaded model with its tokenizer, serving defaults and (optionally) a TAER task library."""

    def __init__(self, model: nn.Module, tokenizer, name: str, defaults: Pruning | None = None,
                 library=None, model_path: str | None = None, max_task_models: int = 2,
                 chat_template: str | None = None, taer_only: bool = False, skip=None, int8: bool = False,
                 int4: bool = False) -> None:
        """taer_only: `model` is TAER's matcher (the layers up to the first MoE router, `load_matcher`), not the
        full model: only task requests are served, each decoded by its task's model — the full model is never
        in memory. skip: a `testtime.skip.SkipSetup` — dense requests skip experts per token as it says. int8:
        μ-MoE column requests decode with matrices gathered from int8 copies of the weights (`apply.int8`). int4:
        decode steps read weight-only int4 copies of the linears and routed experts (`apply.int4`, made here; task
        models' too) — prefills and μ-MoE's compacted matrices keep the model's precision."""
        if tokenizer is None:
            raise MumoeError(f"{name} has no tokenizer; mumoe serve needs one")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device = next(model.parameters()).device
        cfg = model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", None) or 2048)
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        self.library, self.model_path, self.taer_only = library, model_path, taer_only
        self.skip = skip
        self.int8 = int8
        if taer_only and (library is None or model_path is None):
            raise MumoeError("a TAER-only server needs a task library and the checkpoint folder")
        if library is not None and not taer_only:
            library.check_model(model)
        self.max_task_models = max_task_models
        self.task_models = None
        if library is not None:
            from ..retrieval.partial import TaskModels

            self.task_models = TaskModels(model_path, library, next(model.parameters()).dtype, self.device,
                                          max_task_models, int4=int4)
        self.total_weights = stored_weights(model)
        if not taer_only:  # one-token steps on the CPU: half-precision linears by torch.mv, only the picked experts
            fast_decode(model, int4_copies=int4)
            build_step(model)  # the lean one-token step of Llama-layout families (apply.step; bit-identical)
        self._protocols: dict[tuple, PerPrompt] = {}
        self.refeed = refeed_possible(model.config)  # per-prompt decode pruning possible (no recurrent layers)
        self.defaults = self.pruning(None, defaults or Pruning())

    @functools.cached_property
    def batching(self) -> bool:
        """Whether requests can decode together (`serve.batch`: a plain attention cache in every layer; a TAER-only
        server's matcher has the full model's kinds of layers)."""
        return batchable_model(self.model)

    def batchable(self, pruning: Pruning) -> bool:
        """Whether a request with this pruning may decode in a batch: dense (without per-token expert skipping, whose
        hooks count per request) or a TAER task (with the other requests of its task), on a model that batches."""
        return self.batching and (pruning.kind == "task" or (pruning.kind == "dense" and self.skip is None))

    # ---- request checks (cheap; run before a request is queued) --------------------------------
    def pruning(self, ext: dict | None, base: Pruning | None = None) -> Pruning:
        """The pruning of one request: `base` (the server defaults) overridden by its "mumoe" object. Setting
        any of active / experts / task replaces the default mode; structure alone keeps it."""
        p = base if base is not None else self.defaults
        ext = {k: v for k, v in (ext or {}).items() if v is not None}
        unknown = sorted(set(ext) - set(EXTENSION_KEYS))
        if unknown:
            raise MumoeError(f"unknown field mumoe.{unknown[0]}; known: {', '.join(EXTENSION_KEYS)}")
        modes = [k for k in ("experts", "task") if k in ext] + (["active"] if ext.get("active", 1.0) != 1.0 else [])
        if len(modes) > 1:
            raise MumoeError(f"mumoe: choose one of active, experts or task per request, got {' and '.join(modes)}")
        if {"active", "experts", "task"} & set(ext):
            p = Pruning(structure=p.structure)
        p = replace(p, **ext)
        if self.taer_only and p.task is None:
            raise MumoeError("this server holds only TAER task models (--taer-only): requests may set "
                             "mumoe.task (auto or a task name), nothing else")
        if isinstance(p.active, bool) or not isinstance(p.active, (int, float)):
            raise MumoeError(f"mumoe.active must be a number in (0, 1], got {p.active!r}")
        check_active(p.active)
        if not isinstance(p.structure, str):
            raise MumoeError(f"mumoe.structure must be a string (row, column or N:M), got {p.structure!r}")
        parse_structure(p.structure)
        if (p.active != 1.0 or p.experts is not None) and not self.refeed:
            check_refeed(self.model, "per-prompt μ-MoE" if p.experts is None else "per-prompt experts")
        if p.experts is not None:
            check_experts(self.model, p.experts)
        if p.task is not None:
            if self.library is None:
                raise MumoeError("mumoe.task needs a task library: start the server with --library LIB")
            if p.task != "auto":
                self.library.task(p.task)
        return replace(p, active=float(p.active))

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise MumoeError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return list(prompt)

    def check_chars(self, text: str, max_tokens: int) -> None:
        """Refuse, before tokenizing, a prompt that cannot fit the context whatever its tokenization: every
        token covers at most `max_token_chars` characters, so more characters than context × that bound means
        more tokens than the context holds."""
        limit = max(0, self.context_length - max_tokens) * self.max_token_chars
        if len(text) > limit:
            raise MumoeError(f"this model's maximum context length is {self.context_length} tokens; the prompt has "
                             f"{len(text):,} characters, more than any {self.context_length - max_tokens} tokens "
                             f"can hold (at most {self.max_token_chars} characters per token)")

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token of this tokenizer decodes to (its longest vocabulary entry, counted in
        UTF-8 bytes, which bounds the characters)."""
        try:
            vocab = self.tokenizer.get_vocab()
            return max(16, max(len(t.encode("utf-8", "surrogatepass")) for t in vocab))
        except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary listing: a generous bound
            return 1024

    def check_length(self, ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise MumoeError("the prompt is empty (no tokens)")
        if len(ids) + max_tokens > self.context_length:
            raise MumoeError(f"this model's maximum context length is {self.context_length} tokens; the request "
                             f"asks for {len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the "
                             "completion)")

    # ---- task models (TAER) --------------------------------------------------------------------
    def task_model(self, task: str) -> tuple[nn.Module, bool]:
        """A task's model from the cache (moved to most recent) or loaded with only its experts. -> (model, cached)"""
        model, cached, _ = self.task_models.get(task)
        return model, cached

    def task_cache_bytes(self) -> int:
        return self.task_models.nbytes() if self.task_models is not None else 0

    def task_models_cached(self) -> int:
        return len(self.task_models) if self.task_models is not None else 0

    def protocol(self, pruning: Pruning) -> PerPrompt:
        """The per-prompt protocol of a request's pruning (`testtime.protocol`), one per setting (a μ-MoE
        pruner plans its model once)."""
        key = (pruning.kind, pruning.active, pruning.structure, pruning.experts, pruning.task)
        if key not in self._protocols:
            if pruning.kind == "mu-moe":
                self._protocols[key] = MuMoE(self.model, pruning.active, pruning.structure,
                                             int8=self.int8 and pruning.structure == "column")
            elif pruning.kind == "experts":
                self._protocols[key] = Experts(pruning.experts)
            elif pruning.kind == "task":
                self._protocols[key] = Task(self.library, self.task_models, pruning.task)
            else:
                self._protocols[key] = Dense()
        return self._protocols[key]

    # ---- one completion ------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, ids: list[int], sampling: Sampling, pruning: Pruning,
            emit: Callable[[str, list[dict]], None], should_stop: Callable[[], str | None] = lambda: None) -> Finished:
        """Complete one prompt. `emit(text, logprob entries)` receives the text as it becomes safe to send (with
        echo, the prompt first); `should_stop()` returns "cancelled" / "timeout" to end early."""
        x = torch.tensor([ids], device=self.device)  # [1, L]
        with skipping_with(self.model, self.skip if pruning.kind == "dense" else None) as count:
            finished = self._run(x, ids, sampling, pruning, emit, should_stop)
        if count is not None:
            finished.applied["skipped"] = round(count.share(), 4)
        return finished

    def _run(self, x: torch.Tensor, ids: list[int], sampling: Sampling, pruning: Pruning, emit,
             should_stop) -> Finished:
        prefilled = self.protocol(pruning).prefill(self.model, x)
        applied = dict(prefilled.info)
        with prefilled.applied() as _:
            st = prefilled.stats
            if "active_weights" not in applied:  # what decoding multiplies by, per token
                applied["active_weights"] = self.total_weights - st.get("removed_weights", 0)
            if sampling.echo:
                self._echo(prefilled.model, x, sampling, emit, prefilled.logits)
            ready_to_decode(prefilled)
            feed, logits = (x[:, -1:], None) if prefilled.refeed else (None, prefilled.logits[:, -1])
            reason, n = self._decode(prefilled.model, prefilled.cache, feed, logits, sampling, emit, should_stop)
        applied["overhead_ms"] = round(1000 * prefilled.overhead_s, 3)  # (with what the decode did lazily)
        return Finished(reason, len(ids), n, applied, prefilled.stats)

    def _echo(self, model: nn.Module, x: torch.Tensor, sampling: Sampling, emit, logits: torch.Tensor | None) -> None:
        """The prompt as text, with its log-probabilities under `model` (as pruned for this request)."""
        ids = x[0].tolist()
        entries = []
        if sampling.logprobs is not None:
            if logits is None or logits.shape[1] != x.shape[1]:  # the prefill kept the last position only
                logits = model(input_ids=x, use_cache=False).logits
            logp = torch.log_softmax(logits[0].float(), dim=-1)  # [L, V]
            entries = [self._entry(ids[0], None, None)] + [
                self._entry(t, float(logp[i, t]), _top(logp[i], sampling.logprobs, t))
                for i, t in enumerate(ids[1:])]
        emit(self.tokenizer.decode(ids, skip_special_tokens=True), entries)

    def _entry(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> dict:
        piece = self.tokenizer.decode([token])
        return {"id": token, "token": piece, "logprob": logprob,
                "top": None if top is None else [(self.tokenizer.decode([i]), lp) for i, lp in top]}

    def _decode(self, model, cache, feed, logits, sampling: Sampling, emit, should_stop) -> tuple[str, int]:
        """Decode up to max_tokens. feed: the token(s) to run first (refeed) or None with `logits` [1, V] given.
        One-token steps run the model's lean step (`apply.step`: bit-identical) where it can run them."""
        if sampling.max_tokens == 0:
            return "length", 0
        state = Decoding(self, sampling, emit, should_stop)
        kw = cache_kwarg()
        step, lean = None, True  # the model's lean one-token step (`apply.step`), where it can run this decode
        while True:
            reason = should_stop()
            if reason:
                return reason, state.n
            if feed is not None:
                if lean and cache is not None:  # decided once per decode (the model stays as it is)
                    step, lean = lean_step(model, cache), False
                if step is not None and feed.shape == (1, 1):
                    logits = step.step(feed, cache)[:, -1]
                else:
                    out = model(input_ids=feed, **{kw: cache}, use_cache=True)
                    logits, cache = out.logits[:, -1], output_cache(out)
            reason = state.take(logits[0])
            if reason:
                return reason, state.n
            feed = torch.tensor([[state.token]], device=self.device)

    @staticmethod
    def _pick(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
        """Greedy at temperature 0; else softmax(logits / T) restricted to the top-p nucleus, sampled. [V] -> id"""
        if sampling.temperature <= 0:
            return int(logits.argmax())
        z = logits.double()
        z = (z - z.max()) / sampling.temperature  # the best token at 0, others <= 0 (-inf at a tiny T): finite
        probs = torch.softmax(z, dim=-1)
        if sampling.top_p < 1.0:
            p, idx = probs.sort(descending=True)
            drop = p.cumsum(0) - p > sampling.top_p  # keep the smallest prefix whose mass reaches top_p
            p[drop] = 0
            return int(idx[torch.multinomial(p / p.sum(), 1, generator=gen)])
        return int(torch.multinomial(probs, 1, generator=gen))
