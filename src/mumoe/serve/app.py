"""The HTTP side of `mumoe serve`: an OpenAI-compatible FastAPI app in front of one `Engine`.

    POST /v1/completions        prompt text or token ids (one or several), max_tokens, temperature, top_p, stop,
                                seed, stream (server-sent events), logprobs + echo (prompt scoring, as lm-eval's
                                local-completions asks), and the "mumoe" extension object
    POST /v1/chat/completions   where the tokenizer has a chat template (or --chat-template)
    GET  /v1/models, /health, /metrics (Prometheus text)

Requests are checked in the event loop (JSON, fields, lengths, pruning settings: a 4xx with OpenAI's error object)
and only then queued; one worker runs the model: on the main thread under `mumoe serve` (HTTP in a thread), in a
thread of its own otherwise. Dense requests decode together (continuous batching, `serve.batch`, up to
`ServerConfig.max_batch` prompts), TAER requests with those of their task; a request pruned for itself alone runs
alone between batches. A full queue is a 503; a request past its timeout is a 504; a client that disconnects
cancels its request (checked between tokens).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import MumoeError
from .engine import Engine, Finished, Pruning, Sampling
from .protocol import ChatRequest, CompletionRequest, error_body, validation_message

log = logging.getLogger("mumoe.serve")


@dataclass
class ServerConfig:
    max_queue: int = 16  # requests waiting (those decoding not counted); more: 503
    max_batch: int = 8  # dense prompts decoded together (continuous batching); 1: one request at a time
    timeout: float = 600.0  # seconds from arrival to the last token; more: 504
    max_body_bytes: int = 8 << 20  # a request body larger than this: 413, refused before it is read


class BodyLimit:
    """ASGI middleware: a body larger than `limit` bytes is answered 413 at once — from its Content-Length
    before a byte of it is read, or, for a chunked body, as soon as the bytes received pass the limit — so no
    request can hold the server's memory or its event loop with a huge prompt."""

    def __init__(self, app, limit: int, on_refused=None) -> None:
        self.app, self.limit, self.on_refused = app, limit, on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            declared = -1
        if declared > self.limit:
            return await self._refuse(scope, send)
        seen = 0
        started = refused = False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # answered now; the app sees a client that went away
                    refused = True
                    if not started:
                        await self._refuse(scope, send)
                    return {"type": "http.disconnect"}
            return message

        async def sending(message):
            nonlocal started
            if refused:
                return  # the 413 is the answer; whatever the app says after it is dropped
            started = True
            await send(message)

        await self.app(scope, counted, sending)

    async def _refuse(self, scope, send):
        body = json.dumps(error_body(f"the request body is larger than the server's limit of {self.limit:,} bytes "
                                     "(mumoe serve --max-body-mb)", code="request_too_large")).encode()
        if self.on_refused is not None:
            self.on_refused(scope.get("path", ""))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class Delta:
    """Text of choice `index` safe to send, with its log-probability entries."""

    index: int
    text: str
    entries: list


@dataclass(frozen=True)
class Done:
    """Choice `index` is complete."""

    index: int
    finished: Finished


@dataclass(frozen=True)
class Failed:
    """The request failed: the HTTP status and the one-line message."""

    status: int
    message: str


@dataclass(frozen=True)
class End:
    """The worker is done with the job; reason: None, "cancelled" or "timeout"."""

    reason: str | None = None


Event = Delta | Done | Failed | End


