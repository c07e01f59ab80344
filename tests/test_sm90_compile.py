"""The Triton kernels compile for an H100 (sm_90) at the key benchmark configurations, without
register spills or shared memory over the limit: ``benchmarks/compile_check.py --quick`` (Triton
builds and ptxas run offline; nothing is executed, so this says nothing about speed or run-time
results: those need the GPU). A regression guard for changes to kernels or block heuristics that
the interpreter tests cannot see."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_check.py"


def test_key_configs_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # kernels defined for the GPU
    scratch = tmp_path / "tmp"  # the script's temporary Triton cache goes here, and must be gone after
    scratch.mkdir()
    env["TMPDIR"] = str(scratch)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--jobs", "2", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    left = sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file())  # (torch's import makes an empty folder)
    assert left < 2**20, f"compile_check left {left / 2**20:.0f} MB in its temporary folder: {list(scratch.iterdir())}"
    report = list(out.glob("triton-*.json"))
    assert report, f"no report written:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    rows = json.loads(report[0].read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"_fwd_kernel", "_bwd_kernel", "_perceiver_fwd_kernel", "_perceiver_bwd_kernel",
            "_nf4_matmul_kernel"} <= kernels, kernels
    bad = [(r["kernel"], r["points"][:1], r["flags"], r.get("error")) for r in rows if r["flags"] or not r["ok"]]
    assert not bad, bad
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
