"""PreMoe TAER: library round trip, matching, partial loading, serving, bad inputs."""

import pytest
import torch

from conftest import char_tokenizer, make
import mumoe
from mumoe import MumoeError
from mumoe.apply import remove_experts
from mumoe.criteria.expert import tcess
from mumoe.criteria.stats import collect_stats
from mumoe.models import moe_adapter_for
from mumoe.retrieval import TaskLibrary, TaskServer, build_library, load_task_model, match, prompt_key


def task_windows(lo, hi, n=6, L=16, seed=0):
    return torch.randint(lo, hi, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def saved(tmp_path):
    model = make("qwen3_moe")
    model.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    tasks = {"low": task_windows(3, 40), "high": task_windows(90, 128)}
    lib = build_library(model, tasks, keep=4, score="tcess", progress=False)
    lib.save(tmp_path / "lib")
    return model, tmp_path, tasks


def test_library_round_trip_and_contents(saved):
    model, tmp, tasks = saved
    build_library(model, tasks, keep=4, key_stat="tcess", key_space="raw", progress=False).save(tmp / "paper")
    lib = TaskLibrary.load(tmp / "paper")
    layers = moe_adapter_for(model).moe_layers()
    stats = collect_stats(model, layers, tasks["low"], progress=False)
    expected = tcess(stats[0]).float()
    torch.testing.assert_close(lib.keys["low"], expected, rtol=1e-6, atol=1e-7)  # the paper's key: mean TCESS
    assert lib.whiten is None and lib.key_stat == "tcess"
    # a version-1 library (written before key statistics and spaces existed) loads as TCESS keys, plain L2
    import json

    meta = json.loads((tmp / "paper" / "library.json").read_text())
    meta["mumoe_taer_version"] = 1
    del meta["key_stat"], meta["key_space"]
    (tmp / "paper" / "library.json").write_text(json.dumps(meta))
    old = TaskLibrary.load(tmp / "paper")
    assert (old.key_stat, old.key_space, old.whiten) == ("tcess", "raw", None)
    prompt = task_windows(3, 40, 1, 16, seed=9)[0]
    assert match(model, old, prompt) == match(model, lib, prompt)
    for l, st in zip(layers, stats):
        s = tcess(st)
        assert lib.tasks["low"]["kept"][l.index] == sorted(torch.topk(s, 4).indices.tolist())
    lib.check_model(model)


def test_whitened_keys_against_a_slow_reference(saved):
    """Default library: key = mean first-router logits over all tokens; distance = Mahalanobis under the pooled
    within-task covariance of 64-token chunk keys (+1% of the overall variance), recomputed here by explicit loops."""
    model, tmp, tasks = saved
    lib = TaskLibrary.load(tmp / "lib")
    assert (lib.key_stat, lib.key_space) == ("logit", "whitened")
    router = moe_adapter_for(model).moe_layers()[0].router
    seen = []
    h = router.register_forward_hook(lambda m, a, o: seen.append(o[0].detach().double()))
    chunk_keys = {}
    for name, wins in tasks.items():
        rows = []
        for w in wins:  # one window at a time, full forward
            seen.clear()
            with torch.no_grad():
                model(w[None])
            logits = seen[0].reshape(w.numel(), -1)  # [L, E]
            rows.append(logits)
        allrows = torch.cat(rows)
        torch.testing.assert_close(lib.keys[name].double(), allrows.mean(0), rtol=1e-5, atol=1e-6)
        chunk_keys[name] = torch.stack([r[i:i + 64].mean(0) for r in rows for i in range(0, r.shape[0], 64)])
    h.remove()
    D = chunk_keys["low"].shape[1]
    cov = torch.zeros(D, D, dtype=torch.float64)
    n = 0
    for c in chunk_keys.values():
        for row in c:
            d = (row - c.mean(0))[:, None]
            cov += d @ d.T
            n += 1
    cov /= n
    everything = torch.cat(list(chunk_keys.values()))
    total_var = ((everything - everything.mean(0)) ** 2).mean()
    reg = cov + 0.01 * total_var * torch.eye(D, dtype=torch.float64)
    key = prompt_key(model, task_windows(3, 40, 1, 16, seed=9)[0], key_stat="logit")
    for name in tasks:
        diff = key.double() - lib.keys[name].double()
        expected = float(diff @ torch.linalg.solve(reg, diff)) ** 0.5
        assert lib.distance(key, name) == pytest.approx(expected, rel=1e-5)


def test_matching_stops_at_first_router_and_finds_the_task(saved):
    model, tmp, _ = saved
    layers = moe_adapter_for(model).moe_layers()
    calls = []
    h = layers[1].router.register_forward_hook(lambda *a: calls.append(1))
    key = prompt_key(model, task_windows(3, 40, 1, 16, seed=9)[0])
    h.remove()
    assert calls == [] and key.shape == (8,)
    # tasks of one repeated token: a prompt of that token (any length) has exactly the task's key
    for stat in ("logit", "prob", "tcess"):
        const = build_library(model, {"five": torch.full((3, 16), 5), "hundred": torch.full((3, 16), 100)}, keep=4,
                              key_stat=stat, progress=False)
        for token, name in ((5, "five"), (100, "hundred")):
            m = match(model, const, torch.full((7,), token))
            assert m.task == name and m.runner_up != name
            assert m.distance < 1e-5 < m.runner_up_distance


def test_partial_load_equals_full_load_then_prune(saved):
    model, tmp, _ = saved
    lib = TaskLibrary.load(tmp / "lib")
    part = load_task_model(tmp / "m", lib, "high")
    full = mumoe.load(tmp / "m")
    remove_experts(full, lib.tasks["high"]["kept"])
    x = task_windows(90, 128, 2, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(part(x).logits, full(x).logits)
    assert part.config.num_experts == 4 and part.config.num_experts_per_tok == 2


def test_server_generates_with_cache(saved):
    _, tmp, _ = saved
    server = TaskServer(tmp / "m", tmp / "lib")
    first = server.generate("hello world", max_new_tokens=5)
    second = server.generate("hello world", max_new_tokens=5)
    assert first.match.task == second.match.task and not first.cached and second.cached
    assert first.text == second.text and len(server.cache) == 1


def test_bad_inputs(saved, tmp_path):
    model, tmp, tasks = saved
    lib = TaskLibrary.load(tmp / "lib")
    with pytest.raises(MumoeError, match="another model"):
        lib.check_model(make("qwen3_moe", seed=1))
    with pytest.raises(MumoeError, match="another model"):
        other = make("qwen3_moe", seed=1)
        other.save_pretrained(tmp_path / "other")
        char_tokenizer().save_pretrained(tmp_path / "other")
        TaskServer(tmp_path / "other", tmp / "lib")
    with pytest.raises(MumoeError, match="unknown task 'nope'"):
        load_task_model(tmp / "m", lib, "nope")
    with pytest.raises(MumoeError, match="between top_k=2"):
        build_library(model, tasks, keep=1, progress=False)
    (tmp / "lib" / "library.json").write_text('{"mumoe_taer_version": 1, "fingerp')
    with pytest.raises(MumoeError, match="cannot parse the task library .*library.json"):
        TaskLibrary.load(tmp / "lib")
    with pytest.raises(MumoeError, match="not found"):
        TaskLibrary.load(tmp_path / "missing")


def test_cli_build_match_generate(saved, capsys):
    from mumoe.cli import main

    model, tmp, _ = saved
    (tmp / "a.txt").write_text("aaaa aaaa aaaa " * 40)
    (tmp / "b.txt").write_text("zzzz zzzz zzzz " * 40)
    rc = main(["taer", "build", str(tmp / "m"), "--task", f"a={tmp / 'a.txt'}", "--task", f"b={tmp / 'b.txt'}",
               "--keep", "3", "--nsamples", "4", "--seqlen", "32", "--out", str(tmp / "L")])
    assert rc == 0, capsys.readouterr().err
    assert main(["taer", "match", str(tmp / "m"), str(tmp / "L"), "--prompt", "aaaa aaaa aaaa aaaa"]) == 0
    assert "task a (distance" in capsys.readouterr().out
    assert main(["taer", "generate", str(tmp / "m"), str(tmp / "L"), "--prompt", "zzzz zzzz", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "matched task b" in out and "loaded its 3 experts per layer" in out
    assert main(["taer", "build", str(tmp / "m"), "--task", "oops", "--keep", "3", "--out", str(tmp / "L2")]) == 2
    assert "NAME=PATH" in capsys.readouterr().err and not (tmp / "L2").exists()
    assert main(["taer", "generate", str(tmp / "m"), str(tmp / "L"), "--prompt", "  "]) == 2