class Job:
    """One request on its way through the worker: its prompts, settings and the channel back to its handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompts: list[list[int]], sampling: Sampling,
                 pruning: Pruning, timeout: float) -> None:
        self.loop, self.prompts, self.sampling, self.pruning = loop, prompts, sampling, pruning
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.deadline = time.monotonic() + timeout
        self.arrived = time.perf_counter()
        self.stream = True  # False: text deltas are collected quietly and read with the next other event
        self.quiet: collections.deque = collections.deque()  # those deltas, in order (appends are thread-safe)

    def put(self, event: Event) -> None:
        """Hand an event to the request's handler. A non-streaming request's text deltas do not wake the event
        loop: they wait in `quiet` and `Server.events` hands them out, in order, before the next event that does
        (its Done, End or Failed) — per token, waking the loop thread took the model thread's interpreter lock."""
        if not self.stream and isinstance(event, Delta):
            self.quiet.append(event)
            return
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def should_stop(self) -> str | None:
        if self.cancelled.is_set():
            return "cancelled"
        return "timeout" if time.monotonic() > self.deadline else None


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self, worker: "Worker", engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no `*_created` timestamp series beside every counter
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mumoe_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mumoe_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("mumoe_generation_tokens", "tokens decoded", ["kind"], registry=r)
        self.weight_tokens = Counter(
            "mumoe_active_weight_tokens", "sum over decoded tokens of the weights active in their decode (divide "
            "by mumoe_generation_tokens_total for the active weights read per decoded token)", ["kind"], registry=r)
        Gauge("mumoe_queue_length", "requests waiting for the worker", registry=r).set_function(worker.jobs.qsize)
        Gauge("mumoe_requests_running", "prompts being decoded (the dense batch, or the one request running alone)",
              registry=r).set_function(lambda: worker.running)
        Gauge("mumoe_model_weights", "weights of the loaded model", registry=r).set(engine.total_weights)
        Gauge("mumoe_task_models_cached", "TAER task models in memory", registry=r).set_function(
            engine.task_models_cached)
        Gauge("mumoe_task_models_bytes", "bytes held by the cached TAER task models", registry=r).set_function(
            engine.task_cache_bytes)
        self.overhead = Histogram("mumoe_pruning_overhead_seconds", "per-request pruning overhead (statistics, "
                                  "selection, masking or slicing; TAER: matching and loading)", ["kind"], registry=r,
                                  buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("mumoe_request_seconds", "request latency, arrival to last token", ["kind"],
                                 registry=r, buckets=(.05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64, 128))

    def finished(self, f: Finished) -> None:
        kind = f.applied["kind"]
        self.prompt_tokens.inc(f.prompt_tokens)
        self.generation_tokens.labels(kind).inc(f.completion_tokens)
        self.weight_tokens.labels(kind).inc(f.completion_tokens * f.applied.get("active_weights", 0))
        self.overhead.labels(kind).observe(f.applied.get("overhead_ms", 0.0) / 1000)


class Worker:
    """The one thread that runs the model. Requests decode together (continuous batching, `serve.batch`): up to
    `max_batch` prompts at once, each joining between decode steps after its own prefill; a batch decodes one model
    — dense requests the served model, TAER requests their task's model (a prompt prefilled for another model than
    the running batch's is parked until that batch drains, and admission pauses meanwhile). Requests pruned for
    themselves (μ-MoE masks, per-prompt experts) change the weights, so each runs alone: it waits until the running
    batch has drained, and the requests behind it wait for it. max_batch 1: one prompt decoding at a time."""

    def __init__(self, engine: Engine, max_queue: int, max_batch: int = 8) -> None:
        from .batch import DecodeBatch

        self.engine = engine
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.busy = False  # a request running alone
        self.max_batch = max_batch if engine.batching else 1
        self.batch = DecodeBatch(engine.device)
        self.waiting: collections.deque = collections.deque()  # (job, prompt index) admitted, not yet prefilled
        self.parked: list[tuple] = []  # (row, cache, model): prefilled for another model than the batch's
        self.held: Job | None = None  # a request that runs alone, waiting for the batch to drain
        self.left: dict[int, int] = {}  # id(job) -> its prompts not finished
        self.ended: dict[int, str | None] = {}  # id(job) -> why it ended early (cancelled / timeout / failed)
        self.metrics: Metrics | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="mumoe-worker", daemon=True)

    @property
    def running(self) -> int:
        """Requests' prompts being decoded now (parked ones included)."""
        return len(self.batch) + len(self.parked) + int(self.busy)

    def start(self) -> None:
        """Run the worker in its own thread (the app's lifespan does this unless the caller runs `run()`)."""
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put_nowait(job)  # queue.Full: the caller answers 503

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=60)

    def run(self, alive=lambda: True) -> None:
        """Serve jobs on the calling thread until `stop()` (or until `alive()` turns false). `mumoe serve` runs
        this on the main thread: torch's intra-op threads run the model faster from there (the load benchmark:
        the same requests from a second thread took 1.2–2.9× as long on 2 cores)."""
        while not self._stop.is_set() and alive():
            self._admit()
            if len(self.batch):
                self._step()
            elif self.parked:  # the batch drained: the parked prompts of one model start the next
                model = self.parked[0][2]
                for row, cache, m in [p for p in self.parked if p[2] is model][: self.max_batch]:
                    self.batch.join(row, cache, m)
                self.parked = [p for p in self.parked if not any(r is p[0] for r in self.batch.rows)]
            elif self.held is not None and not self.waiting:
                job, self.held = self.held, None
                self._alone(job)

    # ---- scheduling ----------------------------------------------------------------------------
    def _admit(self) -> None:
        """Fill the batch: prompts of admitted jobs first, then new jobs in arrival order, until a request that
        must run alone (held until the batch drains) or the batch is full."""
        while len(self.batch) < self.max_batch and not self.parked:
            if self.waiting:
                self._begin(*self.waiting.popleft())
                continue
            if self.held is not None:
                return
            idle = not len(self.batch)
            try:
                job = self.jobs.get(timeout=0.1) if idle else self.jobs.get_nowait()
            except queue.Empty:
                return
            reason = job.should_stop()
            if reason:
                job.put(End(reason))
                continue
            if not self.engine.batchable(job.pruning):
                if idle:
                    self._alone(job)
                else:
                    self.held = job
                continue
            self.left[id(job)] = len(job.prompts)
            self.waiting.extend((job, i) for i in range(len(job.prompts)))

    def _begin(self, job: Job, i: int) -> None:
        """Prefill prompt i of `job` and let it join the batch — or park it, when it decodes another model than the
        running batch (or finish it, if it ended at its first token)."""
        from .batch import begin

        if id(job) in self.ended:  # an earlier prompt of the job was cancelled, timed out or failed
            return self._close(job, i, None)
        try:
            out = begin(self.engine, job.prompts[i], job.sampling, job.pruning,
                        lambda text, entries, i=i: job.put(Delta(i, text, entries)), job.should_stop)
        except Exception as e:  # noqa: BLE001 - the request's failure, not the server's
            self._fail(job, e)
            self._close(job, i, None)
            return self._drop(job)
        if isinstance(out, Finished):
            return self._close(job, i, out)
        row, cache, model = out
        row.on_end = (job, i)
        if self.batch.accepts(model):
            self.batch.join(row, cache, model)
        else:
            self.parked.append((row, cache, model))

    def _step(self) -> None:
        try:
            ended = self.batch.advance()
        except Exception as e:  # noqa: BLE001 - every running request fails; the server keeps serving
            for row in self.batch.clear():
                job, i = row.on_end
                self._fail(job, e)
                self._close(job, i, None)
            return
        for row, f in ended:
            self._close(*row.on_end, f)

    def _drop(self, job: Job) -> None:
        """The prompts of a failed job that are decoding (or parked) stop now, unanswered."""
        index = [b for b, row in enumerate(self.batch.rows) if row.on_end[0] is job]
        rows = [self.batch.rows[b] for b in index] + [p[0] for p in self.parked if p[0].on_end[0] is job]
        self.batch.remove(index)
        self.parked = [p for p in self.parked if p[0].on_end[0] is not job]
        for row in rows:
            self._close(job, row.on_end[1], None)

    def _fail(self, job: Job, e: Exception) -> None:
        if id(job) in self.ended:
            return
        self.ended[id(job)] = "failed"
        if isinstance(e, MumoeError):
            job.put(Failed(400, str(e).splitlines()[0] if str(e) else type(e).__name__))
        else:  # a bug, not the request: logged, answered
            log.error("request failed:\n%s", "".join(traceback.format_exception(e)))
            job.put(Failed(500, f"internal error: {type(e).__name__}: {e}"))

    def _close(self, job: Job, i: int, f: Finished | None) -> None:
        """Prompt i of `job` is over (f: how it finished; None: it did not run); the job ends with its last."""
        if f is not None and id(job) not in self.ended:
            if self.metrics is not None:
                self.metrics.finished(f)
            job.put(Done(i, f))
            if f.finish_reason in ("cancelled", "timeout"):
                self.ended[id(job)] = f.finish_reason
        self.left[id(job)] -= 1
        if not self.left[id(job)]:
            del self.left[id(job)]
            why = self.ended.pop(id(job), None)
            job.put(End(why if why in ("cancelled", "timeout") else None))

    def _alone(self, job: Job) -> None:
        """A request that runs by itself (batch 1): its prompts one after another."""
        self.busy = True
        end = None
        try:
            for i, ids in enumerate(job.prompts):
                f = self.engine.run(ids, job.sampling, job.pruning,
                                    lambda text, entries, i=i: job.put(Delta(i, text, entries)), job.should_stop)
                if self.metrics is not None:
                    self.metrics.finished(f)
                job.put(Done(i, f))
                if f.finish_reason in ("cancelled", "timeout"):
                    end = f.finish_reason
                    break
        except MumoeError as e:
            job.put(Failed(400, str(e).splitlines()[0] if str(e) else type(e).__name__))
        except Exception as e:  # a bug, not the request: logged, answered, and the server keeps serving
            log.error("request failed:\n%s", traceback.format_exc())
            job.put(Failed(500, f"internal error: {type(e).__name__}: {e}"))
        finally:
            self.busy = False
            job.put(End(end))


