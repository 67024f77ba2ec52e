"""`mumoe serve` over real HTTP on 127.0.0.1, spoken to with the real `openai` client (and `requests` for the
malformed bodies no client would send). The server runs in a thread of this process (uvicorn, the same app the
CLI starts) on the bundled model; the CLI itself, SIGTERM and the lm-eval run are separate tests."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

import mumoe  # noqa: E402
from mumoe.loading import DEFAULT_MODEL, DATA, load_tokenizer  # noqa: E402
from mumoe.serve import Engine, Pruning  # noqa: E402
from mumoe.serve.app import ServerConfig, create_app  # noqa: E402
from mumoe.serve.launch import free_port  # noqa: E402
from mumoe.models import adapter_for  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PROSE = (DATA / "prose" / "eval.txt").read_text("utf-8")
PROMPT = PROSE[:240]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def model_tok():
    return mumoe.load("default"), load_tokenizer("default")


@pytest.fixture(scope="module")
def library(model_tok):
    from mumoe.observe.calib import tokenize, windows
    from mumoe.retrieval import build_library

    model, tok = model_tok
    tasks = {d: windows(tokenize(tok, (DATA / d / "calib.txt").read_text("utf-8")), 128, 8) for d in ("code", "prose")}
    return build_library(model, tasks, keep=8, progress=False)


@contextmanager
def serving(engine: Engine, **config):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerConfig(**config)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(model_tok, library):
    model, tok = model_tok
    engine = Engine(model, tok, "default", library=library, model_path=str(DEFAULT_MODEL), max_task_models=1,
                    chat_template=TEMPLATE)
    with serving(engine, max_queue=4, timeout=120) as url:
        yield url, engine


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def generate_cli(*args: str) -> str:
    """`mumoe generate` as a user runs it; -> the generated text (stdout minus the prompt and the stats)."""
    r = subprocess.run([sys.executable, "-m", "mumoe", "generate", "--quiet", "--prompt", PROMPT, *args],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("\n\n[μ-MoE]")[0]
    assert text.startswith(PROMPT)
    return text[len(PROMPT):]


# ---- completions ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["row", "column"])
def test_pruned_completion_equals_mumoe_generate(server, model_tok, structure):
    url, _ = server
    if structure == "row":  # the command itself
        want = generate_cli("--active", "0.5", "--structure", structure, "--max-new-tokens", "24")
    else:  # what the command calls (mumoe.testtime.generate), in this process
        from mumoe.testtime import generate

        model, tok = model_tok
        ids = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
        res = generate(model, ids, 0.5, structure, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        want = tok.decode(res.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    r = client(url).completions.create(model="default", prompt=PROMPT, max_tokens=24, temperature=0,
                                       extra_body={"mumoe": {"active": 0.5, "structure": structure}})
    assert r.choices[0].text == want
    assert r.mumoe["kind"] == "mu-moe" and r.mumoe["active"] == 0.5 and r.mumoe["structure"] == structure
    assert r.mumoe["overhead_ms"] > 0
    assert r.mumoe["active_weights"] < metrics(url)["mumoe_model_weights"]
    assert r.usage.completion_tokens == len(load_tokenizer()(want)["input_ids"]) or r.choices[0].finish_reason == "length"


def test_dense_completion_equals_hf_generate(server, model_tok):
    url, _ = server
    model, tok = model_tok
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    want = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    c = client(url)
    r = c.completions.create(model="default", prompt=PROMPT, max_tokens=20, temperature=0)
    assert r.choices[0].text == want and r.mumoe["kind"] == "dense"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 20
    assert r.choices[0].finish_reason == "length"
    # token ids as the prompt: the same completion
    r2 = c.completions.create(model="default", prompt=ids, max_tokens=20, temperature=0)
    assert r2.choices[0].text == want
    # several prompts at once: one choice each, in order
    r3 = c.completions.create(model="default", prompt=[PROMPT, PROSE[500:700]], max_tokens=5, temperature=0)
    assert [ch.index for ch in r3.choices] == [0, 1] and r3.choices[0].text == c.completions.create(
        model="default", prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text


def test_streaming_equals_non_streaming(server):
    url, _ = server
    c = client(url)
    for ext in ({}, {"mumoe": {"active": 0.5}}, {"mumoe": {"experts": 8}}):
        whole = c.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0, extra_body=ext)
        chunks = list(c.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body=ext))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == whole.choices[0].text
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].text) >= 2  # really streamed, token by token
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
        assert chunks[-1].usage.completion_tokens == 16


def test_a_non_streaming_answer_collects_its_deltas_quietly(server, monkeypatch):
    """A non-streaming request's text deltas wait beside the event loop (no wake-up per token) and come out in
    order at its end: two prompts with logprobs answer what each streamed alone answers, token for token."""
    from mumoe.serve.app import Job

    url, _ = server
    c = client(url)
    seen = []
    real = Job.put

    def put(self, event):
        seen.append((type(event).__name__, self.stream, len(self.quiet)))
        real(self, event)

    monkeypatch.setattr(Job, "put", put)
    prompts = [PROMPT, PROMPT[: len(PROMPT) // 2]]
    whole = c.completions.create(model="default", prompt=prompts, max_tokens=12, temperature=0, logprobs=1)
    deltas = [q for name, stream, q in seen if name == "Delta"]
    assert len(deltas) >= 2 * 12 and all(stream is False for name, stream, _ in seen)
    assert max(deltas) >= 12  # they piled up: nothing read them token by token
    for choice, p in zip(sorted(whole.choices, key=lambda ch: ch.index), prompts):
        chunks = list(c.completions.create(model="default", prompt=p, max_tokens=12, temperature=0, logprobs=1,
                                           stream=True))
        assert choice.text == "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert choice.logprobs.tokens == [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                                          for t in ch.choices[0].logprobs.tokens]


def test_stop_sequences_and_sampling_seed(server):
    url, _ = server
    c = client(url)
    full = c.completions.create(model="default", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = full[8:11]
    assert stop.strip()
    r = c.completions.create(model="default", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="default", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == r.choices[0].text
    a = c.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    b = c.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    d = c.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=8)
    assert a.choices[0].text == b.choices[0].text != d.choices[0].text


def test_logprobs_and_echo_against_a_plain_forward(server, model_tok):
    """echo + logprobs (lm-eval's loglikelihood request): the prompt's log-probabilities equal log_softmax of one
    plain forward (dense) or of the masked model built independently from the prompt (μ-MoE)."""
    from mumoe.apply.masking import apply_masks, restore
    from mumoe.testtime import prompt_masks

    url, engine = server
    model, tok = model_tok
    ids = tok(PROSE[:120], add_special_tokens=False)["input_ids"]
    c = client(url)
    for ext in ({}, {"mumoe": {"active": 0.5}}):
        r = c.completions.create(model="default", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True,
                                 extra_body=ext)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert r.choices[0].text.startswith(tok.decode(ids))
        with torch.no_grad():
            if ext:
                masks = prompt_masks(model, torch.tensor([ids]), 0.5)
                undo = apply_masks(model, masks)
                try:
                    logits = model(torch.tensor([ids])).logits[0]
                finally:
                    restore(model, undo)
            else:
                logits = model(torch.tensor([ids])).logits[0]
        want = torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(lp.token_logprobs[1:len(ids)], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for t, top in zip(lp.token_logprobs[1:len(ids)], lp.top_logprobs[1:len(ids)]):
            assert max(top.values()) >= t  # the most likely token (and the actual one) are listed
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # generated tokens with logprobs: 3 alternatives each, the chosen one the most likely at temperature 0
    r = c.completions.create(model="default", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and "".join(lp.tokens) == r.choices[0].text
    for t, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) >= 3 and t == max(top.values())


def test_chat_completions(server, model_tok):
    url, _ = server
    _, tok = model_tok
    c = client(url)
    messages = [{"role": "system", "content": "You write prose."}, {"role": "user", "content": PROSE[:80]}]
    r = c.chat.completions.create(model="default", messages=messages, max_tokens=12, temperature=0)
    prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    want = c.completions.create(model="default", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="default", messages=messages, max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == want
    r = c.chat.completions.create(model="default", messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                  top_logprobs=2, extra_body={"mumoe": {"active": 0.5}})
    assert len(r.choices[0].logprobs.content) == 3 and r.mumoe["kind"] == "mu-moe"


def test_engine_uses_no_deprecated_api(server):
    """Every pruning kind, with echo and streaming-sized decodes, with deprecation warnings as errors."""
    import warnings

    _, engine = server
    ids = engine.encode(PROMPT)
    for ext in (None, {"active": 0.5}, {"active": 0.5, "structure": "column"}, {"experts": 8}, {"task": "auto"}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            f = engine.run(ids, mumoe.serve.Sampling(3, 0.0, logprobs=1, echo=True), engine.pruning(ext),
                           lambda *a: None)
        assert f.completion_tokens == 3


def test_models_health(server):
    url, engine = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["default"]
    h = requests.get(url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["queue"] == 0


# ---- the extension object -------------------------------------------------------------------------------------
def test_experts_extension(server):
    url, engine = server
    c = client(url)
    dense = c.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    every = c.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0,
                                 extra_body={"mumoe": {"experts": 16}})
    assert every.choices[0].text == dense and every.mumoe["kind"] == "experts"
    half = c.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0,
                                extra_body={"mumoe": {"experts": 4}})
    assert half.mumoe["experts"] == 4 and half.mumoe["active_weights"] < every.mumoe["active_weights"]
    # the model is whole again afterwards
    assert c.completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text == dense


def test_task_extension_matches_taer_generate(server, model_tok, library):
    """{"task": "auto"}: the matched task and the text equal TAER's own match + partial-load + generate."""
    from mumoe.retrieval.library import match
    from mumoe.retrieval.partial import load_task_model

    url, engine = server
    model, tok = model_tok
    code = (DATA / "code" / "eval.txt").read_text("utf-8")[:300]
    c = client(url)
    seen = []
    for prompt in (code, PROMPT):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        task = match(model, library, torch.tensor([ids])).task
        seen.append(task)
        r = c.completions.create(model="default", prompt=prompt, max_tokens=12, temperature=0,
                                 extra_body={"mumoe": {"task": "auto"}})
        assert r.mumoe["task"] == task and r.mumoe["matched"] is True
        task_model = load_task_model(DEFAULT_MODEL, library, task)
        with torch.no_grad():
            out = task_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                      pad_token_id=tok.eos_token_id)
        assert r.choices[0].text == tok.decode(out[0, len(ids):], skip_special_tokens=True)
        served = engine.task_models.models[task]  # decoded with the one-token paths, as the full model is
        assert all("forward" in layer.experts.__dict__ for layer in adapter_for(served).moe_layers())
    assert seen == ["code", "prose"]
    named = c.completions.create(model="default", prompt=PROMPT, max_tokens=4, temperature=0,
                                 extra_body={"mumoe": {"task": "code"}})
    assert named.mumoe["task"] == "code" and named.mumoe["matched"] is False
    m = metrics(url)
    assert m["mumoe_task_models_cached"] == 1  # --max-task-models 1: the least recently used was dropped
    assert m["mumoe_task_models_bytes"] > 0


