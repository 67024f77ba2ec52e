"""lm-eval-harness adapter (optional extra `mumoe[eval]`) and local tasks that run offline on shipped data.

The (pruned) model is passed to lm-eval's HF model class in memory — nothing is saved and reloaded.

Local tasks `mumoe_nextline_<domain>`: from each bundled eval split, a context of a few lines and four
candidate next lines — the true one and three lines drawn from elsewhere in the same domain (seeded); the
model picks the most likely continuation (accuracy, and length-normalized accuracy).
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import MumoeError
from ..loading import DATA

LOCAL_PREFIX = "mumoe_nextline"


def nextline_docs(text: str, n: int, seed: int = 0, context_lines: int = 4) -> list[dict]:
    """Multiple-choice documents: context = `context_lines` consecutive non-empty lines, choices = the true next
    line + 3 distinct distractor lines of the same text (positions shuffled, seeded)."""
    lines = [l for l in (x.strip() for x in text.splitlines()) if 20 <= len(l) <= 200]
    rng = random.Random(seed)
    docs = []
    starts = list(range(0, len(lines) - context_lines - 1, context_lines + 1))
    rng.shuffle(starts)
    for s in starts[:n]:
        context, target = lines[s : s + context_lines], lines[s + context_lines]
        pool = [l for l in lines if l != target]
        choices = [target] + rng.sample(pool, 3)
        order = list(range(4))
        rng.shuffle(order)
        docs.append({"context": "\n".join(context) + "\n", "choices": [choices[i] for i in order],
                     "label": order.index(0)})
    return docs


def write_local_tasks(out: Path, n: int = 100, seed: int = 0, final: Path | None = None) -> list[str]:
    """Write the JSONL data and YAML configs of the local tasks into `out`; returns the task names. final: the
    folder the files will live in (the YAMLs name their data files there; default `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    final = Path(final or out).resolve()
    names = []
    for split in sorted(DATA.glob("*/eval.txt")):
        domain = split.parent.name
        name = f"{LOCAL_PREFIX}_{domain}"
        data = out / f"{name}.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            for doc in nextline_docs(split.read_text("utf-8"), n, seed):
                f.write(json.dumps(doc) + "\n")
        (out / f"{name}.yaml").write_text(
            f"task: {name}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {final / data.name}\n"
            f"test_split: test\n"
            f"output_type: multiple_choice\n"
            f"doc_to_text: context\n"
            f"doc_to_choice: choices\n"
            f"doc_to_target: label\n"
            f"target_delimiter: \"\"\n"
            f"metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        )
        names.append(name)
    return names


def export_tasks(out: str | Path, n: int = 100) -> list[str]:
    """The local tasks as a folder for plain `lm_eval --include_path OUT` (written atomically; an existing
    folder is refused). -> the task names."""
    from ..apply.export import atomic_output

    with atomic_output(out) as tmp:
        return write_local_tasks(tmp, n, final=Path(out))


@contextmanager
def task_manager(tasks: list[str], n_local: int = 100) -> Iterator:
    """An lm-eval TaskManager holding the local tasks (their files in a temporary folder while it is open), built
    once for several evaluations (`mumoe compare --tasks`): pass it to `run_lm_eval(..., manager=)`."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise MumoeError("lm-eval is not installed: pip install -e '.[eval]' (or pip install lm-eval)") from e
    with tempfile.TemporaryDirectory(prefix="mumoe-tasks-") as tmp:
        local = write_local_tasks(Path(tmp), n_local)
        yield TaskManager(include_path=tmp, include_defaults=not (tasks == ["local"] or set(tasks) <= set(local)))


def _engine_lm(engine, pruning):
    """An lm-eval LM that scores every request as `mumoe serve` does (batch 1, pruned for itself): the request's
    tokens are the prompt, its pruning chosen from them (`serve.engine.Engine.run` with echo + logprobs)."""
    from lm_eval.api.model import TemplateLM

    from ..serve.engine import Sampling

    class EngineLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = engine.tokenizer

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            from ..progress import bar

            out = []
            for _, ctx, cont in bar(requests, desc=f"requests ({pruning.kind}, each pruned for itself)", enabled=not disable_tqdm, unit="req"):
                ids = (ctx + cont)[-engine.context_length + 1:]
                n_ctx = len(ids) - len(cont)
                entries: list[dict] = []
                engine.run(ids, Sampling(max_tokens=1, temperature=0.0, logprobs=1, echo=True), pruning,
                           lambda text, e: entries.extend(e))
                scored = entries[n_ctx:len(ids)]  # the continuation's tokens (the generated one left out)
                greedy = all(e["logprob"] >= max(lp for _, lp in e["top"]) for e in scored)
                out.append((sum(e["logprob"] for e in scored), greedy))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("loglikelihood_rolling is not supported with per-request pruning")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("generate_until is not supported with per-request pruning")

    return EngineLM()


def run_lm_eval(model, tokenizer, tasks: list[str], batch_size: int = 8, limit: int | None = None,
                n_local: int = 100, pruning=None, manager=None) -> dict[str, dict[str, float]]:
    """Evaluate an in-memory model (or a checkpoint path, loaded as `mumoe.load` loads it) with lm-eval.
    tasks=["local"] runs every local task.
    pruning: a `serve.Pruning` — every request is pruned for itself as `mumoe serve` prunes it (μ-MoE from the
    request's own tokens, per-prompt experts), scored one at a time. manager: an lm-eval TaskManager that already
    includes the local tasks (building one takes seconds). -> {task: {metric: value}}"""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise MumoeError("lm-eval is not installed: pip install -e '.[eval]' (or pip install lm-eval)") from e
    with tempfile.TemporaryDirectory(prefix="mumoe-tasks-") as tmp:
        local = write_local_tasks(Path(tmp), n_local) if manager is None else \
            sorted(t for t in manager.all_tasks if t.startswith(LOCAL_PREFIX))
        if tasks == ["local"]:
            tasks = local
        # lm-eval's own task index takes ~15 s to build: only when a task outside the local ones is asked for
        manager = manager or TaskManager(include_path=tmp, include_defaults=not set(tasks) <= set(local))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise MumoeError(f"unknown lm-eval task(s): {', '.join(unknown)}; local offline tasks: {', '.join(local)}")
        if pruning is not None:
            from ..serve.engine import Engine

            engine = Engine(model, tokenizer, "in-process", pruning)
            lm = _engine_lm(engine, engine.defaults)
        else:
            if isinstance(model, (str, Path)):
                # loaded as every mumoe command loads it (mumoe forms, the --dtype auto rule: a bf16 export runs
                # in fp32 on the CPU like its source), not by lm-eval's own loader in the checkpoint's dtype
                from ..loading import load

                model = load(model)
            device = str(next(model.parameters()).device)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, verbosity="ERROR")
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}
    return results