class _Reply(Exception):
    """An error answer decided while handling a request."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def _logprobs_block(entries: list[dict]) -> dict:
    """The legacy completions logprobs object from engine entries."""
    tokens, lps, tops, offsets, at = [], [], [], [], 0
    for e in entries:
        tokens.append(e["token"])
        lps.append(e["logprob"])
        tops.append(None if e["top"] is None else {t: lp for t, lp in reversed(e["top"])} if e["top"] else {})
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(entries: list[dict]) -> dict:
    def one(t, lp):
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"] or []]}
                        for e in entries]}


class Server:
    """The app's state and its endpoints: the engine, the settings, the worker and the metrics, in one object
    (`create_app` registers its methods as the routes)."""

    def __init__(self, engine: Engine, config: ServerConfig, worker: Worker, metrics: Metrics) -> None:
        self.engine, self.config, self.worker, self.metrics = engine, config, worker, metrics

    def answer(self, endpoint: str, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    async def _invalid(self, request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return self.answer(request.url.path, 400, error_body(message, param=param))

    async def _http(self, request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return self.answer(request.url.path, exc.status_code,
                           error_body(f"{exc.detail}: {request.method} {request.url.path}", kind))

    async def _reply(self, request: Request, exc: _Reply):
        return self.answer(request.url.path, exc.status, exc.body, exc.headers)

    async def _bug(self, request: Request, exc: Exception):
        log.error("handler failed:\n%s", traceback.format_exc())
        return self.answer(request.url.path, 500,
                           error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    async def health(self):
        return {"status": "ok", "model": self.engine.name, "queue": self.worker.jobs.qsize(),
                "running": int(self.worker.busy)}

    async def models(self):
        return {"object": "list", "data": [{"id": self.engine.name, "object": "model", "created": 0,
                                            "owned_by": "mumoe", "max_model_len": self.engine.context_length}]}

    async def prometheus(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def check_model(self, body) -> None:
        if body.model is not None and body.model != self.engine.name:
            raise _Reply(404, f"the model '{body.model}' does not exist; this server serves '{self.engine.name}'",
                         "not_found_error", "model", "model_not_found")

    async def prepare(self, body, prompts: list, max_tokens: int, sampling: Sampling) -> Job:
        self.check_model(body)
        try:
            for p in prompts:
                if isinstance(p, str):
                    self.engine.check_chars(p, max_tokens)  # before tokenizing: a bound no tokenization can beat
            # tokenized off the event loop: /health and other requests are answered meanwhile
            ids = await asyncio.to_thread(lambda: [self.engine.encode(p) for p in prompts])
            for x in ids:
                self.engine.check_length(x, max_tokens)
            pruning = self.engine.pruning(body.mumoe.model_dump(exclude_unset=True) if body.mumoe else None)
        except MumoeError as e:
            raise _Reply(400, str(e).splitlines()[0]) from e
        return Job(asyncio.get_running_loop(), ids, sampling, pruning, self.config.timeout)

    def submit(self, job: Job) -> None:
        try:
            self.worker.submit(job)
        except queue.Full:
            raise _Reply(503, f"the server is busy ({self.config.max_queue} requests waiting); retry later",
                         "server_busy", code="queue_full", headers={"Retry-After": "1"}) from None

    async def events(self, job: Job, request: Request):
        """The job's events; cancels it when the client goes away or its time is up."""
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), 0.25)
                while job.quiet:  # the deltas put before it (a non-streaming request's)
                    yield job.quiet.popleft()
            except (TimeoutError, asyncio.TimeoutError):
                if await request.is_disconnected():
                    job.cancelled.set()
                if time.monotonic() > job.deadline + 5:  # the worker is stuck in a forward: give up waiting
                    job.cancelled.set()
                    yield End("timeout")
                    return
                continue
            yield ev
            if isinstance(ev, (End, Failed)):
                return

    def timeout_reply(self) -> _Reply:
        return _Reply(504, f"the request did not finish within the server's timeout ({self.config.timeout:g} s)",
                      "timeout", code="timeout")

    async def collect(self, job: Job, request: Request, n: int):
        texts, entries, done = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        async for ev in self.events(job, request):
            if isinstance(ev, Delta):
                texts[ev.index].append(ev.text)
                entries[ev.index] += ev.entries
            elif isinstance(ev, Done):
                done[ev.index] = ev.finished
            elif isinstance(ev, Failed):
                raise _Reply(ev.status, ev.message, "invalid_request_error" if ev.status < 500 else "server_error")
            elif isinstance(ev, End) and ev.reason == "timeout":
                raise self.timeout_reply()
        if any(d is None or d.finish_reason in ("cancelled", "timeout") for d in done):
            raise self.timeout_reply()
        return ["".join(t) for t in texts], entries, done

    def usage(self, done: list[Finished]) -> dict:
        p, c = sum(d.prompt_tokens for d in done), sum(d.completion_tokens for d in done)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(self, obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(self, job: Job, request: Request, endpoint: str, chat: bool, include_usage: bool):
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": self.engine.name}
        done: list[Finished] = []
        status = 200
        try:
            if chat:
                yield self.sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            async for ev in self.events(job, request):
                if isinstance(ev, Delta):
                    if not ev.text and not ev.entries:
                        continue
                    if chat:
                        choice = {"index": ev.index, "delta": {"content": ev.text},
                                  "logprobs": _chat_logprobs(ev.entries) if ev.entries else None, "finish_reason": None}
                    else:
                        choice = {"index": ev.index, "text": ev.text, "finish_reason": None,
                                  "logprobs": _logprobs_block(ev.entries) if ev.entries else None}
                    yield self.sse({**head, "choices": [choice]})
                elif isinstance(ev, Done):
                    f = ev.finished
                    done.append(f)
                    if f.finish_reason in ("cancelled", "timeout"):
                        status = 504
                        yield self.sse(self.timeout_reply().body)
                        return
                    last = {"index": ev.index, "finish_reason": f.finish_reason, "logprobs": None}
                    last.update({"delta": {}} if chat else {"text": ""})
                    yield self.sse({**head, "choices": [last], "mumoe": f.applied})
                elif isinstance(ev, Failed):
                    status = ev.status
                    kind = "invalid_request_error" if ev.status < 500 else "server_error"
                    yield self.sse(error_body(ev.message, kind))
                    return
                elif isinstance(ev, End) and ev.reason == "timeout":
                    status = 504
                    yield self.sse(self.timeout_reply().body)
                    return
            if include_usage:
                yield self.sse({**head, "choices": [], "usage": self.usage(done)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client gone mid-stream: the worker stops at the next token
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if done:
                self.metrics.latency.labels(done[0].applied["kind"]).observe(time.perf_counter() - job.arrived)

    async def completions(self, body: CompletionRequest, request: Request):
        try:
            prompts = body.prompts()
        except ValueError as e:
            raise _Reply(400, str(e), param="prompt") from None
        if body.logprobs is not None and body.logprobs > 5:
            raise _Reply(400, "logprobs must be at most 5", param="logprobs")
        sampling = Sampling(body.max_tokens, body.temperature, body.top_p, body.seed, body.stop, body.logprobs,
                            body.echo)
        job = await self.prepare(body, prompts, body.max_tokens, sampling)
        job.stream = bool(body.stream)
        self.submit(job)
        if body.stream:
            return StreamingResponse(self.stream(job, request, "/v1/completions", False,
                                            bool((body.stream_options or {}).get("include_usage"))),
                                     media_type="text/event-stream")
        texts, entries, done = await self.collect(job, request, len(prompts))
        choices = [{"index": i, "text": t, "logprobs": _logprobs_block(e) if body.logprobs is not None else None,
                    "finish_reason": d.finish_reason, "mumoe": d.applied}
                   for i, (t, e, d) in enumerate(zip(texts, entries, done))]
        self.metrics.latency.labels(done[0].applied["kind"]).observe(time.perf_counter() - job.arrived)
        return self.answer("/v1/completions", 200, {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": self.engine.name, "choices": choices, "usage": self.usage(done), "mumoe": done[0].applied})

    async def chat(self, body: ChatRequest, request: Request):
        if not getattr(self.engine.tokenizer, "chat_template", None):
            raise _Reply(400, f"the tokenizer of '{self.engine.name}' has no chat template; use /v1/completions, or "
                              "start the server with --chat-template FILE")
        self.check_model(body)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            self.engine.check_chars("".join(m["content"] for m in messages), body.token_budget())
            prompt = await asyncio.to_thread(self.engine.tokenizer.apply_chat_template, messages,
                                             add_generation_prompt=True, tokenize=False)
        except ValueError as e:  # MumoeError included
            raise _Reply(400, str(e).splitlines()[0], param="messages") from None
        except Exception as e:  # a template that raises on these messages (jinja errors)
            raise _Reply(400, f"the chat template failed on these messages: {e}", param="messages") from None
        top = body.top_logprobs if body.top_logprobs is not None else 0
        sampling = Sampling(body.token_budget(), body.temperature, body.top_p, body.seed, body.stop,
                            top if body.logprobs else None, False)
        job = await self.prepare(body, [prompt], sampling.max_tokens, sampling)
        job.stream = bool(body.stream)
        self.submit(job)
        if body.stream:
            return StreamingResponse(self.stream(job, request, "/v1/chat/completions", True,
                                            bool((body.stream_options or {}).get("include_usage"))),
                                     media_type="text/event-stream")
        texts, entries, done = await self.collect(job, request, 1)
        self.metrics.latency.labels(done[0].applied["kind"]).observe(time.perf_counter() - job.arrived)
        return self.answer("/v1/chat/completions", 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": self.engine.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                         "logprobs": _chat_logprobs(entries[0]) if body.logprobs else None,
                         "finish_reason": done[0].finish_reason}],
            "usage": self.usage(done), "mumoe": done[0].applied})


def create_app(engine: Engine, config: ServerConfig | None = None, worker_thread: bool = True):
    """The FastAPI app serving `engine`. worker_thread: its worker starts and stops in a thread with the app's
    lifespan; False: the caller runs `app.state.worker.run()` (on the main thread), stopped at shutdown."""
    config = config or ServerConfig()
    worker = Worker(engine, config.max_queue, config.max_batch)
    metrics = worker.metrics = Metrics(worker, engine)
    server = Server(engine, config, worker, metrics)

    @asynccontextmanager
    async def lifespan(app):
        if worker_thread:
            worker.start()
        yield
        worker.stop()

    app = FastAPI(title="mumoe serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.worker, app.state.server = engine, worker, server
    app.add_middleware(BodyLimit, limit=config.max_body_bytes,
                       on_refused=lambda path: metrics.requests.labels(path, "413").inc())
    app.exception_handler(RequestValidationError)(server._invalid)
    app.exception_handler(HTTPException)(server._http)
    app.exception_handler(_Reply)(server._reply)
    app.exception_handler(Exception)(server._bug)
    app.get("/health")(server.health)
    app.get("/v1/models")(server.models)
    app.get("/metrics")(server.prometheus)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat)
    return app