def test_taer_only_server_never_holds_the_full_model(server, model_tok, library):
    """--taer-only: the matcher (layers up to the first MoE router) + task models; answers equal the full server's
    task requests, every other mode is refused."""
    from mumoe.retrieval.partial import load_matcher

    url, _ = server
    model, tok = model_tok
    matcher = load_matcher(DEFAULT_MODEL, library)
    engine = Engine(matcher, tok, "default", Pruning(task="auto"), library, str(DEFAULT_MODEL), max_task_models=1,
                    taer_only=True)
    full = sum(p.numel() for p in model.parameters())
    later = sum(p.numel() for layer in model.model.layers[1:] for p in layer.parameters())
    assert engine.total_weights == full - later  # decoder layer 0 (the first MoE router's) and the embeddings
    want = client(url).completions.create(model="default", prompt=PROMPT, max_tokens=10, temperature=0,
                                          extra_body={"mumoe": {"task": "auto"}})
    with serving(engine) as only:
        got = client(only).completions.create(model="default", prompt=PROMPT, max_tokens=10, temperature=0)
        assert got.choices[0].text == want.choices[0].text and got.mumoe["task"] == want.mumoe["task"]
        for ext in ({"active": 1}, {"active": 0.5}, {"experts": 8}):
            with pytest.raises(openai.BadRequestError) as e:
                client(only).completions.create(model="default", prompt=PROMPT, max_tokens=2, extra_body={"mumoe": ext})
            assert "--taer-only" in e.value.message
        assert metrics(only)["mumoe_task_models_bytes"] > 0


