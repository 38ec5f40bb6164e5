"""bench/decode_memory.py and bench/job_memory.py run (small images, a batch of 2) and print their ratio lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_decode_memory_bench_prints_ratios():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "bench/decode_memory.py", "--max-pixels", str(512 * 512), "--batch", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    cases = [line for line in lines if re.match(r"^[a-z0-9-]+: 2 x \d+x\d+ \['RGB'\]", line)]
    assert len(cases) == 6, proc.stdout
    assert re.fullmatch(r"ratio: \d+\.\d{3}", lines[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_job_memory_bench_prints_a_ratio_per_mode():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "bench/job_memory.py", "--max-pixels", str(384 * 384), "--batch", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[1:-1]] == ["refine", "score"], proc.stdout
    assert "'skip'" not in lines[1] and "'light'" not in lines[1]  # every image refined (full, or reverted by the guard)
    assert re.fullmatch(r"ratio: \d+\.\d{3}", lines[-1])
