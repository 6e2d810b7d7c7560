"""bench/gpu.py's packed-attention and liger checks on the CPU with --dry_run (the code a GPU runs, tiny
shapes): SDPA per document and with the dense mask agree with an fp32 masked reference to bf16's
precision, and the liger check says what to install where it cannot run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_dry_run_varlen_and_liger(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry_run", "--only", "varlen", "liger"]
    subprocess.run([*command, "--json", str(out)], check=True, capture_output=True, timeout=600)
    header, *rows = json.loads(out.read_text())
    assert header["device"] == "cpu (dry run)"
    varlen = {row["kernel"]: row for row in rows if row["check"] == "varlen"}
    assert set(varlen) == {"sdpa_dense_mask", "sdpa_per_document"}
    for row in varlen.values():
        assert row["documents"] >= 2
        # bf16 against fp32 on values of order 1: a few bf16 ulps
        assert row["max_abs_out_diff"] < 0.05 and row["max_abs_dq_diff"] < 0.05, row
    (liger,) = [row for row in rows if row["check"] == "liger"]
    assert "bumblecore[gpu]" in liger["skipped"] or "CUDA" in liger["skipped"]
