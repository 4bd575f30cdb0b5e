"""benchmarks/gpu_check.py: without a CUDA device it says so, writes a results file saying so, and exits 0."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run for real")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stdout
    doc = json.loads((tmp_path / "gpu_check-quick.json").read_text())
    assert doc["data"]["status"] == "no CUDA device" and doc["data"]["cuda"] is False
    assert "no CUDA device" in doc["tables"][0]["rows"][0][0]
    assert doc["command"] == f"python benchmarks/gpu_check.py --quick --out {tmp_path}"
