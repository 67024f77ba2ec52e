"""The prepared device check (`benchmarks/gpu_check.py`) in its CI-sized form on the CPU: every step runs and
passes, so the script a lent GPU runs is known to work before the GPU is there."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_small_on_the_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    res = json.loads((tmp_path / "gpu_check_cpu_small.json").read_text())
    assert r.returncode == 0, (r.stdout, {k: v.get("error") for k, v in res.items() if isinstance(v, dict)})
    tiny = res["tiny"]
    for arch in ("qwen3_moe", "mixtral"):
        t = tiny[arch]
        assert t["dense_max_abs_diff"] == 0.0 and t["reap_kept_equal"] and t["pmq_widths_equal"]
        assert t["heapr_atoms_equal_share"] == 1.0 and t["ratio0_unchanged"]
        assert 0.1 < t["skip_share"] < 0.5 and t["skip_sentinel_max_abs_diff"] < 1e-5 and t["otp_skip_share"] > 0.1
    lw = res["layerwise"]
    assert lw["reap"]["equal_to_in_memory"] and lw["heapr"]["equal_to_in_memory"] and lw["layer_mb"] > 0
    assert res["decode"]["dense_tokens_per_s"] > 0 and res["decode"]["column_0.5_tokens_per_s"] > 0
    b = res["batch"]
    assert b["max_abs_diff"] <= 1e-5 * max(1.0, b["logit_scale"]) and b["batch_tokens_per_s"] > 0
