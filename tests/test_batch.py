"""Continuous batching of dense requests (`serve.batch`): rows that join at different steps, with prompts of
different lengths, and leave at different steps, get the logits each would get decoded alone (an independent
batch-1 loop: the model with its own cache), on dense and MoE families; models whose cache cannot be padded and
stacked are not batched; the worker gives every request the answer it gets alone."""

from types import SimpleNamespace

import pytest
import torch

import mumoe
from mumoe.compat import cache_kwarg, output_cache
from mumoe.loading import load_tokenizer
from mumoe.serve import Engine, Pruning
from mumoe.serve.app import Job, Worker
from mumoe.models.registry import MOE_TYPES
from mumoe.models.tiny import TINY_CONFIGS, tiny_config
from mumoe.serve.batch import DecodeBatch, Row
from mumoe.testtime.kvcache import batchable_model
from mumoe.serve.engine import Sampling
from conftest import make


def _alone(model, prompt, feed):
    """Batch-1 reference: the prompt's prefill, then `feed` one token at a time. -> logits [1 + len(feed), V]."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        logits, cache = [out.logits[0, -1]], output_cache(out)
        for t in feed:
            out = model(input_ids=torch.tensor([[t]]), **{cache_kwarg(): cache}, use_cache=True)
            logits.append(out.logits[0, -1])
            cache = output_cache(out)
    return torch.stack(logits)


def _batches(family: str) -> bool:
    return batchable_model(SimpleNamespace(config=tiny_config(family)))


FAMILIES = sorted(t for t in TINY_CONFIGS if t in MOE_TYPES)
BATCHED = [f for f in FAMILIES if _batches(f)] + ["llama", "qwen2", "opt"]


@pytest.mark.parametrize("family", BATCHED)
def test_rows_joining_and_leaving_get_their_batch_one_logits(family):
    """Every family whose cache batches (23 MoE families and the dense ones), on its tiny model."""
    model = make(family, seed=1)
    assert batchable_model(model)
    g = torch.Generator().manual_seed(0)
    # (prompt length, step it joins at, tokens it decodes): lengths differ, so every row but the longest is padded
    plan = [(9, 0, 6), (3, 0, 3), (14, 2, 5), (5, 4, 4), (1, 4, 2)]
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n, _, _ in plan]
    feeds = [torch.randint(3, 128, (k,), generator=g).tolist() for _, _, k in plan]
    want = [_alone(model, p, f) for p, f in zip(prompts, feeds)]

    batch = DecodeBatch(torch.device("cpu"))
    got = {i: [] for i in range(len(plan))}
    step = 0
    while step == 0 or len(batch):
        for i, (_, at, _) in enumerate(plan):
            if at == step:
                with torch.no_grad():
                    out = model(input_ids=torch.tensor([prompts[i]]), use_cache=True)
                got[i].append(out.logits[0, -1])
                row = Row(SimpleNamespace(token=feeds[i][0]), len(prompts[i]), {}, length=len(prompts[i]))
                row.on_end = i
                batch.join(row, output_cache(out), model)
        logits = batch.step()
        done = []
        for b, row in enumerate(batch.rows):
            i = row.on_end
            got[i].append(logits[b])
            if len(got[i]) == len(feeds[i]) + 1:
                done.append(b)
            else:
                row.decoding.token = feeds[i][len(got[i]) - 1]
        batch.remove(done)
        step += 1
        if done and len(batch):  # the padding no row needs is trimmed
            assert (batch.valid.any(0)).all()
    for i in range(len(plan)):
        assert torch.allclose(torch.stack(got[i]), want[i], atol=1e-5, rtol=1e-5), (family, i)


def test_caches_that_cannot_be_padded_are_not_batched():
    """Sliding-window or chunked layers (GPT-OSS, Llama 4, Cohere2 ...), recurrent states (Jamba's Mamba, Qwen3-Next's
    gated delta-net ...) and compressed caches (DeepSeek-V3.2 / V4's indexers) keep batch 1: the families that batch
    are exactly those whose every cache layer is a plain `DynamicLayer`."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    for family in FAMILIES:
        try:
            layers = DynamicCache(config=tiny_config(family)).layers
        except KeyError:  # a cache transformers' DynamicCache cannot build (DeepSeek-V4's compressed attention)
            layers = None
        plain = layers is not None and all(type(layer) is DynamicLayer for layer in layers)
        assert _batches(family) == plain, family
    assert {"gpt_oss", "llama4_text", "jamba", "qwen3_next", "deepseek_v4"} <= set(FAMILIES) - set(BATCHED)
    assert len(BATCHED) - 3 == 23


@pytest.fixture(scope="module")
def engine():
    from mumoe.loading import DATA, DEFAULT_MODEL
    from mumoe.observe.calib import tokenize, windows
    from mumoe.retrieval import build_library

    model, tok = mumoe.load("default"), load_tokenizer("default")
    tasks = {d: windows(tokenize(tok, (DATA / d / "calib.txt").read_text("utf-8")), 128, 8) for d in ("code", "prose")}
    library = build_library(model, tasks, keep=8, progress=False)
    return Engine(model, tok, "default", library=library, model_path=str(DEFAULT_MODEL), max_task_models=1)


def _run_worker(engine, jobs, max_batch):
    """The worker on this thread until every job has ended: -> per job, its events."""
    import asyncio

    loop = asyncio.new_event_loop()
    worker = Worker(engine, max_queue=len(jobs), max_batch=max_batch)
    made = []
    for prompts, sampling, pruning in jobs:
        job = Job(loop, prompts, sampling, pruning, timeout=300)
        job.put = lambda ev, job=job: job.log.append(ev)
        job.log = []
        made.append(job)
        worker.submit(job)
    peak = [0]

    def alive():
        peak[0] = max(peak[0], len(worker.batch))
        return not all(j.log and type(j.log[-1]).__name__ == "End" for j in made)

    worker.run(alive=alive)
    loop.close()
    return made, peak[0]


def _answers(job):
    text, done = {}, {}
    for ev in job.log:
        if type(ev).__name__ == "Delta":
            text[ev.index] = text.get(ev.index, "") + ev.text
        elif type(ev).__name__ == "Done":
            done[ev.index] = ev.finished
    return text, done


def test_the_worker_batches_dense_requests_and_answers_each_as_alone(engine):
    """Dense requests (one with two prompts, one sampled with a seed) decode together; a μ-MoE request behind them
    waits for the batch to drain and runs alone, and the dense request behind it after it (arrival order); every
    answer equals the batch-1 worker's."""
    tok = engine.tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = tok(text, add_special_tokens=False)["input_ids"]
    jobs = [([ids[:40]], Sampling(max_tokens=12, temperature=0.0, logprobs=0), Pruning()),
            ([ids[5:12], ids[:25]], Sampling(max_tokens=9, temperature=0.0), Pruning()),
            ([ids[3:50]], Sampling(max_tokens=15, temperature=0.8, seed=7), Pruning()),
            ([ids[:30]], Sampling(max_tokens=10, temperature=0.0), engine.pruning({"active": 0.5})),
            ([ids[:18]], Sampling(max_tokens=20, temperature=0.0, stop=["e"]), Pruning())]
    batched, peak = _run_worker(engine, jobs, max_batch=8)
    assert peak == 4  # the first three jobs' four prompts
    for job, (prompts, sampling, pruning) in zip(batched, jobs):
        text, done = _answers(job)
        assert set(done) == set(range(len(prompts)))
        for i, p in enumerate(prompts):  # each prompt alone: the engine's batch-1 loop
            pieces, entries = [], []
            f = engine.run(p, sampling, pruning, lambda t, e: (pieces.append(t), entries.extend(e)))
            assert text[i] == "".join(pieces)
            assert (done[i].finish_reason, done[i].completion_tokens) == (f.finish_reason, f.completion_tokens)
            got = [e["logprob"] for ev in job.log if type(ev).__name__ == "Delta" and ev.index == i for e in ev.entries]
            assert len(got) == len(entries) and all(abs(a - e["logprob"]) < 1e-4 for a, e in zip(got, entries))
    assert _answers(batched[0])[1][0].completion_tokens == 12 and _answers(batched[4])[1][0].finish_reason == "stop"


def test_task_requests_batch_with_their_task_and_wait_for_another(engine):
    """TAER requests of one task decode together on its task model; a request for another task (the cache holds
    one task model) is parked until that batch drains; a dense request behind them waits too. Every answer equals
    the engine's batch-1 loop, and each task request reports its task."""
    tok = engine.tokenizer
    ids = tok("def main():\n    return parse(argv)\n" * 8, add_special_tokens=False)["input_ids"]
    greedy = Sampling(max_tokens=10, temperature=0.0, logprobs=0)
    jobs = [([ids[:30]], greedy, engine.pruning({"task": "code"})),
            ([ids[4:40], ids[:12]], greedy, engine.pruning({"task": "code"})),
            ([ids[:20]], greedy, engine.pruning({"task": "prose"})),
            ([ids[:25]], greedy, Pruning())]
    batched, peak = _run_worker(engine, jobs, max_batch=8)
    assert peak == 3  # the code requests' three prompts; prose and dense after them
    for job, (prompts, sampling, pruning) in zip(batched, jobs):
        text, done = _answers(job)
        for i, p in enumerate(prompts):
            pieces = []
            f = engine.run(p, sampling, pruning, lambda t, e: pieces.append(t))
            assert text[i] == "".join(pieces) and done[i].completion_tokens == f.completion_tokens
            assert done[i].applied.get("task") == pruning.task and done[i].applied["kind"] == pruning.kind


def test_a_prompt_that_fails_to_start_ends_its_job_and_its_other_rows(engine, monkeypatch):
    """The second prompt of a two-prompt job fails in its prefill: the job gets one 400 and its end, its first
    prompt stops decoding at once (no Done), and the job behind it is answered in full."""
    import mumoe.serve.batch as batch_module
    from mumoe.errors import MumoeError

    real = batch_module.begin

    def failing(engine_, ids, *args):
        if len(ids) == 7:
            raise MumoeError("this prompt cannot start")
        return real(engine_, ids, *args)

    monkeypatch.setattr(batch_module, "begin", failing)
    ids = engine.tokenizer("Once upon a time there was a fox. " * 4, add_special_tokens=False)["input_ids"]
    greedy = Sampling(max_tokens=40, temperature=0.0)
    jobs = [([ids[:20], ids[:7]], greedy, Pruning()), ([ids[:15]], Sampling(max_tokens=5, temperature=0.0), Pruning())]
    made, _ = _run_worker(engine, jobs, max_batch=8)
    kinds = [type(ev).__name__ for ev in made[0].log]
    assert kinds.count("Failed") == 1 and kinds[-1] == "End" and "Done" not in kinds
    assert made[0].log[kinds.index("Failed")].status == 400
    assert sum(len(ev.text) > 0 for ev in made[0].log if type(ev).__name__ == "Delta") <= 1  # its first token only
    text, done = _answers(made[1])
    assert done[0].completion_tokens == 5 and text[0]


def _metaspace_tokenizer():
    """A SentencePiece-style BPE (Metaspace: a leading ▁ per word, stripped from a sequence's first token), trained
    here on a few lines with accents, CJK and emoji."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    text = ["The café's naïve façade — déjà vu.", "東京は晴れです。 今日は良い天気", "emoji 🙂🚀 and more 🙂 text",
            "def f(x):\n    return x  # done"] * 20
    sp.train_from_iterator(text, vocab_size=400, min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp)


@pytest.mark.parametrize("which", ["bundled", "metaspace"])
def test_text_stream_gives_what_one_decode_of_every_id_gives(which):
    """Streamed token by token (random ids: boundaries anywhere, multi-byte characters split across tokens; and a
    real text's ids), the pieces join to the one-shot decode of every id, and no piece ends inside a character."""
    from mumoe.serve.engine import TextStream

    tok = load_tokenizer("default") if which == "bundled" else _metaspace_tokenizer()
    g = torch.Generator().manual_seed(0)
    vocab = len(tok)
    real = tok("Once — naïve café 東京 🙂 upon a time,\n  x = f(y)  # ok", add_special_tokens=False)["input_ids"]
    for ids in [real] + [torch.randint(0, vocab, (200,), generator=g).tolist() for _ in range(5)]:
        stream, pieces = TextStream(tok, []), []
        for t in ids:
            piece, stopped = stream.push(t)
            assert not stopped and "\ufffd" not in piece[-1:]
            pieces.append(piece)
        pieces.append(stream.flush())
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) in (full, full.rstrip("\ufffd"))  # (random ids may end inside a character)
