"""Do transformers 4.x read mumoe's exports? Logits of each checkpoint under transformers 4.57 vs mumoe.load (v5).

    pip install --target /tmp/tf457 "transformers==4.57.1" "huggingface_hub>=0.34,<1.0" "tokenizers>=0.22,<0.23"
    python benchmarks/transformers4_check.py --old /tmp/tf457 CHECKPOINT ...

The reference logits are computed here with the installed (v5) transformers; the same script then re-runs itself
with the 4.x copy first on sys.path and compares. Not in CI (it needs the second transformers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch


def reference(paths: list[str], file: str) -> None:
    import mumoe

    ids = torch.randint(0, 8192, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": {p: mumoe.load(p, "fp32")(ids).logits for p in paths}}, file)


def check(file: str) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = torch.load(file)
    print(f"transformers {transformers.__version__}")
    for p, logits in ref["logits"].items():
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(p)
        with torch.no_grad():
            diff = (model(ref["ids"]).logits - logits).abs().max().item()
        cfg = model.config
        print(f"  {p}: {type(model).__name__}, experts {getattr(cfg, 'num_experts', None)}, width "
              f"{getattr(cfg, 'moe_intermediate_size', None)}, tokenizer {type(tok).__name__}, max |Δlogit| {diff:.2e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="a folder holding transformers 4.x (pip install --target)")
    ap.add_argument("--check", help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*")
    args = ap.parse_args()
    if args.check:
        check(args.check)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "ref.pt")
        reference(args.paths, file)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.old, os.environ.get("PYTHONPATH", "")])}
        return subprocess.call([sys.executable, __file__, "--old", args.old, "--check", file], env=env)


if __name__ == "__main__":
    raise SystemExit(main())
