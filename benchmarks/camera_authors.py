"""mumoe's CAMERA-P against the authors' own code (github: xuyuzhuang11/CAMERA, `mei.py` + `qwen3.py`), run in a
venv of its own (never committed).

    git clone https://github.com/xuyuzhuang11/CAMERA /tmp/authors/CAMERA
    python3.11 -m venv /tmp/authors-venv && /tmp/authors-venv/bin/pip install torch==2.13.0 transformers
    python benchmarks/camera_authors.py --python /tmp/authors-venv/bin/python --repo /tmp/authors/CAMERA

Here (our venv): the tiny qwen3_moe, a tiny qwen2_moe with a shared expert (its width 8 × the experts' — the shape
their Qwen2 branch's `make_pruned_module` assumes, `e >= 8`, Qwen2-57B-A14B's; its down projection × 0.05 so that
shared atoms compete with routed ones) and the bundled model (fp32) are saved as checkpoints with their calibration
windows; mumoe scores them with `camera-p` one-shot (every layer on the unpruned model) and progressive (the
product's own run, `mumoe.prune(..., "camera-p", ratio)`: its kept atoms per layer; the scores it ranked are
recomputed layer by layer on the model pruned as it says). There (the authors' venv, transformers 5.x): their
`qwen3_importance` / `qwen2_importance` loops from `qwen3.py` / `qwen2.py` and their `MEI` class from `mei.py`, on the same checkpoint and windows,
`--func prune` (progressive: each layer's importance, then `make_pruned_module`, then the layer's outputs
recomputed) and `--func score` (no pruning: one-shot importances). Two patches, both applied to the source text at
load time: (1) `mei.py`'s Qwen3 branch hard-codes top-8 routing (`k=8`): the block's own top_k instead (the bundled
model routes top-2); (2) their code reads per-expert modules (`experts[i].up_proj.weight`), transformers 5 fuses
the experts: each MoE block is swapped for a per-expert stand-in holding the same weights and computing the same
routing and sum, the Qwen2 shared expert and its gate kept as they are (not a patch of their file: a module they
read). Scores are compared in their order: the shared expert's neurons first, then expert by expert. Not patched: `import faiss` (unused) is satisfied
by an empty module; their DEV is not used (the loop takes the device: cpu). Their loop takes `layer(...)[0]` of a
decoder layer that returns a tensor in transformers 5: with --chunk-size 1 (used here) that is the one window.
λ = 0.9 (their run script's --reduce_ratio). Prints per model, order and ratio the largest relative score
difference and whether the removed atoms are the same; writes benchmarks/results/camera_authors.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

from authors import run_beside, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "camera_authors.json"
RATIOS = (0.25, 0.5)
LAMBDA = 0.9


# -- here: mumoe ------------------------------------------------------------------------------------------------
def models():
    import mumoe
    from mumoe.loading import DATA
    from mumoe.models.tiny import tiny_model
    from mumoe.observe import tokenize, windows

    gen = torch.Generator().manual_seed(0)
    yield "tiny qwen3_moe", lambda: tiny_model("qwen3_moe", seed=0), torch.randint(3, 128, (8, 32), generator=gen)

    def qwen2():
        m = tiny_model("qwen2_moe", seed=0, shared_expert_intermediate_size=128)  # 8 × the expert width 16
        with torch.no_grad():
            for layer in m.model.layers:  # so that some shared atoms rank below routed ones
                layer.mlp.shared_expert.down_proj.weight *= 0.05
        return m

    yield "tiny qwen2_moe (shared expert)", qwen2, torch.randint(3, 128, (8, 32), generator=gen)
    model, tok = mumoe.load_default()
    wins = torch.cat([windows(tokenize(tok, (DATA / d / "calib.txt").read_text("utf-8")), 256, 2)
                      for d in ("code", "docs", "kernel", "prose")])

    def bundled():
        m, _ = mumoe.load_default()
        return m.float()

    yield "bundled model", bundled, wins


def flat(parts: dict) -> torch.Tensor:
    """One layer's CAMERA-P scores in the authors' order: the shared expert's neurons first (where there is one),
    then expert by expert. [I_s + E·I]"""
    from mumoe.criteria import camera

    routed = camera.camera_score(parts, LAMBDA).flatten()
    return routed if "shared_energy" not in parts else torch.cat([camera.camera_score(parts, LAMBDA, "shared_"), routed])


def ours(file: Path, folder: Path) -> None:
    from mumoe import api
    from mumoe.apply.atoms import mask_atoms, mask_shared_atoms
    from mumoe.criteria import score_methods
    from mumoe.models import moe_adapter_for
    from mumoe.recipe import Recipe

    saved = {}
    for name, build, wins in models():
        path = folder / name.replace(" ", "_")
        build().save_pretrained(path)
        model = build().eval()
        layers = moe_adapter_for(model).moe_layers()
        parts = score_methods(model, ["camera-p"], wins, batch_size=4)["camera-p"]
        entry = {"path": str(path), "wins": wins, "one-shot": [flat(p) for p in parts], "progressive": {}}
        for ratio in RATIOS:
            m = build().eval()
            report = api.prune(m, Recipe.build("camera-p", ratio, calib="tensor", batch_size=4), calib=wins)
            kept = {e["layer"]: e for e in report.layers}
            ref = build().eval()  # the scores the product ranked: each layer on the layers before, pruned as it says
            scores, masks, shared_removed = [], [], []
            for layer in moe_adapter_for(ref).moe_layers():
                p = score_methods(ref, ["camera-p"], wins, batch_size=4, layers=[layer])["camera-p"][0]
                scores.append(flat(p))
                mask = torch.zeros(layer.num_experts, layer.intermediate_size, dtype=torch.bool)
                for x in kept[layer.index]["experts"]:
                    mask[x["expert"], x["kept"]] = True
                mask_atoms(layer, mask)
                shared = kept[layer.index].get("shared")
                if shared is not None:
                    mask_shared_atoms(layer, torch.tensor(shared["kept"], dtype=torch.long))
                    smask = torch.zeros(shared["intermediate_size"], dtype=torch.bool)
                    smask[shared["kept"]] = True
                    shared_removed.append(int((~smask).sum()))
                    mask = torch.cat([smask, mask.flatten()])
                masks.append(mask.flatten())
            entry["progressive"][ratio] = {"scores": scores, "kept": masks, "shared_removed": shared_removed}
        entry["layers"] = [layer.index for layer in layers]
        saved[name] = entry
    torch.save(saved, file)


# -- there: the authors' code -----------------------------------------------------------------------------------
def load_source(path: Path, name: str, patches: list[tuple[str, str]] = ()) -> types.ModuleType:
    """A module from a file's text with (old, new) replacements, each of which must occur."""
    text = path.read_text()
    for old, new in patches:
        if old not in text:
            sys.exit(f"{path.name}: {old!r} not found (a newer version of the authors' code?)")
        text = text.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(text, str(path), "exec"), module.__dict__)
    return module


