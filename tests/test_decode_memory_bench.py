"""bench/decode_memory.py runs (small images, a batch of 2) and prints a ratio per case and a last ratio line."""

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
