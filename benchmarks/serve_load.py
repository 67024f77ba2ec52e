"""A bounded load test of `mumoe serve` on 127.0.0.1: concurrent clients, every request pruned for itself.

    python benchmarks/serve_load.py [--clients 8] [--requests 64] [--max-tokens 32] [--prompt-tokens 128]
                                    [--max-queue 4] [--model default] [--json PATH]
                                    [--peer-python LLAMA_VENV/bin/python --peer-gguf MODEL-f16.gguf]
                                    [--dense-only] [--max-batch 8] [--dtype auto] [--int4]

Starts the real CLI (`mumoe serve`, a subprocess) on a free port with a TAER task library built for the run
(`mumoe taer build`, the bundled domains' calibration splits, keep 8 of 16), then for each mode sends --requests
completions from --clients threads (HTTP with `requests`): prompts are --prompt-tokens-token windows of the four
bundled eval texts (as token ids), greedy, --max-tokens each. Modes, set per request by the "mumoe" object:
    dense               no extension object
    mu-moe column 0.5   {"active": 0.5, "structure": "column"}
    experts 8           {"experts": 8}   (per-prompt expert pruning)
    taer auto           {"task": "auto"} (TAER; task models cached, --max-task-models 4)
(first, dense from a single client: the server's own cost against the in-process run at the end)
The queue is kept small (--max-queue) so that some requests are refused with 503 on purpose: a client retries a
503 after a quarter of its Retry-After, so every request is answered; any other error fails the run. Reported per mode: requests
answered, 503s seen, p50/p95 latency (first send to answer, retries included), decode throughput (completion
tokens / wall time), mean pruning overhead (from the responses), and the server's own counters. Then the same dense
requests run in-process (`Engine.run`, no HTTP, one at a time) for the cost of serving itself.

With --peer-python/--peer-gguf the same dense requests (1 client, then --clients) go to llama-cpp-python's
server (`python -m llama_cpp.server`, threads = the cores) on the model's GGUF, and the ratios are printed.
--dense-only: only the dense phases (no task library; for a larger or dense --model, e.g. the checkpoints
benchmarks/peer_decode.py makes), and the in-process run without its per-mode split. --max-batch: the server's
(dense requests decoded together; 1 = one request at a time, the server before continuous batching). --dtype:
the server's and the in-process run's (default auto: fp32 on the CPU). --int4: the server's and the in-process
run's `--int4` (decode steps read int4 copies of the weights).

Not in CI (about 3 minutes on 2 cores); results go to benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"
MODES = {"dense": None, "mu-moe column 0.5": {"active": 0.5, "structure": "column"}, "experts 8": {"experts": 8},
         "taer auto": {"task": "auto"}}


PEERS: set[str] = set()  # URLs of the llama.cpp peer server


def prompts(n: int, length: int) -> list[list[int]]:
    from mumoe.loading import DATA, load_tokenizer

    tok = load_tokenizer("default")
    per_domain = []
    for split in sorted(DATA.glob("*/eval.txt")):
        ids = tok(split.read_text("utf-8"), add_special_tokens=False)["input_ids"]
        per_domain.append([ids[i:i + length] for i in range(0, len(ids) - length, length)])
    out = []
    while len(out) < n:  # round-robin over the domains
        for windows in per_domain:
            if len(out) < n and windows:
                out.append(windows.pop(0))
    return out


def build_library(folder: Path, model: str) -> Path:
    from mumoe.loading import DATA

    lib = folder / "lib"
    tasks = [a for d in sorted(DATA.glob("*/calib.txt")) for a in ("--task", f"{d.parent.name}={d}")]
    subprocess.run([sys.executable, "-m", "mumoe", "taer", "build", model, *tasks, "--keep", "8", "--nsamples", "32",
                    "--out", str(lib), "--quiet"], check=True)
    return lib


def start(model: str, lib: Path | None, max_queue: int, max_batch: int, dtype: str = "auto", int4: bool = False
          ) -> tuple[subprocess.Popen, str]:
    from mumoe.serve.launch import start_server

    library = ["--library", str(lib), "--max-task-models", "4"] if lib is not None else []
    return start_server([model, *library, "--max-queue", str(max_queue), "--max-batch", str(max_batch), "--dtype",
                         dtype, "--quiet", *(["--int4"] if int4 else [])], timeout=600, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)


NO_REPACK = (  # llama.cpp's --no-repack for llama_cpp.server: weights as in the file (its AVX-512/AMX repacking of
    # Q4_K_M crashes with SIGILL on this project's CPU; benchmarks/peer_decode.py does the same)
    "import runpy, sys, llama_cpp, llama_cpp.llama\n"
    "own = llama_cpp.llama_model_default_params\n"
    "def params():\n    p = own()\n    p.use_extra_bufts = False\n    return p\n"
    "llama_cpp.llama.llama_cpp.llama_model_default_params = params\n"
    "sys.argv = ['llama_cpp.server', *sys.argv[1:]]\n"
    "runpy.run_module('llama_cpp.server', run_name='__main__')\n")


def start_peer(python: str, gguf: str, repack: bool = True) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's OpenAI server (`python -m llama_cpp.server`) on `gguf`, threads = the cores, on a free
    port; returns once /v1/models answers. repack=False: llama.cpp's --no-repack setting."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cores = str(os.cpu_count() or 2)
    run = ["-m", "llama_cpp.server"] if repack else ["-c", NO_REPACK]
    proc = subprocess.Popen([python, *run, "--model", gguf, "--host", "127.0.0.1", "--port",
                             str(port), "--n_threads", cores, "--n_threads_batch", cores, "--n_ctx", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(url + "/v1/models", timeout=2).status_code == 200:
                try:  # a prompt's products: a repacked Q4_K_M loads, then crashes at them on this CPU
                    requests.post(url + "/v1/completions", json={"prompt": "a b " * 64, "max_tokens": 2}, timeout=60)
                except requests.ConnectionError:
                    try:
                        proc.wait(10)  # (dying)
                    except subprocess.TimeoutExpired:
                        pass
                if proc.poll() is not None:
                    raise SystemExit(f"llama_cpp.server exited with {proc.returncode} at its first request")
                return proc, url
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("llama_cpp.server did not start in 120 s")


def counters(url: str) -> dict[str, float]:
    if url in PEERS:  # not a mumoe server: no Prometheus counters
        return {}
    out = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "_bucket" not in line and "_created" not in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def run_mode(url: str, model: str, ext: dict | None, work: list[list[int]] | list[str], clients: int,
             max_tokens: int) -> dict:
    todo = list(enumerate(work))
    lock = threading.Lock()
    lat, tokens, overhead, refused, errors, tasks = [], [], [], [0], [], {}

    def client():
        session = requests.Session()
        while True:
            with lock:
                if not todo:
                    return
                i, ids = todo.pop(0)
            body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0}
            if ext:
                body["mumoe"] = ext
            t0 = time.perf_counter()
            while True:
                r = session.post(url + "/v1/completions", json=body, timeout=300)
                if r.status_code != 503:
                    break
                with lock:
                    refused[0] += 1
                time.sleep(float(r.headers.get("Retry-After", 1)) / 4)  # a quarter of the server's hint
            dt = time.perf_counter() - t0
            with lock:
                if r.status_code != 200:
                    errors.append((i, r.status_code, r.text[:200]))
                    continue
                data = r.json()
                lat.append(dt)
                tokens.append(data["usage"]["completion_tokens"])
                overhead.append(data["mumoe"]["overhead_ms"] if "mumoe" in data else 0.0)
                if "task" in data.get("mumoe", {}):
                    tasks[data["mumoe"]["task"]] = tasks.get(data["mumoe"]["task"], 0) + 1

    before = counters(url)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = counters(url)
    if errors:
        raise SystemExit(f"errors other than 503: {errors[:3]}")
    q = statistics.quantiles(lat, n=20)
    served = sum(v - before.get(k, 0) for k, v in after.items()
                 if k.startswith('mumoe_requests_total{endpoint="/v1/completions",status="200"'))
    return {"answered": len(lat), "sent": len(work), "refused_503": refused[0], "served_counter": served,
            "p50_s": statistics.median(lat), "p95_s": q[18], "wall_s": wall, "completion_tokens": sum(tokens),
            "tokens_per_s": sum(tokens) / wall, "overhead_ms_mean": statistics.mean(overhead),
            "tasks": tasks or None}


def in_process(model_name: str, work: list[list[int]], max_tokens: int, split: bool = True, dtype: str = "auto",
               int4: bool = False) -> dict:
    import torch

    import mumoe
    from mumoe.loading import load_tokenizer
    from mumoe.serve import Engine, Sampling

    torch.set_num_threads(os.cpu_count() or 1)
    engine = Engine(mumoe.load(model_name, dtype), load_tokenizer(model_name), model_name, int4=int4)
    n, t0 = 0, time.perf_counter()
    for ids in work:
        n += engine.run(ids, Sampling(max_tokens, 0.0), engine.defaults, lambda *a: None).completion_tokens
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "completion_tokens": n, "tokens_per_s": n / wall, "split": {}}
    if not split:
        return out
    # where the time of one request goes, dense vs μ-MoE column: up to the first token, then per decoded token
    for name, ext in (("dense", None), ("mu-moe column 0.5", MODES["mu-moe column 0.5"])):
        pruning = engine.pruning(ext)

        def timed(tokens: int) -> float:
            t = time.perf_counter()
            for ids in work[:8]:
                engine.run(ids, Sampling(tokens, 0.0), pruning, lambda *a: None)
            return (time.perf_counter() - t) / 8

        first, full = timed(1), timed(max_tokens + 1)
        out["split"][name] = {"first_token_ms": 1000 * first, "per_token_ms": 1000 * (full - first) / max_tokens}
    # the server decodes in a worker thread: the same 8 dense requests on the main thread and on a fresh thread,
    # alternating, 3 times each
    def dense8(box: list) -> None:
        t = time.perf_counter()
        for ids in work[:8]:
            engine.run(ids, Sampling(max_tokens, 0.0), engine.defaults, lambda *a: None)
        box.append(time.perf_counter() - t)

    main_s, thread_s = [], []
    for _ in range(3):
        dense8(main_s)
        th = threading.Thread(target=dense8, args=(thread_s,))
        th.start()
        th.join()
    out["thread_over_main"] = statistics.median(thread_s) / statistics.median(main_s)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--dense-only", action="store_true", help="only the dense phases (no task library)")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default 8)")
    ap.add_argument("--dtype", default="auto", help="the server's --dtype (default auto)")
    ap.add_argument("--int4", action="store_true", help="the server's --int4 (default off)")
    ap.add_argument("--peer-python", help="python of a venv with llama-cpp-python[server]: its server on --peer-gguf "
                    "gets the dense phases too (e.g. the files benchmarks/peer_decode.py makes)")
    ap.add_argument("--peer-gguf", help="the GGUF of --model for the llama.cpp server (e.g. bundled-f16.gguf)")
    args = ap.parse_args()
    work = prompts(args.requests, args.prompt_tokens)
    results = {"machine": f"{os.cpu_count()} CPUs", "clients": args.clients, "requests": args.requests,
               "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens, "max_queue": args.max_queue,
               "max_batch": args.max_batch, "model": args.model, "dtype": args.dtype, "int4": args.int4, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="mumoe-serve-load-") as tmp:
        lib = None if args.dense_only else build_library(Path(tmp), args.model)
        proc, url = start(args.model, lib, args.max_queue, args.max_batch, args.dtype, args.int4)
        try:
            modes = {"dense": None} if args.dense_only else MODES
            phases = [("dense, 1 client", None, 1)] + [(n, e, args.clients) for n, e in modes.items()]
            for name, ext, clients in phases:
                r = run_mode(url, args.model, ext, work, clients, args.max_tokens)
                results["modes"][name] = r
                print(f"{name:18s} {r['answered']}/{r['sent']} answered ({r['refused_503']} x 503 retried)  "
                      f"p50 {r['p50_s']:.2f}s  p95 {r['p95_s']:.2f}s  {r['tokens_per_s']:.1f} tok/s  "
                      f"overhead {r['overhead_ms_mean']:.1f} ms" + (f"  tasks {r['tasks']}" if r["tasks"] else ""),
                      flush=True)
            results["server_counters"] = {k: v for k, v in counters(url).items() if k.startswith("mumoe_")}
        finally:
            proc.terminate()
            rc = proc.wait(60)
        results["server_exit_code"] = rc
    if args.peer_python and args.peer_gguf:
        from mumoe.loading import load_tokenizer

        tok = load_tokenizer(args.model)  # llama_cpp.server takes text prompts only: the same windows as text
        texts = [tok.decode(ids) for ids in work]
        try:
            proc, url = start_peer(args.peer_python, args.peer_gguf)
            results["peer_repacked"] = True
        except SystemExit as e:  # (Q4_K_M repacked crashes on this CPU)
            print(f"{e}; again with llama.cpp's --no-repack setting", flush=True)
            proc, url = start_peer(args.peer_python, args.peer_gguf, repack=False)
            results["peer_repacked"] = False
        PEERS.add(url)
        try:
            for name, clients in (("llama.cpp server, 1 client", 1), (f"llama.cpp server, {args.clients} clients",
                                                                       args.clients)):
                r = run_mode(url, args.model, None, texts, clients, args.max_tokens)
                results["modes"][name] = r
                print(f"{name:18s} {r['answered']}/{r['sent']} answered  p50 {r['p50_s']:.2f}s  p95 {r['p95_s']:.2f}s  "
                      f"{r['tokens_per_s']:.1f} tok/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
        for clients, ours, peer in ((1, "dense, 1 client", "llama.cpp server, 1 client"),
                                    (args.clients, "dense", f"llama.cpp server, {args.clients} clients")):
            ratio = results["modes"][ours]["tokens_per_s"] / results["modes"][peer]["tokens_per_s"]
            results[f"mumoe_over_llama_cpp_{clients}"] = ratio
            print(f"dense tokens/s, {clients} client(s): mumoe serve / llama_cpp.server = {ratio:.2f} (goal ≥ 0.8)")
    direct = in_process(args.model, work, args.max_tokens, split=not args.dense_only, dtype=args.dtype, int4=args.int4)
    results["in_process_dense"] = direct
    one = results["modes"]["dense, 1 client"]
    print(f"in-process dense  {direct['tokens_per_s']:.1f} tok/s (no HTTP, one at a time); through the server with "
          f"1 client {one['tokens_per_s'] / direct['tokens_per_s']:.2f}x of that, with {args.clients} clients "
          f"{results['modes']['dense']['tokens_per_s'] / direct['tokens_per_s']:.2f}x")
    if "thread_over_main" in direct:
        print(f"in-process dense in a worker thread takes {direct['thread_over_main']:.2f}x the main thread's time")
    for name, sp in direct["split"].items():
        print(f"in-process {name}: {sp['first_token_ms']:.0f} ms to the first token, then {sp['per_token_ms']:.1f} ms "
              "per token")
    lost = [n for n, r in results["modes"].items() if r["answered"] != r["sent"]]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}; server exit code {rc}" + (f"; LOST requests in {lost}" if lost else "; no request lost"))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