# ---- bad requests ----------------------------------------------------------------------------------------------
BAD = [
    ("not json", "{bad", 400, "not valid JSON"),
    ("not an object", "[1, 2]", 400, "JSON object"),
    ("missing prompt", {"model": "default"}, 400, "missing required field 'prompt'"),
    ("unknown field", {"model": "default", "prompt": "x", "frequency": 1}, 400, "unknown field 'frequency'"),
    ("unknown mumoe field", {"model": "default", "prompt": "x", "mumoe": {"actve": 0.5}}, 400, "mumoe.actve"),
    ("active above 1", {"model": "default", "prompt": "x", "mumoe": {"active": 1.5}}, 400, "(0, 1]"),
    ("active 0", {"model": "default", "prompt": "x", "mumoe": {"active": 0}}, 400, "(0, 1]"),
    ("bad structure", {"model": "default", "prompt": "x", "mumoe": {"structure": "diagonal"}}, 400, "structure"),
    ("experts too few", {"model": "default", "prompt": "x", "mumoe": {"experts": 1}}, 400, "between top_k=2"),
    ("experts not int", {"model": "default", "prompt": "x", "mumoe": {"experts": 2.5}}, 400, "experts"),
    ("two modes", {"model": "default", "prompt": "x", "mumoe": {"experts": 4, "active": 0.5}}, 400, "one of"),
    ("unknown task", {"model": "default", "prompt": "x", "mumoe": {"task": "poetry"}}, 400, "unknown task 'poetry'"),
    ("max_tokens beyond context", {"model": "default", "prompt": "x", "max_tokens": 600}, 400, "maximum context"),
    ("prompt beyond context", {"model": "default", "prompt": PROSE[:6000], "max_tokens": 1}, 400, "maximum context"),
    ("negative max_tokens", {"model": "default", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("empty prompt", {"model": "default", "prompt": ""}, 400, "empty"),
    ("empty token list", {"model": "default", "prompt": []}, 400, "empty"),
    ("token id beyond vocab", {"model": "default", "prompt": [5, 99999]}, 400, "outside the vocabulary"),
    ("temperature", {"model": "default", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("n > 1", {"model": "default", "prompt": "x", "n": 2}, 400, "n"),
    ("penalty", {"model": "default", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("logprobs > 5", {"model": "default", "prompt": "x", "logprobs": 9}, 400, "at most 5"),
    ("stream not bool", {"model": "default", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("five stops", {"model": "default", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("unknown model", {"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ("temperature true", {"model": "default", "prompt": "x", "temperature": True}, 400,
     "temperature must be a number, not true"),
    ("max_tokens false", {"prompt": "x", "max_tokens": False}, 400, "max_tokens must be a number"),
    ("experts true", {"prompt": "x", "mumoe": {"experts": True}}, 400, "mumoe.experts must be a number"),
    ("seed beyond 64 bits", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("lone surrogate", '{"prompt": "a\\ud800b"}', 400, "prompt is not valid Unicode"),
    ("lone surrogate in stop", '{"prompt": "ab", "stop": ["\\udfff"]}', 400, "not valid Unicode"),
    ("prompt of 2 MB", {"prompt": "abc " * 500_000}, 400, "characters"),
]


def test_every_bad_request_is_a_4xx_and_the_server_keeps_serving(server):
    url, _ = server
    before = metrics(url)
    for name, body, status, words in BAD:
        data = body if isinstance(body, str) else json.dumps(body)
        r = requests.post(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert words in err["message"], (name, err)
        assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
    for path, body in (("/v1/chat/completions", {"model": "default", "messages": []}),
                       ("/v1/chat/completions", {"model": "default", "messages": [{"role": "robot", "content": "x"}]}),
                       ("/v1/chat/completions", {"model": "default"})):
        r = requests.post(url + path, json=body, timeout=30)
        assert r.status_code == 400 and "error" in r.json(), r.text
    assert requests.get(url + "/v1/nothing", timeout=10).status_code == 404
    assert requests.get(url + "/v1/completions", timeout=10).status_code == 405
    # the real client sees the same as typed errors
    with pytest.raises(openai.BadRequestError) as e:
        client(url).completions.create(model="default", prompt="x", extra_body={"mumoe": {"active": 2}})
    assert "(0, 1]" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="gpt-4", prompt="x")
    # still serving, nothing counted as a 500
    assert client(url).completions.create(model="default", prompt="Hello", max_tokens=2, temperature=0).choices
    after = metrics(url)
    assert not any(k.startswith("mumoe_requests_total") and 'status="500"' in k for k in after)
    got_400 = after.get('mumoe_requests_total{endpoint="/v1/completions",status="400"}', 0) - before.get(
        'mumoe_requests_total{endpoint="/v1/completions",status="400"}', 0)
    assert got_400 == sum(1 for b in BAD if b[2] == 400) + 1


def test_model_may_be_omitted_and_a_tiny_temperature_is_greedy(server):
    """vLLM's and llama.cpp's servers default `model` to the served one; a temperature of 1e-45 (logits / T
    overflow) samples the greedy token instead of failing on inf/nan probabilities."""
    url, _ = server
    greedy = requests.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0},
                           timeout=60)
    assert greedy.status_code == 200, greedy.text
    assert greedy.json()["model"] == "default"
    tiny = requests.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 1e-45,
                                                       "seed": 2**64 - 1}, timeout=60)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    chat = requests.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 2}, timeout=60)
    assert chat.status_code == 200, chat.text


def test_a_20_mb_body_is_refused_and_health_keeps_answering(server):
    """A 20 MB body: 413 from its Content-Length, before it is read; /health answers within 1 s meanwhile,
    and the server's memory does not grow by the body."""
    url, _ = server
    big = json.dumps({"prompt": "word " * 4_000_000}).encode()  # 20 MB
    assert len(big) > 20e6
    result = {}

    def post():
        try:
            result["r"] = requests.post(url + "/v1/completions", data=big,
                                        headers={"Content-Type": "application/json"}, timeout=60)
        except requests.ConnectionError as e:  # the server may close before the client has sent it all
            result["error"] = e

    t = threading.Thread(target=post)
    t.start()
    slowest = 0.0
    while t.is_alive():
        t0 = time.perf_counter()
        assert requests.get(url + "/health", timeout=5).status_code == 200
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.02)
    t.join()
    assert slowest < 1.0, slowest
    if "r" in result:
        r = result["r"]
        assert r.status_code == 413, r.text
        assert "larger than the server's limit" in r.json()["error"]["message"]
    assert metrics(url).get('mumoe_requests_total{endpoint="/v1/completions",status="413"}', 0) >= 1
    # a chunked body (no Content-Length) past the limit: refused as the bytes pass it

    def chunks():
        for _ in range(40):
            yield b" " * (1 << 20)

    r = requests.post(url + "/v1/completions", data=chunks(), headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code == 413, r.text


def test_schema_fuzz_never_a_5xx(server):
    """A few hundred requests generated from the request schema — right and wrong types, extremes, the
    served model's name or another, the mumoe extension — each answered with a 2xx or a 4xx, never a 5xx."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url, engine = server
    anything = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=8), st.lists(st.integers(-5, 200), max_size=4))
    num = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-3, 3), st.just(1e-45),
                    st.booleans(), anything)
    text = st.text(st.characters(codec="utf-8"), max_size=40) | st.just("\ud800")
    extension = st.fixed_dictionaries({}, optional={
        "active": num, "structure": st.sampled_from(["row", "column", "2:4", "9:4", "x"]) | anything,
        "experts": st.integers(-1, 12) | anything, "task": st.sampled_from(["auto", "code", "nope"]) | anything})
    body = st.fixed_dictionaries({}, optional={
        "model": st.sampled_from([engine.name, "gpt-4"]) | anything,
        "prompt": text | st.lists(st.integers(-2, 300), max_size=6) | st.lists(text, max_size=2) | anything,
        "max_tokens": st.integers(-1, 3) | anything, "temperature": num, "top_p": num,
        "seed": st.integers(-2**65, 2**65) | anything, "stop": text | st.lists(text, max_size=5) | anything,
        "logprobs": st.integers(-1, 7) | anything, "echo": st.booleans() | anything, "n": st.integers(0, 2),
        "stream": st.booleans() | anything, "mumoe": extension | anything, "best_of": st.integers(0, 2)})
    typed = st.fixed_dictionaries({"prompt": st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)}, optional={
        "model": st.just(engine.name), "max_tokens": st.integers(0, 3),
        "temperature": st.sampled_from([0.0, 1e-45, 1e-8, 0.7, 2.0]) | st.floats(0, 2),
        "top_p": st.sampled_from([1e-300, 0.5, 1.0]) | st.floats(0, 1, exclude_min=True),
        "seed": st.integers(-2**63, 2**64 - 1), "stop": st.lists(st.text(max_size=3), max_size=4),
        "logprobs": st.integers(0, 5), "echo": st.booleans(), "stream": st.booleans(),
        "mumoe": st.fixed_dictionaries({}, optional={"active": st.floats(0.01, 1), "structure": st.sampled_from(
            ["row", "column", "2:4"])}) | st.fixed_dictionaries({"experts": st.integers(2, 8)})})
    body = typed | body
    statuses = []

    @settings(max_examples=200, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body)
    def one(b):
        raw = json.dumps(b).encode("utf-8", "surrogatepass")
        r = requests.post(url + "/v1/completions", data=raw, headers={"Content-Type": "application/json"},
                          timeout=120)
        statuses.append(r.status_code)
        assert r.status_code < 500, (b, r.status_code, r.text[:500])

    one()
    assert len(statuses) == 200 and 200 in statuses and 400 in statuses


def test_chat_without_template_is_a_400(model_tok):
    model, tok = model_tok
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    assert not plain.chat_template
    with serving(Engine(model, plain, "default")) as url:
        with pytest.raises(openai.BadRequestError) as e:
            client(url).chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
        assert "no chat template" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            client(url).completions.create(model="default", prompt="x", extra_body={"mumoe": {"task": "auto"}})
        assert "--library" in e.value.message


# ---- serving discipline ----------------------------------------------------------------------------------------
def test_metrics_count_tokens_and_overhead(server):
    url, _ = server
    before = metrics(url)
    c = client(url)
    r1 = c.completions.create(model="default", prompt=PROMPT, max_tokens=7, temperature=0,
                              extra_body={"mumoe": {"active": 0.5}})
    r2 = c.completions.create(model="default", prompt=PROMPT, max_tokens=5, temperature=0)
    after = metrics(url)
    key = 'mumoe_generation_tokens_total{kind="%s"}'
    assert after[key % "mu-moe"] - before.get(key % "mu-moe", 0) == r1.usage.completion_tokens == 7
    assert after[key % "dense"] - before.get(key % "dense", 0) == r2.usage.completion_tokens == 5
    assert after["mumoe_prompt_tokens_total"] - before["mumoe_prompt_tokens_total"] == 2 * r1.usage.prompt_tokens
    wkey = 'mumoe_active_weight_tokens_total{kind="mu-moe"}'
    assert after[wkey] - before.get(wkey, 0) == 7 * r1.mumoe["active_weights"]
    okey = 'mumoe_pruning_overhead_seconds_sum{kind="mu-moe"}'
    assert after[okey] - before.get(okey, 0) == pytest.approx(r1.mumoe["overhead_ms"] / 1000, rel=1e-6)
    assert after["mumoe_queue_length"] == 0 and after["mumoe_requests_running"] == 0


def test_full_queue_is_a_503_and_nothing_is_lost(model_tok):
    """One prompt decoding at a time (--max-batch 1) and one waiting: the others are refused with 503."""
    model, tok = model_tok
    with serving(Engine(model, tok, "default"), max_queue=1, max_batch=1, timeout=120) as url:
        results, headers = [], []

        def one():
            r = requests.post(url + "/v1/completions", json={"model": "default", "prompt": PROMPT, "max_tokens": 40,
                                                             "temperature": 0}, timeout=120)
            results.append((r.status_code, r.json()))
            headers.append((r.status_code, r.headers))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        codes = sorted(s for s, _ in results)
        assert len(codes) == 6 and set(codes) <= {200, 503} and 503 in codes and codes.count(200) >= 2
        texts = {b["choices"][0]["text"] for s, b in results if s == 200}
        assert len(texts) == 1  # every served request got the same, complete greedy answer
        assert all(b["error"]["code"] == "queue_full" for s, b in results if s == 503)
        assert all(h.get("Retry-After") == "1" for s, h in headers if s == 503)
        assert metrics(url)['mumoe_requests_total{endpoint="/v1/completions",status="503"}'] == codes.count(503)


def test_concurrent_dense_requests_decode_together_over_http(model_tok):
    """Six clients at once with the default batch: every request is answered, each with the greedy answer it gets
    alone, and the server decoded several at once (its running gauge, read while they run)."""
    model, tok = model_tok
    with serving(Engine(model, tok, "default"), timeout=120) as url:
        body = {"model": "default", "max_tokens": 30, "temperature": 0}
        prompts = [PROMPT[: 40 + 30 * k] for k in range(6)]
        alone = [requests.post(url + "/v1/completions", json={**body, "prompt": p}, timeout=120).json()
                 for p in prompts]
        results, peak, going = {}, [0], [True]

        def one(k):
            results[k] = requests.post(url + "/v1/completions", json={**body, "prompt": prompts[k]}, timeout=120)

        def watch():
            while going[0]:
                peak[0] = max(peak[0], metrics(url)["mumoe_requests_running"])
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=one, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        going[0] = False
        watcher.join()
        assert all(r.status_code == 200 for r in results.values()) and len(results) == 6
        for k in range(6):
            assert results[k].json()["choices"][0]["text"] == alone[k]["choices"][0]["text"]
            assert results[k].json()["usage"] == alone[k]["usage"]
        assert peak[0] >= 2


def test_an_int4_server_answers_as_generate_reading_the_same_copies(model_tok, monkeypatch):
    """`mumoe serve --int4`: the engine makes int4 copies of the model's linears and experts, and a dense request's
    greedy text is what transformers' generate gives on the same model (its one-token steps read the same copies);
    requests decoded together (calls of a few rows: still the copies) answer as they do alone."""
    from mumoe.apply.int4 import int4_copy

    model, tok = model_tok
    # a model of its own: the copies belong to the weights; and not a deepcopy of the shared one — a copy keeps
    # fast_decode's experts forward of the original (a closure over the original's layer) when an engine made it
    model4 = mumoe.load("default")
    engine = Engine(model4, tok, "default", int4=True)
    layer = adapter_for(model4).moe_layers()[0]
    assert int4_copy(layer.experts.gate_up_proj) is not None and int4_copy(model4.lm_head.weight) is not None
    import mumoe.apply.gemv as gemv

    calls, real = [], gemv.int4_experts
    monkeypatch.setattr(gemv, "int4_experts", lambda *a: calls.append(1) or real(*a))
    prompts = [PROMPT[:60], PROSE[500:700], PROMPT]
    with torch.no_grad():
        want = []
        for p in prompts:
            ids = tok(p, add_special_tokens=False)["input_ids"]
            out = model4.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                  pad_token_id=tok.eos_token_id)
            want.append(tok.decode(out[0, len(ids):], skip_special_tokens=True))
            plain = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                   pad_token_id=tok.eos_token_id)
    assert calls and not torch.equal(out, plain)  # the experts' copies read; another text than the model's own
    with serving(engine, timeout=120) as url:
        body = {"model": "default", "max_tokens": 16, "temperature": 0}
        alone = [requests.post(url + "/v1/completions", json={**body, "prompt": p}, timeout=120).json()
                 for p in prompts]
        assert [a["choices"][0]["text"] for a in alone] == want
        results = {}
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, requests.post(
            url + "/v1/completions", json={**body, "prompt": prompts[k]}, timeout=120).json())) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [results[k]["choices"][0]["text"] for k in range(3)] == want


def test_int4_task_models_decode_from_copies_too(model_tok, library):
    """With a task library, `--int4` reaches TAER's task models: each is given its int4 copies when it loads."""
    from mumoe.apply.int4 import int4_copy

    model, tok = model_tok
    engine = Engine(mumoe.load("default"), tok, "default", library=library, model_path=str(DEFAULT_MODEL), int4=True)
    task_model, cached, _ = engine.task_models.get("code")
    layers = adapter_for(task_model).moe_layers()
    assert not cached and layers and all(int4_copy(layer.experts.gate_up_proj) is not None for layer in layers)
    assert int4_copy(task_model.lm_head.weight) is not None


def test_timeout_is_a_504(model_tok):
    model, tok = model_tok
    with serving(Engine(model, tok, "default"), timeout=0.5) as url:
        r = requests.post(url + "/v1/completions", json={"model": "default", "prompt": PROMPT, "max_tokens": 400,
                                                         "temperature": 0}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        ok = requests.post(url + "/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 1,
                                                          "temperature": 0}, timeout=60)
        assert ok.status_code == 200


def test_client_disconnect_cancels_the_request(model_tok):
    """A streaming client that goes away after two chunks: the worker stops decoding (its request would have
    taken ~400 tokens) and the next request is answered at once."""
    model, tok = model_tok
    engine = Engine(model, tok, "default")
    with serving(engine) as url:
        r = requests.post(url + "/v1/completions", json={"model": "default", "prompt": PROMPT, "max_tokens": 260,
                                                         "temperature": 0, "stream": True}, stream=True, timeout=60)
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(l.startswith(b"data: {") for l in got)
        r.close()
        t0 = time.perf_counter()
        while metrics(url)["mumoe_requests_running"] and time.perf_counter() - t0 < 20:
            time.sleep(0.05)
        assert metrics(url)["mumoe_requests_running"] == 0
        tokens = metrics(url)['mumoe_generation_tokens_total{kind="dense"}']
        assert tokens < 200  # stopped early, not decoded to the end
        ok = requests.post(url + "/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 1,
                                                          "temperature": 0}, timeout=60)
        assert ok.status_code == 200


def _start_cli(*args: str) -> tuple[subprocess.Popen, str]:
    from mumoe.serve.launch import start_server

    return start_server(list(args), env=ENV)


def test_cli_serve_defaults_and_sigterm_finishes_in_flight():
    """The CLI with a server default --active 0.5: requests without an extension object are μ-MoE; SIGTERM while a
    request decodes lets it finish (200, all its tokens), then the server exits and refuses connections. (With
    --int4: its dense requests decode from the copies, whose size the start line gives.)"""
    proc, url = _start_cli("--active", "0.5", "--structure", "row", "--served-model-name", "bundled", "--int4")
    try:
        c = client(url)
        r = c.completions.create(model="bundled", prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.mumoe["kind"] == "mu-moe" and r.mumoe["active"] == 0.5
        d = c.completions.create(model="bundled", prompt=PROMPT, max_tokens=8, temperature=0,
                                 extra_body={"mumoe": {"active": 1}})
        assert d.mumoe["kind"] == "dense"
        result = {}

        def long():
            result["r"] = requests.post(url + "/v1/completions", json={"model": "bundled", "prompt": PROMPT,
                                                                       "max_tokens": 120, "temperature": 0}, timeout=120)

        t = threading.Thread(target=long)
        t.start()
        for _ in range(200):
            if requests.get(url + "/health", timeout=5).json()["running"]:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["usage"]["completion_tokens"] == 120
        assert proc.wait(60) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read()
    assert "Traceback" not in out and "serving 'bundled'" in out and "mumoe serve: stopped" in out
    assert "decode steps read int4 copies (" in out and " MiB)" in out


def test_cli_serve_port_in_use_is_one_line(capsys):
    from mumoe.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1, err
    assert main(["serve", "--host", "no-such-host.invalid"]) == 2
    assert "--host no-such-host.invalid" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["--active", "0"], "(0, 1]"),
    (["--structure", "3:2"], "structure"),
    (["--task", "auto"], "--library"),
    (["--active", "0.5", "--experts", "4"], "choose one default pruning"),
    (["--experts", "0"], "--experts"),
    (["--experts", "17"], "between top_k=2 and the expert count 16"),
    (["--taer-only"], "--taer-only needs --library"),
    (["--max-queue", "0"], "--max-queue"),
    (["--max-batch", "0"], "--max-batch"),
    (["--port", "70000"], "--port"),
    (["--library", "/nonexistent/lib"], "task library not found"),
    (["--int4", "--device", "cuda"], "cuda"),
])
def test_cli_serve_bad_flags_are_one_line(args, words, capsys):
    from mumoe.cli import main

    assert main(["serve", *args]) == 2  # refused before the model loads or a port is opened
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


# ---- lm-eval against the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from mumoe.eval.harness import write_local_tasks

    folder = tmp_path_factory.mktemp("tasks")
    names = write_local_tasks(folder, 100)
    return names[-2:], TaskManager(include_path=str(folder), include_defaults=False)  # two domains: kernel, prose


def test_lm_eval_local_completions_matches_in_process(model_tok, local_tasks):
    """lm-eval's own `local-completions` model (its HTTP client, tokenization and logprob parsing) against the
    server on the offline local tasks gives the in-process adapter's scores: plain HFLM for a dense server, the
    per-request adapter (`run_lm_eval(pruning=...)`) for a server default of --active 0.5."""
    import lm_eval

    from mumoe.eval.harness import run_lm_eval

    model, tok = model_tok
    tasks, manager = local_tasks
    limit = 3
    lls = {}
    for default in (Pruning(), Pruning(active=0.5)):
        want = run_lm_eval(model, tok, tasks, limit=limit, pruning=None if default.kind == "dense" else default,
                           manager=manager)
        with serving(Engine(model, tok, "default", default)) as url:
            out = lm_eval.simple_evaluate(
                model="local-completions",
                model_args={"model": "default", "base_url": url + "/v1/completions", "tokenizer": str(DEFAULT_MODEL),
                            "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 511,
                            "max_retries": 1},
                tasks=tasks, task_manager=manager, limit=limit, verbosity="ERROR", log_samples=True)
            served = metrics(url)
        for t in tasks:
            got = {k.split(",")[0]: v for k, v in out["results"][t].items() if k in ("acc,none", "acc_norm,none")}
            assert got == {k: want[t][k] for k in ("acc", "acc_norm")}, (default, t, got, want[t])
        # every choice of every document went through the server, pruned as its default says
        n = limit * 4 * len(tasks)
        assert served[f'mumoe_generation_tokens_total{{kind="{default.kind}"}}'] == n
        assert sum(v for k, v in served.items() if k.startswith("mumoe_generation_tokens_total")) == n
        lls[default.kind] = [(s["arguments"], [r[0] for r in s["filtered_resps"]])
                             for t in tasks for s in out["samples"][t]]
    # dense: the served loglikelihoods equal a plain forward of the same tokens (lm-eval's context/continuation split)
    (ctx, cont), served_ll = lls["dense"][0][0][0], lls["dense"][0][1][0]
    whole = tok(ctx + cont)["input_ids"]
    n_ctx = len(tok(ctx.rstrip())["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    assert served_ll == pytest.approx(sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))), abs=1e-3)
    # μ-MoE scored every request with its own pruned model: different loglikelihoods, the same documents
    assert [a for a, _ in lls["dense"]] == [a for a, _ in lls["mu-moe"]]
    assert all(d != m for (_, ds), (_, ms) in zip(lls["dense"], lls["mu-moe"]) for d, m in zip(ds, ms))


def test_a_server_with_skip_equals_generate_with_skipping(model_tok):
    """`mumoe serve --skip`: a dense request's completion is greedy decoding inside ODP's skipping (the same
    thresholds), the response says the share it skipped; a μ-MoE request runs without skipping."""
    from mumoe.observe.calib import tokenize, windows
    from mumoe.testtime.skip import SkipSetup, calibrate, odp_scores, skipping_with

    model, tok = model_tok
    wins = windows(tokenize(tok, (DATA / "prose" / "calib.txt").read_text()), 8, 128)
    setup = SkipSetup(calibrate(model, wins, 0.3, 0.1, 4), odp_scores, 0.1, "ODP 30%")
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad(), skipping_with(model, setup) as count:
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    want = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert count.share() > 0.1
    with torch.no_grad():
        dense = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    assert not torch.equal(dense, out)  # skipping changed the continuation: the comparison below can fail
    engine = Engine(model, tok, "default", skip=setup)
    with serving(engine, max_queue=2, timeout=120) as url:
        r = client(url).completions.create(model="default", prompt=PROMPT, max_tokens=16, temperature=0)
        assert r.choices[0].text == want and r.mumoe["kind"] == "dense"
        assert r.mumoe["skipped"] == pytest.approx(count.share(), abs=1e-4)
        r2 = client(url).completions.create(model="default", prompt=PROMPT, max_tokens=4, temperature=0,
                                            extra_body={"mumoe": {"active": 0.5}})
        assert "skipped" not in r2.mumoe