class PerExpert(torch.nn.Module):
    """A transformers-5 Qwen3-MoE block as per-expert modules (`gate`, `experts[i].gate_proj/up_proj/down_proj`),
    the layout the authors' code reads; its forward is the block's: softmax routing, top-k (renormalized as the
    config says), Σ weight·down(act(gate x)·up x)."""

    def __init__(self, block) -> None:
        super().__init__()
        gu, down = block.experts.gate_up_proj.data, block.experts.down_proj.data  # [E, 2I, H], [E, H, I]
        E, I2, H = gu.shape
        I = I2 // 2
        self.gate, self.act, self.top_k = block.gate, block.experts.act_fn, block.gate.top_k

        def linear(w):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w.clone()
            return lin

        self.shared_expert = getattr(block, "shared_expert", None)  # Qwen2-MoE: read as it is (gate/up/down, .config)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)
        self.experts = torch.nn.ModuleList()
        for e in range(E):
            ex = torch.nn.Module()
            ex.gate_proj, ex.up_proj, ex.down_proj = linear(gu[e, :I]), linear(gu[e, I:]), linear(down[e])
            self.experts.append(ex)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, L, H = hidden_states.shape
        x = hidden_states.reshape(-1, H)
        _, weights, index = self.gate(x)  # [T, k] each
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            tok, pos = torch.where(index == e)
            if len(tok):
                y = ex.down_proj(self.act(ex.gate_proj(x[tok])) * ex.up_proj(x[tok])) * weights[tok, pos, None]
                out.index_add_(0, tok, y.to(out.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(B, L, H)


def theirs(file: Path, repo: Path, out_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    sys.modules.setdefault("faiss", types.ModuleType("faiss"))  # imported by mei.py, never used
    sys.path.insert(0, str(repo))
    load_source(repo / "mei.py", "mei", [("k=8, dim=-1)", "k=self.module.top_k, dim=-1)")])
    loops = {"qwen3_moe": (load_source(repo / "qwen3.py", "camera_qwen3"), "qwen3_importance"),
             "qwen2_moe": (load_source(repo / "qwen2.py", "camera_qwen2"), "qwen2_importance")}
    saved = torch.load(file)
    out = {}
    for name, d in saved.items():
        res = {}
        for func, ratio in [("score", None)] + [("prune", r) for r in RATIOS]:
            model = AutoModelForCausalLM.from_pretrained(d["path"], dtype=torch.float32).eval()
            module, loop = loops[model.config.model_type]
            for layer in model.model.layers:
                layer.mlp = PerExpert(layer.mlp)
            wins = d["wins"]
            module.args = types.SimpleNamespace(nsamples=len(wins), calib_length=wins.shape[1], chunk_size=1,
                                                reduce_ratio=LAMBDA, func=func, pratio=ratio or 0.0)
            imp = getattr(module, loop)(model, [(w[None], None) for w in wins], torch.device("cpu"))
            kept = []  # per layer, the atoms make_pruned_module left, in the importance's order
            for layer in model.model.layers:
                k = torch.stack([ex.up_proj.weight.abs().sum(1) != 0 for ex in layer.mlp.experts]).flatten()
                if layer.mlp.shared_expert is not None:
                    k = torch.cat([layer.mlp.shared_expert.up_proj.weight.abs().sum(1) != 0, k])
                kept.append(k)
            res["one-shot" if func == "score" else ratio] = {"scores": imp, "kept": kept}
        out[name] = res
    torch.save(out, out_file)
    print(json.dumps({"file": str(out_file)}))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", required=True, help="the authors' venv's python")
    ap.add_argument("--repo", type=Path, required=True, help="a checkout of xuyuzhuang11/CAMERA")
    ap.add_argument("--theirs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.theirs:
        theirs(Path(args.theirs), args.repo, Path(args.out))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        keep: dict = {}

        def ours_here(file: Path) -> None:
            ours(file, Path(tmp))
            keep["ours"] = torch.load(file)

        r = run_beside(args.python, __file__, ["--python", args.python, "--repo", str(args.repo), "--out",
                                               str(Path(tmp) / "theirs.pt")], ours_here)
        their = torch.load(r["file"])
    report: dict = {}
    for name, o in keep["ours"].items():
        t = their[name]
        rows = {"one-shot": {"max_rel_score_diff": max(rel(a, b.flatten()) for a, b in
                                                       zip(o["one-shot"], t["one-shot"]["scores"]))}}
        for ratio in RATIOS:
            mine, theirs_ = o["progressive"][ratio], t[ratio]
            same = [bool(torch.equal(a, b)) for a, b in zip(mine["kept"], theirs_["kept"])]
            rows[f"progressive {ratio:g}"] = {
                "max_rel_score_diff": max(rel(a, b.flatten()) for a, b in zip(mine["scores"], theirs_["scores"])),
                "same_removed_atoms_per_layer": same,
                "removed_per_layer": [int((~k).sum()) for k in mine["kept"]],
                "shared_removed_per_layer": mine["shared_removed"],
                "differing_atoms": sum(int((a != b).sum()) for a, b in zip(mine["kept"], theirs_["kept"]))}
        report[name] = rows
        for k, v in rows.items():
            extra = "" if "same_removed_atoms_per_layer" not in v else (
                f", removed atoms equal in {sum(v['same_removed_atoms_per_layer'])}/"
                f"{len(v['same_removed_atoms_per_layer'])} layers (removed per layer {v['removed_per_layer']}"
                + (f", of them shared {v['shared_removed_per_layer']}" if v["shared_removed_per_layer"] else "")
                + f", {v['differing_atoms']} atoms differ)")
            print(f"{name}, {k}: max relative score difference {v['max_rel_score_diff']:.1e}{extra}")
    write_results(RESULTS, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
